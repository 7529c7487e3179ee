"""Array functions shared by the Linen and NNX wrappers, and checks of their options.

In float32 the operations are written in the same order as flax's own WeightNorm and
SpectralNorm, so that outputs agree to the last bit on the same variables, which is what lets
checkpoints move between flax's classes and wrapkit's.

Below float32 they deliberately do not: flax sums the squares of a float16 or bfloat16
kernel in that dtype, where ``epsilon=1e-12`` is zero and the squares of a small kernel
underflow, so a zero or small kernel gives NaN. Here every norm, power iteration and
``sigma`` runs in at least float32 (``compute_dtype``) and the result is cast back once.

Complex arrays are handled: ``|x|^2`` is the real part of ``x * conj(x)``, the power
iteration uses the conjugate transpose, and ``sigma`` is real.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> np.dtype[Any]:
    """The dtype a norm of ``dtype`` values is computed in: ``dtype``, at least float32.

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import compute_dtype
        >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.float32), compute_dtype(jnp.complex64)
        (dtype('float32'), dtype('float32'), dtype('complex64'))
    """
    return jnp.promote_types(dtype, jnp.float32)


def norm_floor(dtype: Any) -> float | None:
    """The least squared norm ``l2_normalize`` divides ``dtype`` values by, or ``None``.

    That is ``tiny**2``, where ``tiny`` is the dtype's smallest normal number; ``None`` where
    it is below the range of the compute dtype, so there is nothing to clamp.

    The gradient of ``x / sqrt(|x|**2 + eps)`` at ``x = 0`` is ``1 / sqrt(eps)``, and it is
    cast to ``x``'s dtype: for float16 and ``eps=1e-12`` that is ``1e6``, which overflows
    (float16 ends at 65504). Clamping the squared norm at ``tiny**2`` (as torch's
    ``F.normalize`` clamps the norm at its ``eps``) makes it at most ``1 / tiny``, 16384 in
    float16. A vector of norm ``tiny`` (6.1e-5) or more is unchanged by it; a smaller one is
    divided by ``tiny`` instead of its norm, so it comes out shorter than unit length. Only
    float16 needs it: bfloat16 has float32's range.

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import norm_floor
        >>> norm_floor(jnp.float16) == 2.0**-28, norm_floor(jnp.bfloat16), norm_floor(jnp.float32)
        (True, None, None)
    """
    floor = float(jnp.finfo(dtype).tiny) ** 2
    return floor if floor >= float(jnp.finfo(compute_dtype(dtype)).tiny) else None


def _squared_magnitude(x: jax.Array) -> jax.Array:
    # For real x, conj and real emit no operation: the float32 path is flax's x * x.
    return jnp.real(x * jnp.conj(x))


def l2_normalize(
    x: jax.Array,
    axis: int | Sequence[int] | None = None,
    eps: float = 1e-12,
    *,
    dtype: Any = None,
) -> jax.Array:
    """``x / sqrt(sum(|x|**2) + eps)`` over ``axis`` (all axes when ``None``).

    The sum runs in ``compute_dtype`` (at least float32). For float16 ``x`` the squared
    norm is first clamped at ``norm_floor``, so that the gradient at zero is finite in
    float16. A zero vector stays finite, output and gradient both: the result is 0 and the
    gradient ``1 / sqrt(eps)`` (``1 / sqrt(floor + eps)`` in float16).

    Args:
        x: a real or complex array.
        axis: the axes to take the norm over; ``None`` for all.
        eps: added to the squared norm before the reciprocal square root.
        dtype: the dtype of the result; default ``x``'s. Pass the compute dtype to keep
            the full precision for further arithmetic, and cast once at the end.

    Returns:
        ``x`` scaled to unit norm along ``axis``.

    Examples:
        The last bits of an inexact result depend on the CPU's reciprocal square root, so
        the examples round with numpy (correctly rounded on every machine):

        >>> import jax.numpy as jnp, numpy as np
        >>> from wrapkit._numerics import l2_normalize
        >>> np.round(np.asarray(l2_normalize(jnp.array([3.0, 4.0]))), 6)
        array([0.6, 0.8], dtype=float32)
        >>> np.round(np.asarray(l2_normalize(jnp.array([3j, 4.0]))), 6)
        array([0. +0.6j, 0.8+0.j ], dtype=complex64)

        A zero vector stays finite, and so does a small float16 one whose squares are
        below float16's smallest number (about 6e-8), so a float16 sum of them is zero:

        >>> l2_normalize(jnp.zeros(2, jnp.float16))
        Array([0., 0.], dtype=float16)
        >>> y = l2_normalize(jnp.array([4.7e-5, 6.25e-5], jnp.float16))
        >>> np.round(np.asarray(y, np.float32), 2)
        array([0.6, 0.8], dtype=float32)
    """
    axis = tuple(axis) if isinstance(axis, Sequence) else axis
    x = jnp.asarray(x)
    wide = x.astype(compute_dtype(x.dtype))
    squared_norm = _squared_magnitude(wide).sum(axis=axis, keepdims=True)
    floor = norm_floor(x.dtype)
    if floor is not None:
        squared_norm = jnp.maximum(squared_norm, floor)
    out = wide * jax.lax.rsqrt(squared_norm + eps)
    return out.astype(x.dtype if dtype is None else dtype)


def canonical_axes(
    ndim: int, axes: SupportsIndex | Sequence[SupportsIndex]
) -> tuple[int, ...] | None:
    """``axes`` of an ``ndim``-array, non-negative, sorted and unique; ``None`` if out of range."""
    indices = [operator.index(axis) for axis in (axes if isinstance(axes, Sequence) else [axes])]
    if any(not -ndim <= axis < ndim for axis in indices):
        return None
    return tuple(sorted({axis % ndim for axis in indices}))


def power_iteration(
    matrix: jax.Array, u: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array]:
    """``n_steps`` of power iteration for the top singular vectors of a 2-D ``matrix``.

    Miyato et al. (https://arxiv.org/abs/1802.05957), Algorithm 1, in row-vector form:
    ``v = u @ matrix.T`` and ``u = v @ conj(matrix)``, each normalised; for a complex matrix
    that is the conjugate transpose, and ``u``, ``v`` converge to the top right and left
    singular vectors. The iteration runs in the ``compute_dtype`` of ``matrix`` and ``u``
    (at least float32), and returns in it.

    Args:
        matrix: shape ``(m, n)``, real or complex.
        u: the previous right singular vector estimate, shape ``(1, n)``.
        n_steps: number of iterations, at least 1.
        eps: added to squared norms before the reciprocal square root.

    Returns:
        ``(u, v)`` of shapes ``(1, n)`` and ``(1, m)``, with gradients stopped.
    """
    dtype = compute_dtype(jnp.result_type(matrix, u))
    matrix, u = matrix.astype(dtype), u.astype(dtype)
    v = u
    for _ in range(n_steps):
        v = l2_normalize(jnp.matmul(u, matrix.transpose([1, 0])), eps=eps)
        u = l2_normalize(jnp.matmul(v, jnp.conj(matrix)), eps=eps)
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)


def spectral_normalize(
    matrix: jax.Array, u: jax.Array, v: jax.Array, *, dtype: Any = None
) -> tuple[jax.Array, jax.Array]:
    """``matrix / sigma``, ``sigma = real(conj(v) @ matrix @ u.T)``; a zero sigma divides by 1.

    ``sigma`` and the division run in ``compute_dtype`` (at least float32); the normalised
    matrix is cast once, to ``dtype``.

    Args:
        matrix: shape ``(m, n)``, real or complex.
        u: the right singular vector estimate from ``power_iteration``, shape ``(1, n)``.
        v: the left one, shape ``(1, m)``.
        dtype: the dtype of the normalised matrix; default ``matrix``'s.

    Returns:
        ``(normalised matrix, sigma)``; ``sigma`` is real, in the compute dtype's precision.

    Examples:
        Power iteration converges to the largest singular value, here 4 (rounded: the last
        bits depend on the CPU's reciprocal square root):

        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import power_iteration, spectral_normalize
        >>> w = jnp.diag(jnp.array([4.0, 1.0]))
        >>> u, v = power_iteration(w, jnp.array([[1.0, 0.5]]), n_steps=20, eps=1e-12)
        >>> round(float(spectral_normalize(w, u, v)[1]), 5)
        4.0
        >>> w = jnp.diag(jnp.array([4j, 1.0]))  # singular values 4 and 1
        >>> u, v = power_iteration(w, jnp.array([[1.0, 0.5]]), n_steps=20, eps=1e-12)
        >>> round(float(spectral_normalize(w, u, v)[1]), 5)
        4.0

        A zero matrix has ``sigma = 0`` and stays zero, in any dtype:

        >>> w = jnp.zeros((2, 2), jnp.float16)
        >>> u, v = power_iteration(w, jnp.ones((1, 2), jnp.float16), n_steps=1, eps=1e-12)
        >>> normalised, sigma = spectral_normalize(w, u, v)
        >>> normalised.dtype, float(sigma), float(abs(normalised).max())
        (dtype('float16'), 0.0, 0.0)
    """
    wide = compute_dtype(jnp.result_type(matrix, u, v))
    sigma = jnp.real(jnp.matmul(jnp.matmul(jnp.conj(v), matrix.astype(wide)), jnp.transpose(u)))
    sigma = sigma[0, 0]
    normalised = matrix.astype(wide) / jnp.where(sigma != 0, sigma, 1)
    return normalised.astype(matrix.dtype if dtype is None else dtype), sigma
