"""Wrappers for Flax Linen modules."""

import flax.linen as _nn

from .._protocol import register_wrapper as _register_wrapper
from ._fake_quant import FakeQuant as FakeQuant
from ._inject import Injected as Injected
from ._inject import InjectReport as InjectReport
from ._inject import inject as inject
from ._lifecycle import fold as fold
from ._lifecycle import init_from_data as init_from_data
from ._lifecycle import wrap_pretrained as wrap_pretrained
from ._lora import LoRA as LoRA
from ._spectral_norm import SpectralNorm as SpectralNorm
from ._training import adapter_params as adapter_params
from ._training import label_counts as label_counts
from ._training import merge_params as merge_params
from ._training import param_labels as param_labels
from ._training import train_labels as train_labels
from ._weight_norm import WeightNorm as WeightNorm
from ._weight_standardization import WeightStandardization as WeightStandardization
from ._wrapper import Inverse as Inverse
from ._wrapper import Leaf as Leaf
from ._wrapper import Wrapper as Wrapper

# flax's own wrappers, so that tools asking wrapkit see through them too.
_register_wrapper(_nn.WeightNorm, inner="layer_instance")
_register_wrapper(_nn.SpectralNorm, inner="layer_instance")
