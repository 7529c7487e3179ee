"""Tools for Flax NNX modules; importing this registers flax's NNX wrappers.

``nnx.WeightNorm`` and ``nnx.SpectralNorm`` wrap their ``layer_instance``, ``nnx.LoRA`` its
``base_module`` (``None`` when the LoRA was built without one), each delegating
``__call__``. ``import wrapkit`` does not import ``flax.nnx`` (about two seconds); this
package is imported on first use of ``wrapkit.nnx`` and by ``wrapkit.summary`` of an NNX
module.
"""

from operator import attrgetter as _attrgetter

from flax import nnx as _nnx

from .._protocol import register_wrapper as _register_wrapper
from .._summary.tabulate_nnx import tabulate as tabulate
from ._convert import from_linen_variables as from_linen_variables
from ._convert import to_linen_variables as to_linen_variables
from ._fake_quant import FakeQuant as FakeQuant
from ._inject import inject as inject
from ._lifecycle import fold as fold
from ._lifecycle import init_from_data as init_from_data
from ._lifecycle import wrap_pretrained as wrap_pretrained
from ._lora import LoRA as LoRA
from ._spectral_norm import SpectralNorm as SpectralNorm
from ._weight_norm import WeightNorm as WeightNorm
from ._weight_standardization import WeightStandardization as WeightStandardization
from ._wrapper import Inverse as Inverse
from ._wrapper import Leaf as Leaf
from ._wrapper import Wrapper as Wrapper

# flax's own NNX wrappers, so that tools asking wrapkit see through them too. By function:
# NNX's metaclass hides the constructors' parameters from the attribute-name check.
_register_wrapper(_nnx.WeightNorm, inner=_attrgetter("layer_instance"))
_register_wrapper(_nnx.SpectralNorm, inner=_attrgetter("layer_instance"))
_register_wrapper(_nnx.LoRA, inner=_attrgetter("base_module"))
