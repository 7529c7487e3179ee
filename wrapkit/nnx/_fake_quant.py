"""Weight fake quantisation for NNX (Jacob et al., https://arxiv.org/abs/1712.05877)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from .._family import fake_quant
from ._wrapper import _REQUIRED, Inverse, Leaf, NnxFilter, Wrapper, _describe


class FakeQuant(Wrapper):
    """Weight fake quantisation: the inner module sees its weights rounded to a grid.

    The NNX twin of [`wrapkit.linen.FakeQuant`][wrapkit.linen.FakeQuant]: the same options,
    and on the same weights the same outputs and gradients. Each selected variable ``w`` is
    replaced by ``q = (clip(round(w / scale) + zero_point, lo, hi) - zero_point) * scale``,
    the nearest value of a ``bits``-bit min/max grid, for quantisation-aware training
    (Jacob et al., https://arxiv.org/abs/1712.05877):

    - ``symmetric=True``: ``scale = max|w| / (2**(bits-1) - 1)``, zero point 0, integers
      from ``-(2**(bits-1) - 1)`` to ``2**(bits-1) - 1`` (-127 to 127 in 8 bits);
    - ``symmetric=False``: the range ``[min(w), max(w)]``, widened to hold 0 so that zero
      stays exactly zero, split into ``2**bits - 1`` steps; integers from 0 to
      ``2**bits - 1``, with an integer zero point.

    The grid is computed from the current weights on every call (there is no state, no
    observer and no variable of the wrapper's own), and the raw weights are never written;
    a zero weight or channel has scale 1 and stays zero. The gradient is the
    straight-through estimator in its identity form: the inner module sees
    ``q + (w - stop_gradient(w))``, whose value is ``q`` exactly and whose derivative with
    respect to ``w`` is the identity, so the gradient with respect to the raw weight is the
    gradient of the same model with its weight set to ``q``. The grid gets no gradient.
    Keyword arguments of a call are passed on to the wrapped module.

    Computed in at least float32, whatever the weight's dtype, and cast once.

    Args:
        layer_instance: the module to wrap.
        bits: an int from 2 to 16, the width of the grid's integers.
        symmetric: True or False: a grid symmetric about zero, or an asymmetric one from
            the minimum to the maximum with a zero point.
        feature_axes: the axes (an int or a tuple of ints) that keep a grid each
            (per-channel quantisation: by default one grid per output feature); the grid's
            range is taken over the others. ``None`` takes one grid for the whole variable
            (per-tensor quantisation).
        dtype: the dtype of the quantised weights, a real floating-point dtype (default:
            the weight's).
        variable_filter: which variables to quantise (default ``"kernel"``; nnx filters
            such as ``nnx.PathContains("kernel")`` are accepted too).
        delegates: the inner module's methods to quantise for (default ``("__call__",)``).
        rngs: unused (the wrapper makes no variables); accepted like every wrapper's.

    Raises:
        ValueError: when built, listing every option of the wrong type or value, a
            filter that selects nothing, or a ``feature_axes`` out of range of a selected
            variable or covering all its axes.
        TypeError: when built, for a complex selected variable.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import FakeQuant
        >>> layer = nnx.Linear(3, 1, use_bias=False, rngs=nnx.Rngs(0))
        >>> layer.kernel[...] = jnp.array([[0.3], [-1.0], [0.8]])
        >>> model = FakeQuant(layer, bits=2)  # integers -1, 0, 1 times max|w| = 1
        >>> model(jnp.eye(3))  # the quantised kernel itself
        Array([[ 0.],
               [-1.],
               [ 1.]], dtype=float32)
        >>> layer.kernel[...].ravel()  # the raw weight, untouched
        Array([ 0.3, -1. ,  0.8], dtype=float32)
    """

    default_filter = ("kernel",)

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        bits: int = 8,
        symmetric: bool = True,
        feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1,
        dtype: Dtype | None = None,
        variable_filter: NnxFilter = _REQUIRED,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.bits = bits
        self.symmetric = symmetric
        self.feature_axes = feature_axes
        self.dtype = dtype
        super().__init__(
            layer_instance, variable_filter=variable_filter, delegates=delegates, rngs=rngs
        )

    def argument_errors(self) -> list[str]:
        return fake_quant.problems(self)

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        # No variables of its own: only check, when built, that the variable can be quantised.
        fake_quant.reduction(
            _describe(self),
            leaf.path,
            tuple(jnp.shape(leaf.value)),
            jnp.result_type(leaf.value),
            self.feature_axes,
        )
        return {}

    def transform(self, leaf: Leaf) -> jax.Array:
        return fake_quant.quantized(
            _describe(self),
            leaf.path,
            leaf.value,
            self.feature_axes,
            self.bits,
            self.symmetric,
            self.dtype,
        )

    def invert(self, leaf: Leaf) -> Inverse:
        # The grid is taken from the weights themselves, so the raw weight is the pretrained
        # one: a weight on its own grid (a folded FakeQuant model) comes back exactly.
        return Inverse(leaf.value, caveat=fake_quant.inverse_caveat(self.bits))
