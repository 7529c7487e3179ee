"""wrapkit: module wrappers for Flax, and tools that see through them."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from . import linen as linen
from ._filters import VariableFilter as VariableFilter
from ._protocol import WrapperProtocol as WrapperProtocol
from ._protocol import chain as chain
from ._protocol import delegated_methods as delegated_methods
from ._protocol import inner as inner
from ._protocol import is_wrapper as is_wrapper
from ._protocol import register_wrapper as register_wrapper
from ._protocol import unwrap as unwrap

try:
    __version__ = _version("wrapkit")
except _PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
