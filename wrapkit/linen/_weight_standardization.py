"""Weight standardisation (Qiao et al., https://arxiv.org/abs/1903.10520)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import SupportsIndex

import jax
from flax.typing import Dtype

from .._family import weight_standardization
from .._filters import VariableFilter
from ._wrapper import Leaf, Wrapper, _describe


class WeightStandardization(Wrapper):
    """Weight standardisation: the inner module sees ``(w - mean) / sqrt(var + epsilon)``.

    The mean and the (biased) variance are taken over the fan-in axes of each selected
    variable: every axis except ``feature_axes``, so each output feature of a Dense
    ``(in, out)``, Conv ``(H, W, in, out)``, DenseGeneral or Einsum kernel has zero mean
    and unit variance. This is BiT's ``StdConv`` (Kolesnikov et al.,
    https://arxiv.org/abs/1912.11370), for any module and kernel rank. The wrapper is
    stateless: it has no variables of its own, and the inner module keeps its raw weights.

    The moments are computed in at least float32, whatever the weight's dtype, and the
    standardised weight is cast once, at the end; a zero (or any constant) weight gives
    zeros, with finite gradients, in every dtype.

    Attributes:
        layer_instance: the module to wrap.
        epsilon: a finite positive number, added to the variance before the reciprocal
            square root. The default, ``1e-10``, is BiT's (its JAX ``standardize`` and
            PyTorch ``StdConv2d``, and the flax community ports of them): with variances of
            order ``1 / fan_in`` it changes nothing, and it keeps a constant weight (a
            zero-initialised kernel) at 0 instead of 0 / 0. (The ViT hybrids add ``1e-5``
            to the standard deviation instead, a different formula.)
        feature_axes: the axes (an int or a tuple of ints) that keep separate statistics;
            the mean and variance reduce over the others. ``None`` takes one mean and
            variance over the whole variable.
        dtype: the dtype of the standardised weights, floating-point or complex (default:
            the weight's).
        variable_filter: which variables to standardise (default ``{"kernel"}``); see
            [`Wrapper`][wrapkit.linen.Wrapper].
        delegates: the inner module's methods to standardise for (default
            ``("__call__",)``).

    Raises:
        ValueError: when built, listing every option of the wrong type or value (each with
            the module, what was expected and the fix); in the first call, for
            ``feature_axes`` out of range of a selected variable, or covering all its axes
            (it would become zeros).

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightStandardization
        >>> model = WeightStandardization(nn.Conv(4, (3, 3)))
        >>> x = jnp.ones((1, 8, 8, 3))
        >>> variables = model.init(jax.random.key(0), x)
        >>> list(variables["params"])  # no variables of its own
        ['layer_instance']
        >>> model.apply(variables, x).shape
        (1, 8, 8, 4)
    """

    epsilon: float = 1e-10
    feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1
    dtype: Dtype | None = None
    variable_filter: VariableFilter = dataclasses.field(
        default_factory=lambda: {"kernel"}, kw_only=True
    )

    def argument_errors(self) -> list[str]:
        return weight_standardization.problems(self)

    def transform(self, leaf: Leaf) -> jax.Array:
        return weight_standardization.standardized(
            _describe(self), leaf.path, leaf.value, self.feature_axes, self.epsilon, self.dtype
        )
