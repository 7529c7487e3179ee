"""Weight fake quantisation (Jacob et al., https://arxiv.org/abs/1712.05877), both APIs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from .._numerics import fake_quantize
from .._problems import feature_axes_error, is_bool, is_index, reduction_axes_checked

# No integer format wider than int16 is used for quantised weights, and a finer grid is
# below the precision of float16 and bfloat16 weights (2**-11 and 2**-8 relative).
MAX_BITS = 16


def real_dtype_error(value: Any) -> str | None:
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


def problems(options: Any) -> list[str]:
    """Problems with a FakeQuant's options (``bits``, ``symmetric``, ``feature_axes``,
    ``dtype``), one sentence each."""
    found = []
    bits = options.bits
    if not is_index(bits):
        found.append(
            f"bits must be an int from 2 to {MAX_BITS}, got {bits!r} "
            f"({type(bits).__name__}). Pass e.g. bits=8."
        )
    elif bits < 2:
        found.append(
            f"bits must be an int from 2 to {MAX_BITS}, got {bits}: a symmetric 1-bit grid "
            "holds only the integer 0. Pass e.g. bits=8, or bits=2 for ternary weights "
            "(-1, 0, 1 times the scale)."
        )
    elif bits > MAX_BITS:
        found.append(
            f"bits must be an int from 2 to {MAX_BITS}, got {bits}: no integer format wider "
            "than int16 is used for quantised weights, and a finer grid is below the "
            f"precision of float16 and bfloat16 weights. Pass bits={MAX_BITS} at most, or "
            "leave the layer unwrapped."
        )
    if not is_bool(options.symmetric):
        found.append(
            f"symmetric must be True or False, got {options.symmetric!r}. Pass "
            "symmetric=False for an asymmetric (min/max, zero-point) grid."
        )
    if (error := feature_axes_error(options.feature_axes, "one grid per variable")) is not None:
        found.append(error)
    if (error := real_dtype_error(options.dtype)) is not None:
        found.append(error)
    return found


def reduction(
    subject: str, path: str, shape: tuple[int, ...], dtype: Any, feature_axes: Any
) -> tuple[int, ...]:
    """The axes one grid of a variable of ``shape`` and ``dtype`` spans: all but
    ``feature_axes``.

    Raises, naming ``subject`` and ``path``: TypeError for a complex variable; ValueError
    when ``feature_axes`` is out of range for it or leaves no axis to take a grid over.
    """
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{subject}: {path!r} is {jnp.dtype(dtype)}, but fake quantisation needs real "
            "weights. Leave it out of variable_filter."
        )
    return reduction_axes_checked(
        subject,
        path,
        shape,
        feature_axes,
        # Each element would span its own grid and come out as it went in.
        over="take a grid over",
        otherwise="so each element would be a grid of its own and stay unquantised",
        none_gives="one grid per variable",
        none_fix="one grid over it",
    )


def quantized(
    subject: str,
    path: str,
    raw: Any,
    feature_axes: Any,
    bits: int,
    symmetric: bool,
    dtype: Any,
) -> jax.Array:
    """``raw`` on its ``bits``-bit grids (one over ``reduction``'s axes per index of
    ``feature_axes``), with the straight-through gradient of ``fake_quantize``, cast once
    to ``dtype`` (the weight's when ``None``)."""
    value = jnp.asarray(raw)
    axes = reduction(subject, path, value.shape, value.dtype, feature_axes)
    # The grid and the rounding run in at least float32; the result is cast once.
    dtype = canonicalize_dtype(raw, dtype=dtype)
    return fake_quantize(value, bits, symmetric=symmetric, axis=axes, dtype=dtype)


def inverse_caveat(bits: int) -> str:
    """Why the inverse (the raw weight is the pretrained one) can be inexact.

    The grid is taken from the weights themselves, so a weight on its own grid (a folded
    FakeQuant model) comes back exactly, and any other is quantised on the next call.
    """
    return (
        f"FakeQuant({bits} bits) reproduces only weights that lie on their own "
        "quantisation grid; pass exact=False to start quantisation-aware training "
        "from float weights."
    )
