"""Weight normalisation (Salimans & Kingma, https://arxiv.org/abs/1602.07868)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype, Initializer

from .._family import weight_norm
from ._wrapper import Inverse, Leaf, Wrapper, _describe


class WeightNorm(Wrapper):
    """L2 weight normalisation: the inner module sees ``scale * v / ||v||``.

    A drop-in for ``flax.linen.WeightNorm``: the same arguments in the same order, the same
    variables (the inner module keeps its raw weights ``v``; this module holds one
    ``"<inner name>/<path>/scale"`` parameter per selected variable, shaped like the feature
    axes), and in float32 the same outputs on the same variables, to the last bit. It
    differs from flax where flax is wrong; see the WeightNorm page of the docs.

    The norm is taken in at least float32, whatever the weight's dtype, and the normalised
    weight is cast once, at the end: a zero or tiny float16 or bfloat16 weight gives finite
    outputs and gradients, and the output does not depend on the weight's scale. A complex
    weight is divided by its modulus norm ``sqrt(sum(|v|**2))``.

    Attributes:
        layer_instance: the module to wrap.
        epsilon: a finite non-negative number, added to the squared norm before the
            reciprocal square root.
        dtype: the dtype of the normalised weights, floating-point or complex (default:
            inferred from the weight and the scale).
        param_dtype: the dtype of the scale parameters, floating-point or complex.
        use_scale: True or False: whether to learn a scale ``g``; if False the weights are
            unit-norm.
        scale_init: initialiser of the scales, called as ``scale_init(key, shape, dtype)``;
            for a constant, ``nn.initializers.constant(value)``.
        feature_axes: the axes (an int or a tuple of ints) that keep separate norms (and
            scales); the norm reduces over the others. ``None`` takes one norm over all
            axes and a scalar scale.
        variable_filter: which variables to normalise (default ``{"kernel"}``); see
            [`Wrapper`][wrapkit.linen.Wrapper]. ``None`` or empty selects all.
        delegates: the inner module's methods to normalise for (default ``("__call__",)``).

    Raises:
        ValueError: when built, listing every option of the wrong type or value (each with
            the module, what was expected and the fix); in the first call, for
            ``feature_axes`` out of range of a selected variable.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightNorm
        >>> model = WeightNorm(nn.Dense(3))
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
        >>> jax.tree_util.tree_map(jnp.shape, variables["params"])
        {'layer_instance': {'bias': (3,), 'kernel': (2, 3)}, 'layer_instance/kernel/scale': (3,)}
    """

    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = nn.initializers.ones
    feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = -1
    variable_filter: Iterable[Any] | None = dataclasses.field(default_factory=lambda: {"kernel"})

    def argument_errors(self) -> list[str]:
        return weight_norm.problems(self, "nn.initializers.constant")

    @nn.nowrap
    def _axes(self, leaf: Leaf) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The feature axes of ``leaf`` (one norm and scale each) and the axes reduced."""
        return weight_norm.axes(
            _describe(self), leaf.path, tuple(jnp.shape(leaf.value)), self.feature_axes
        )

    def transform(self, leaf: Leaf) -> jax.Array:
        value = jnp.asarray(leaf.value)
        feature_axes, reduction_axes = self._axes(leaf)
        weight_norm.warn_if_elementwise(
            _describe(self), leaf.path, value.shape, self.feature_axes, reduction_axes
        )
        inputs = [leaf.value]
        scale = None
        if self.use_scale:
            scale_name = f"{leaf.path}/scale"
            legacy_name = f"{leaf.path}/value/scale"
            if leaf.metadata is not None and self.has_variable("params", legacy_name):
                # flax's WeightNorm names the scale of a boxed kernel ".../value/scale".
                scale_name = legacy_name

            def init(key: jax.Array, shape: Any, dtype: Any) -> Any:
                return leaf.box_like(self.scale_init(key, shape, dtype), feature_axes)

            reduced_shape = [value.shape[axis] for axis in feature_axes]
            scale = self.param(scale_name, init, reduced_shape, self.param_dtype)
            inputs.append(scale)
        dtype = canonicalize_dtype(*inputs, dtype=self.dtype)
        return weight_norm.normalized(
            value, scale, feature_axes, reduction_axes, self.epsilon, dtype
        )

    def invert(self, leaf: Leaf) -> Inverse:
        # Salimans & Kingma's reparametrisation of a given weight w: v = w and g = ||w||,
        # so that g * v / ||v|| gives w back to rounding.
        value = jnp.asarray(leaf.value)
        _, reduction_axes = self._axes(leaf)
        if not self.use_scale:
            return Inverse(
                value,
                caveat=f"{_describe(self)} has use_scale=False: it reproduces only weights "
                f"of unit norm over the axes {reduction_axes}; build it with use_scale=True "
                "to keep the pretrained norms as scales.",
            )
        scale = weight_norm.scale_of(value, reduction_axes, self.epsilon)
        return Inverse(value, {"params": {f"{leaf.path}/scale": scale}})
