"""Weight standardisation for NNX (Qiao et al., https://arxiv.org/abs/1903.10520)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from .._family import weight_standardization
from ._wrapper import _REQUIRED, Leaf, NnxFilter, Wrapper, _describe


class WeightStandardization(Wrapper):
    """Weight standardisation: the inner module sees ``(w - mean) / sqrt(var + epsilon)``.

    The NNX twin of
    [`wrapkit.linen.WeightStandardization`][wrapkit.linen.WeightStandardization]: the same
    options, and on the same weights the same outputs. The mean and the (biased) variance
    are taken over the fan-in axes of each selected variable, every axis except
    ``feature_axes``, so each output feature of a ``Linear`` ``(in, out)``, ``Conv``
    ``(H, W, in, out)``, ``LinearGeneral`` or ``Einsum`` kernel has zero mean and unit
    variance: BiT's ``StdConv`` (Kolesnikov et al., https://arxiv.org/abs/1912.11370), for
    any module and kernel rank. The wrapper is stateless: it has no variables of its own,
    and every forward pass computes the standardised weight from the raw one, which it
    never writes. Keyword arguments of a call are passed on to the wrapped module.

    The moments are computed in at least float32, whatever the weight's dtype, and the
    standardised weight is cast once, at the end; a zero (or any constant) weight gives
    zeros, with finite gradients, in every dtype.

    Args:
        layer_instance: the module to wrap.
        epsilon: a finite positive number, added to the variance before the reciprocal
            square root. The default, ``1e-10``, is BiT's: with variances of order
            ``1 / fan_in`` it changes nothing, and it keeps a constant weight (a
            zero-initialised kernel) at 0 instead of 0 / 0.
        feature_axes: the axes (an int or a tuple of ints) that keep separate statistics;
            the mean and variance reduce over the others. ``None`` takes one mean and
            variance over the whole variable.
        dtype: the dtype of the standardised weights, floating-point or complex (default:
            the weight's).
        variable_filter: which variables to standardise (default ``"kernel"``; nnx filters
            such as ``nnx.PathContains("kernel")`` are accepted too).
        delegates: the inner module's methods to standardise for (default
            ``("__call__",)``).
        rngs: unused (the wrapper makes no variables); accepted like every wrapper's.

    Raises:
        ValueError: when built, listing every option of the wrong type or value, a
            filter that selects nothing, or a ``feature_axes`` out of range of a selected
            variable or covering all its axes (it would become zeros).

    Examples:
        >>> import jax.numpy as jnp, numpy as np
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightStandardization
        >>> layer = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
        >>> layer.kernel[...] = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> model = WeightStandardization(layer)
        >>> seen = model(jnp.eye(2))  # the standardised kernel itself
        >>> np.round(np.asarray(seen), 6)  # the last bits are the CPU's rsqrt
        array([[-1., -1.],
               [ 1.,  1.]], dtype=float32)
        >>> layer.kernel[...]  # the raw weight, untouched
        Array([[ 1., 10.],
               [ 3., 30.]], dtype=float32)
    """

    default_filter = ("kernel",)

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        epsilon: float = 1e-10,
        feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1,
        dtype: Dtype | None = None,
        variable_filter: NnxFilter = _REQUIRED,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.epsilon = epsilon
        self.feature_axes = feature_axes
        self.dtype = dtype
        super().__init__(
            layer_instance, variable_filter=variable_filter, delegates=delegates, rngs=rngs
        )

    def argument_errors(self) -> list[str]:
        return weight_standardization.problems(self)

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        # No variables of its own: only check, when built, that the axes fit the variable.
        weight_standardization.reduction(
            _describe(self), leaf.path, tuple(jnp.shape(leaf.value)), self.feature_axes
        )
        return {}

    def transform(self, leaf: Leaf) -> jax.Array:
        return weight_standardization.standardized(
            _describe(self), leaf.path, leaf.value, self.feature_axes, self.epsilon, self.dtype
        )
