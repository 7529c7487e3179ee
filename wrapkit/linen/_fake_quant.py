"""Weight fake quantisation for quantisation-aware training (https://arxiv.org/abs/1712.05877)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype

from .._filters import VariableFilter
from .._numerics import fake_quantize
from .._problems import feature_axes_error, is_bool, is_index, reduction_axes_checked
from ._wrapper import Inverse, Leaf, Wrapper, _describe

# No integer format wider than int16 is used for quantised weights, and a finer grid is
# below the precision of float16 and bfloat16 weights (2**-11 and 2**-8 relative).
MAX_BITS = 16


def _real_dtype_error(value: Any) -> str | None:
    """Why ``value`` is not ``None`` or a real floating-point dtype, or ``None``."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return None
    got = f"the dtype {dtype}" if dtype is not None else repr(value)
    return (
        f"dtype must be None or a real floating-point dtype, got {got}: quantised weights "
        "are real. Pass e.g. dtype=jnp.float32 or dtype=jnp.bfloat16."
    )


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
        problems = []
        bits = self.bits
        if not is_index(bits):
            problems.append(
                f"bits must be an int from 2 to {MAX_BITS}, got {bits!r} "
                f"({type(bits).__name__}). Pass e.g. bits=8."
            )
        elif bits < 2:
            problems.append(
                f"bits must be an int from 2 to {MAX_BITS}, got {bits}: a symmetric 1-bit grid "
                "holds only the integer 0. Pass e.g. bits=8, or bits=2 for ternary weights "
                "(-1, 0, 1 times the scale)."
            )
        elif bits > MAX_BITS:
            problems.append(
                f"bits must be an int from 2 to {MAX_BITS}, got {bits}: no integer format wider "
                "than int16 is used for quantised weights, and a finer grid is below the "
                f"precision of float16 and bfloat16 weights. Pass bits={MAX_BITS} at most, or "
                "leave the layer unwrapped."
            )
        if not is_bool(self.symmetric):
            problems.append(
                f"symmetric must be True or False, got {self.symmetric!r}. Pass "
                "symmetric=False for an asymmetric (min/max, zero-point) grid."
            )
        if (error := feature_axes_error(self.feature_axes, "one grid per variable")) is not None:
            problems.append(error)
        if (error := _real_dtype_error(self.dtype)) is not None:
            problems.append(error)
        return problems

    def transform(self, leaf: Leaf) -> jax.Array:
        value = jnp.asarray(leaf.value)
        if jnp.iscomplexobj(value):
            raise TypeError(
                f"{_describe(self)}: {leaf.path!r} is {value.dtype}, but fake quantisation "
                "needs real weights. Leave it out of variable_filter."
            )
        axes = reduction_axes_checked(
            _describe(self),
            leaf.path,
            value.shape,
            self.feature_axes,
            # Each element would span its own grid and come out as it went in.
            over="take a grid over",
            otherwise="so each element would be a grid of its own and stay unquantised",
            none_gives="one grid per variable",
            none_fix="one grid over it",
        )
        # The grid and the rounding run in at least float32; the result is cast once.
        dtype = canonicalize_dtype(leaf.value, dtype=self.dtype)
        return fake_quantize(value, self.bits, symmetric=self.symmetric, axis=axes, dtype=dtype)

    def invert(self, leaf: Leaf) -> Inverse:
        # The grid is taken from the weights themselves, so the raw weight is the pretrained
        # one: a weight on its own grid (a folded FakeQuant model) comes back exactly.
        return Inverse(
            leaf.value,
            caveat=(
                f"FakeQuant({self.bits} bits) reproduces only weights that lie on their own "
                "quantisation grid; pass exact=False to start quantisation-aware training "
                "from float weights."
            ),
        )
