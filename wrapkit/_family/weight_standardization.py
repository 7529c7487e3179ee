"""Weight standardisation (Qiao et al., https://arxiv.org/abs/1903.10520), both APIs."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import canonicalize_dtype

from .._numerics import standardize
from .._problems import dtype_error, feature_axes_error, reduction_axes_checked


def problems(options: Any) -> list[str]:
    """Problems with a WeightStandardization's options (``epsilon``, ``feature_axes``,
    ``dtype``), one sentence each."""
    found = []
    eps = options.epsilon
    real = isinstance(eps, numbers.Real) and not isinstance(eps, bool | np.bool_)
    if not (real and math.isfinite(eps) and eps > 0):
        got = f"{eps!r}" if real else f"{eps!r} ({type(eps).__name__})"
        found.append(
            f"epsilon must be a finite positive number, got {got}: it keeps a constant "
            "weight (a zero kernel) at 0 instead of 0 / 0. Pass a float; the default, "
            "1e-10, is BiT's."
        )
    if (
        error := feature_axes_error(
            options.feature_axes, "one mean and variance over the whole variable"
        )
    ) is not None:
        found.append(error)
    if (error := dtype_error("dtype", options.dtype, optional=True)) is not None:
        found.append(error)
    return found


def reduction(
    subject: str, path: str, shape: tuple[int, ...], feature_axes: Any
) -> tuple[int, ...]:
    """The axes a variable of ``shape`` is standardised over: all but ``feature_axes``.

    Raises, naming ``subject`` and ``path``, when ``feature_axes`` is out of range for the
    variable or leaves no axis to standardise over.
    """
    return reduction_axes_checked(
        subject,
        path,
        shape,
        feature_axes,
        # Each element would be its own mean: the variable would silently become zeros.
        over="standardise over",
        otherwise="so it would become zeros",
        none_gives="one mean and variance over the whole variable",
        none_fix="one mean and variance over it",
    )


def standardized(
    subject: str, path: str, raw: Any, feature_axes: Any, epsilon: float, dtype: Any
) -> jax.Array:
    """``raw`` standardised over ``reduction``'s axes, cast once to ``dtype`` (the weight's
    when ``None``)."""
    value = jnp.asarray(raw)
    axes = reduction(subject, path, value.shape, feature_axes)
    # The moments run in at least float32; the result is cast once (see _numerics).
    return standardize(value, axis=axes, eps=epsilon, dtype=canonicalize_dtype(raw, dtype=dtype))
