"""Weight normalisation (Salimans & Kingma, https://arxiv.org/abs/1602.07868), both APIs."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from .._numerics import canonical_axes, compute_dtype, l2_normalize, norm_floor
from .._problems import dtype_error, epsilon_error, feature_axes_error, is_bool
from .._warnings import warn


def problems(options: Any, constant_fix: str) -> list[str]:
    """Problems with a WeightNorm's options (``feature_axes``, ``epsilon``, ``use_scale``,
    ``scale_init``, ``dtype``, ``param_dtype``), one sentence each. ``constant_fix`` is how
    the framework spells a constant initialiser, e.g. ``"nn.initializers.constant"``."""
    found = []
    if (error := feature_axes_error(options.feature_axes, "one norm over all axes")) is not None:
        found.append(error)
    if (error := epsilon_error(options.epsilon)) is not None:
        found.append(error)
    if not is_bool(options.use_scale):
        found.append(
            f"use_scale must be True or False, got {options.use_scale!r}. Pass "
            "use_scale=False for unit-norm weights without a learned scale."
        )
    if not callable(options.scale_init):
        init = options.scale_init
        constant = init if isinstance(init, numbers.Real) and not isinstance(init, bool) else 1.0
        found.append(
            "scale_init must be an initializer called as scale_init(key, shape, dtype) "
            f"-> array, got {init!r} ({type(init).__name__}). For a "
            f"constant scale, pass scale_init={constant_fix}({constant!r})."
        )
    dtype_errors = (
        dtype_error("dtype", options.dtype, optional=True),
        dtype_error("param_dtype", options.param_dtype, optional=False),
    )
    return found + [error for error in dtype_errors if error is not None]


def axes(
    subject: str, path: str, shape: tuple[int, ...], feature_axes: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The feature axes of a variable (one norm and scale each) and the axes reduced."""
    ndim = len(shape)
    if feature_axes is None:
        features: tuple[int, ...] = ()
    else:
        found = canonical_axes(ndim, feature_axes)
        if found is None:
            raise ValueError(
                f"{subject}: feature_axes={feature_axes!r} is out of range for {path!r} of "
                f"shape {shape}. Use axes in [{-ndim}, {ndim - 1}], or feature_axes=None for "
                "one norm over all axes."
            )
        features = found
    return features, tuple(axis for axis in range(ndim) if axis not in features)


def warn_if_elementwise(
    subject: str, path: str, shape: tuple[int, ...], feature_axes: Any, reduction: tuple[int, ...]
) -> None:
    """Normalising each element by its own magnitude leaves sign(x): flax (and torch's
    weight_norm) define it so, and checkpoints depend on it; say so instead."""
    if not reduction:
        warn(
            f"{subject}: {path!r} of shape {shape} has no axis to normalise over "
            f"(feature_axes={feature_axes!r} covers all its axes), so it becomes "
            "sign(value) * scale, as in flax. To keep it as it is, leave it out of "
            "variable_filter (e.g. {'kernel'}); for one norm over all axes, use "
            "feature_axes=None."
        )


def normalized(
    value: jax.Array,
    scale: jax.Array | None,
    features: tuple[int, ...],
    reduction: tuple[int, ...],
    epsilon: float,
    dtype: Any,
) -> jax.Array:
    """``scale * value / ||value||`` over ``reduction``, cast once to ``dtype``.

    The norm runs in at least float32 (see ``_numerics``); in float32 these are flax's
    operations in flax's order. ``scale`` has the shape of the feature axes, or is ``None``.
    """
    value_bar = l2_normalize(value, axis=reduction, eps=epsilon, dtype=compute_dtype(value.dtype))
    if scale is not None:
        feature_shape = [1] * value.ndim
        for axis in features:
            feature_shape[axis] = value.shape[axis]
        value_bar *= jnp.reshape(scale, feature_shape)
    return jnp.asarray(value_bar, dtype)


def scale_of(value: jax.Array, reduction: tuple[int, ...], epsilon: float) -> jax.Array:
    """The scale ``g`` for which ``normalized(value, g, ...)`` gives ``value`` back: its norm,
    taken exactly as ``normalized`` divides by it (epsilon, float16 floor)."""
    wide = value.astype(compute_dtype(value.dtype))
    squared_norm = jnp.real(wide * jnp.conj(wide)).sum(axis=reduction)
    floor = norm_floor(value.dtype)
    if floor is not None:
        squared_norm = jnp.maximum(squared_norm, floor)
    return jnp.sqrt(squared_norm + epsilon)
