"""Weight fake quantisation for quantisation-aware training (https://arxiv.org/abs/1712.05877)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import SupportsIndex

import jax
from flax.typing import Dtype

from .._family import fake_quant
from .._filters import VariableFilter
from ._wrapper import Inverse, Leaf, Wrapper, _describe


class FakeQuant(Wrapper):
    """Weight fake quantisation: the inner module sees its weights rounded to a grid.

    Each selected variable ``w`` is replaced by
    ``q = (clip(round(w / scale) + zero_point, lo, hi) - zero_point) * scale``, the
    nearest value of a ``bits``-bit min/max grid, for quantisation-aware training (Jacob
    et al., https://arxiv.org/abs/1712.05877):

    - ``symmetric=True``: ``scale = max|w| / (2**(bits-1) - 1)``, zero point 0, integers
      from ``-(2**(bits-1) - 1)`` to ``2**(bits-1) - 1`` (-127 to 127 in 8 bits);
    - ``symmetric=False``: the range ``[min(w), max(w)]``, widened to hold 0 so that zero
      stays exactly zero, split into ``2**bits - 1`` steps; integers from 0 to
      ``2**bits - 1``, with an integer zero point.

    The grid is computed from the current weights on every call (there is no state, no
    observer and no variable of the wrapper's own); a zero weight or channel has scale 1
    and stays zero. The gradient is the straight-through estimator in its identity form:
    the inner module sees ``q + (w - stop_gradient(w))``, whose value is ``q`` exactly and
    whose derivative with respect to ``w`` is the identity, so the gradient with respect
    to the raw weight is the gradient of the same model with its weight set to ``q``. The
    grid gets no gradient. A min/max grid spans every weight it is made from, so the
    clipped estimator (zero gradient outside the range) would give the same.

    Computed in at least float32, whatever the weight's dtype, and cast once.

    Attributes:
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
        variable_filter: which variables to quantise (default ``{"kernel"}``); see
            [`Wrapper`][wrapkit.linen.Wrapper].
        delegates: the inner module's methods to quantise for (default ``("__call__",)``).

    Raises:
        ValueError: when built, listing every option of the wrong type or value (each with
            the module, what was expected and the fix); in the first call, for
            ``feature_axes`` out of range of a selected variable, or covering all its axes.
        TypeError: in the first call, for a complex variable.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from wrapkit.linen import FakeQuant
        >>> model = FakeQuant(nn.Dense(3, use_bias=False), bits=2)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> list(variables["params"])  # no variables of its own
        ['layer_instance']
        >>> seen = model.apply(variables, jnp.eye(4))  # the quantised kernel itself
        >>> [len(np.unique(column)) <= 3 for column in np.asarray(seen).T]  # -s, 0, s
        [True, True, True]
    """

    bits: int = 8
    symmetric: bool = True
    feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1
    dtype: Dtype | None = None
    variable_filter: VariableFilter = dataclasses.field(
        default_factory=lambda: {"kernel"}, kw_only=True
    )

    def argument_errors(self) -> list[str]:
        return fake_quant.problems(self)

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
