"""Wrappers for Flax Linen modules."""

import flax.linen as _nn

from .._protocol import register_wrapper as _register_wrapper
from ._spectral_norm import SpectralNorm as SpectralNorm
from ._weight_norm import WeightNorm as WeightNorm
from ._wrapper import Leaf as Leaf
from ._wrapper import Wrapper as Wrapper

# flax's own wrappers, so that tools asking wrapkit see through them too.
_register_wrapper(_nn.WeightNorm, inner="layer_instance")
_register_wrapper(_nn.SpectralNorm, inner="layer_instance")
