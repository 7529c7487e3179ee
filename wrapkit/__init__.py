"""wrapkit: module wrappers for Flax, and tools that see through them."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from . import flops as flops
from . import linen as linen
from ._filters import VariableFilter as VariableFilter
from ._protocol import WrapperProtocol as WrapperProtocol
from ._protocol import chain as chain
from ._protocol import delegated_methods as delegated_methods
from ._protocol import inner as inner
from ._protocol import is_wrapper as is_wrapper
from ._protocol import register_wrapper as register_wrapper
from ._protocol import unwrap as unwrap
from ._summary.capture_linen import summary as summary
from ._summary.data import Row as Row
from ._summary.data import Summary as Summary
from ._summary.data import VariableStats as VariableStats
from ._summary.tabulate import tabulate as tabulate


def __getattr__(name: str) -> object:
    # wrapkit.nnx imports flax.nnx, which takes seconds: only on first use.
    if name == "nnx":
        import importlib

        return importlib.import_module(".nnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = _version("wrapkit")
except _PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
