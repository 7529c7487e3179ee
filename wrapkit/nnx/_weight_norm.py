"""Weight normalisation for NNX (Salimans & Kingma, https://arxiv.org/abs/1602.07868)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype, Initializer

from .._family import weight_norm
from ._wrapper import _REQUIRED, Inverse, Leaf, NnxFilter, Wrapper, _describe


class WeightNorm(Wrapper):
    """L2 weight normalisation: the inner module sees ``scale * v / ||v||``.

    The NNX twin of [`wrapkit.linen.WeightNorm`][wrapkit.linen.WeightNorm], with the
    arguments of ``flax.nnx.WeightNorm``. Unlike flax's class, it never writes the
    normalised weight into the wrapped module (flax issue 5576): the raw ``v`` stays as it
    is, and every forward pass computes ``scale * v / ||v||`` from it. The scales are
    ``nnx.Param``s (flax keeps plain arrays, which get no gradient and vanish from
    ``nnx.eval_shape``, flax issue 5577), in ``self.scale``, keyed by the variable's path
    (``wrapper.scale["kernel"]``), sharded like the weight's feature axes. Keyword
    arguments of a call are passed on to the wrapped module.

    The norm is taken in at least float32, whatever the weight's dtype, and the result is
    cast once: zero or tiny float16 and bfloat16 weights stay finite.

    Args:
        layer_instance: the module to wrap.
        feature_axes: the axes (an int or a tuple of ints) that keep separate norms and
            scales; ``None`` takes one norm over all axes and a scalar scale.
        use_scale: whether to learn a scale ``g``; if False the weights are unit-norm.
        scale_init: initialiser of the scales, ``scale_init(key, shape, dtype)``.
        epsilon: a finite non-negative number added to the squared norm.
        dtype: the dtype of the normalised weights (default: inferred from the weight
            and the scale).
        param_dtype: the dtype of the scales.
        variable_filter: which variables to normalise (default ``"kernel"``; nnx filters
            such as ``nnx.PathContains("kernel")`` are accepted too).
        delegates: the inner module's methods to normalise for (default ``("__call__",)``).
        rngs: the key of ``scale_init`` (``rngs.params()``); the default initialiser
            needs none.

    Raises:
        ValueError: when built, listing every option of the wrong type or value, a
            ``feature_axes`` out of range of a selected variable, or a filter that selects
            nothing.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm
        >>> model = WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> model.scale["kernel"].shape
        (3,)
        >>> y = model(jnp.ones((1, 2)))  # model.layer_instance.kernel is unchanged
    """

    default_filter = ("kernel",)
    construction_only = ("scale_init",)

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = nnx.initializers.ones,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: NnxFilter = _REQUIRED,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.feature_axes = feature_axes
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        super().__init__(
            layer_instance, variable_filter=variable_filter, delegates=delegates, rngs=rngs
        )

    def argument_errors(self) -> list[str]:
        return weight_norm.problems(self, "nnx.initializers.constant")

    def _axes(self, leaf: Leaf) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return weight_norm.axes(
            _describe(self), leaf.path, tuple(jnp.shape(leaf.value)), self.feature_axes
        )

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        features, _ = self._axes(leaf)
        if not self.use_scale:
            return {}
        key = rngs.params() if rngs is not None else jax.random.key(0)
        shape = tuple(jnp.shape(leaf.value)[axis] for axis in features)
        value = self.scale_init(key, shape, self.param_dtype)
        return {"scale": nnx.Param(value, **leaf.metadata(features))}

    def transform(self, leaf: Leaf) -> jax.Array:
        value = jnp.asarray(leaf.value)
        features, reduction = self._axes(leaf)
        weight_norm.warn_if_elementwise(
            _describe(self), leaf.path, value.shape, self.feature_axes, reduction
        )
        scale = self.own("scale", leaf)[...] if self.use_scale else None
        inputs = [value] if scale is None else [value, scale]
        dtype = canonicalize_dtype(*inputs, dtype=self.dtype)
        return weight_norm.normalized(value, scale, features, reduction, self.epsilon, dtype)

    def invert(self, leaf: Leaf) -> Inverse:
        value = jnp.asarray(leaf.value)
        _, reduction = self._axes(leaf)
        if not self.use_scale:
            return Inverse(
                value,
                caveat=f"{_describe(self)} has use_scale=False: it reproduces only weights "
                f"of unit norm over the axes {reduction}; build it with use_scale=True to "
                "keep the pretrained norms as scales.",
            )
        return Inverse(value, {"scale": weight_norm.scale_of(value, reduction, self.epsilon)})
