"""Array functions shared by the Linen and NNX wrappers.

The operations are written in the same order as flax's own WeightNorm and SpectralNorm so that
outputs agree to the last bit on the same variables, which is what lets checkpoints move
between flax's classes and wrapkit's.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import SupportsIndex

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int | Sequence[int] | None = None, eps: float = 1e-12):
    """``x / sqrt(sum(x**2) + eps)`` over ``axis`` (all axes when ``None``).

    ``eps`` keeps a zero vector finite, output and gradient both: the result is 0 and the
    gradient ``rsqrt(eps)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import l2_normalize
        >>> l2_normalize(jnp.array([3.0, 4.0]))
        Array([0.6, 0.8], dtype=float32)
    """
    axis = tuple(axis) if isinstance(axis, Sequence) else axis
    return x * jax.lax.rsqrt((x * x).sum(axis=axis, keepdims=True) + eps)


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

    Args:
        matrix: shape ``(m, n)``.
        u: the previous right singular vector estimate, shape ``(1, n)``.
        n_steps: number of iterations, at least 1.
        eps: added to squared norms before the reciprocal square root.

    Returns:
        ``(u, v)`` of shapes ``(1, n)`` and ``(1, m)``, with gradients stopped, as in
        Miyato et al. (https://arxiv.org/abs/1802.05957).
    """
    v = u
    for _ in range(n_steps):
        v = l2_normalize(jnp.matmul(u, matrix.transpose([1, 0])), eps=eps)
        u = l2_normalize(jnp.matmul(v, matrix), eps=eps)
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)


def spectral_normalize(
    matrix: jax.Array, u: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``matrix / sigma`` with ``sigma = v @ matrix @ u.T``; a zero ``sigma`` divides by 1.

    Returns:
        ``(normalised matrix, sigma)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import power_iteration, spectral_normalize
        >>> w = jnp.diag(jnp.array([4.0, 1.0]))
        >>> u, v = power_iteration(w, jnp.array([[1.0, 0.5]]), n_steps=20, eps=1e-12)
        >>> float(spectral_normalize(w, u, v)[1])
        4.0
    """
    sigma = jnp.matmul(jnp.matmul(v, matrix), jnp.transpose(u))[0, 0]
    return matrix / jnp.where(sigma != 0, sigma, 1), sigma
