"""Weight normalisation (Salimans & Kingma, https://arxiv.org/abs/1602.07868)."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype, Initializer

from .._numerics import canonical_axes, compute_dtype, l2_normalize, norm_floor
from .._problems import dtype_error, epsilon_error, feature_axes_error, is_bool
from .._warnings import warn
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
        problems = []
        if (error := feature_axes_error(self.feature_axes, "one norm over all axes")) is not None:
            problems.append(error)
        if (error := epsilon_error(self.epsilon)) is not None:
            problems.append(error)
        if not is_bool(self.use_scale):
            problems.append(
                f"use_scale must be True or False, got {self.use_scale!r}. Pass "
                "use_scale=False for unit-norm weights without a learned scale."
            )
        if not callable(self.scale_init):
            constant = (
                self.scale_init
                if isinstance(self.scale_init, numbers.Real)
                and not isinstance(self.scale_init, bool)
                else 1.0
            )
            problems.append(
                "scale_init must be an initializer called as scale_init(key, shape, dtype) "
                f"-> array, got {self.scale_init!r} ({type(self.scale_init).__name__}). For a "
                f"constant scale, pass scale_init=nn.initializers.constant({constant!r})."
            )
        dtype_errors = (
            dtype_error("dtype", self.dtype, optional=True),
            dtype_error("param_dtype", self.param_dtype, optional=False),
        )
        return problems + [error for error in dtype_errors if error is not None]

    @nn.nowrap
    def _axes(self, leaf: Leaf) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The feature axes of ``leaf`` (one norm and scale each) and the axes reduced."""
        ndim = jnp.ndim(leaf.value)
        if self.feature_axes is None:
            feature_axes: tuple[int, ...] = ()
        else:
            found = canonical_axes(ndim, self.feature_axes)
            if found is None:
                raise ValueError(
                    f"{_describe(self)}: feature_axes="
                    f"{self.feature_axes!r} is out of range for {leaf.path!r} of shape "
                    f"{jnp.shape(leaf.value)}. Use axes in [{-ndim}, {ndim - 1}], or "
                    "feature_axes=None for one norm over all axes."
                )
            feature_axes = found
        return feature_axes, tuple(axis for axis in range(ndim) if axis not in feature_axes)

    def transform(self, leaf: Leaf) -> jax.Array:
        value = jnp.asarray(leaf.value)
        feature_axes, reduction_axes = self._axes(leaf)
        scale_name = f"{leaf.path}/scale"
        if not reduction_axes:
            # Normalising each element by its own magnitude leaves sign(x): flax (and torch's
            # weight_norm) define it so, and checkpoints depend on it; say so instead.
            warn(
                f"{_describe(self)}: {leaf.path!r} of shape "
                f"{value.shape} has no axis to normalise over (feature_axes="
                f"{self.feature_axes!r} covers all its axes), so it becomes sign(value) * "
                "scale, as in flax. To keep it as it is, leave it out of variable_filter "
                "(e.g. {'kernel'}); for one norm over all axes, use feature_axes=None."
            )

        feature_shape = [1] * value.ndim
        for axis in feature_axes:
            feature_shape[axis] = value.shape[axis]
        # The norm runs in at least float32 and the result is cast once, at the end
        # (see _numerics); in float32 these are flax's operations in flax's order.
        value_bar = l2_normalize(
            value, axis=reduction_axes, eps=self.epsilon, dtype=compute_dtype(value.dtype)
        )
        inputs = [leaf.value]
        if self.use_scale:
            legacy_name = f"{leaf.path}/value/scale"
            if leaf.metadata is not None and self.has_variable("params", legacy_name):
                # flax's WeightNorm names the scale of a boxed kernel ".../value/scale".
                scale_name = legacy_name

            def init(key: jax.Array, shape: Any, dtype: Any) -> Any:
                return leaf.box_like(self.scale_init(key, shape, dtype), feature_axes)

            reduced_shape = [value.shape[axis] for axis in feature_axes]
            scale = self.param(scale_name, init, reduced_shape, self.param_dtype)
            scale = scale.reshape(feature_shape)
            value_bar *= scale
            inputs.append(scale)
        return jnp.asarray(value_bar, canonicalize_dtype(*inputs, dtype=self.dtype))

    def invert(self, leaf: Leaf) -> Inverse:
        # Salimans & Kingma's reparametrisation of a given weight w: v = w and g = ||w||,
        # the norm exactly as transform divides by it (epsilon, float16 floor), so that
        # g * v / ||v|| gives w back to rounding.
        value = jnp.asarray(leaf.value)
        _, reduction_axes = self._axes(leaf)
        if not self.use_scale:
            return Inverse(
                value,
                caveat=f"{_describe(self)} has use_scale=False: it reproduces only weights "
                f"of unit norm over the axes {reduction_axes}; build it with use_scale=True "
                "to keep the pretrained norms as scales.",
            )
        wide = value.astype(compute_dtype(value.dtype))
        squared_norm = jnp.real(wide * jnp.conj(wide)).sum(axis=reduction_axes)
        floor = norm_floor(value.dtype)
        if floor is not None:
            squared_norm = jnp.maximum(squared_norm, floor)
        scale = jnp.sqrt(squared_norm + self.epsilon)
        return Inverse(value, {"params": {f"{leaf.path}/scale": scale}})
