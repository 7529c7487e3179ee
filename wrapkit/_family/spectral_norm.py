"""Spectral normalisation (Miyato et al., https://arxiv.org/abs/1802.05957), both APIs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from .._numerics import compute_dtype, power_iteration, spectral_normalize
from .._problems import dtype_error, epsilon_error, is_bool, is_index


def problems(options: Any) -> list[str]:
    """Problems with a SpectralNorm's options (``n_steps``, ``epsilon``,
    ``error_on_non_matrix``, ``dtype``, ``param_dtype``), one sentence each."""
    found = []
    if not (is_index(options.n_steps) and options.n_steps >= 0):
        found.append(
            f"n_steps must be a non-negative int (0 disables it), got {options.n_steps!r} "
            f"({type(options.n_steps).__name__}). Pass e.g. n_steps=1."
        )
    if (error := epsilon_error(options.epsilon)) is not None:
        found.append(error)
    if not is_bool(options.error_on_non_matrix):
        found.append(
            f"error_on_non_matrix must be True or False, got {options.error_on_non_matrix!r}. "
            "Pass True to refuse kernels of more than two dimensions, False to flatten them."
        )
    dtype_errors = (
        dtype_error("dtype", options.dtype, optional=True),
        dtype_error("param_dtype", options.param_dtype, optional=False),
    )
    return found + [error for error in dtype_errors if error is not None]


def normalises(value: Any, n_steps: int) -> bool:
    """Whether SpectralNorm changes ``value``: vectors and scalars pass unchanged, and
    ``n_steps=0`` disables it; no statistics are kept for those."""
    return bool(jnp.ndim(value) >= 2 and n_steps >= 1)


def check_matrix(
    subject: str, path: str, shape: tuple[int, ...], error_on_non_matrix: bool
) -> None:
    """Refuses a variable of more than two dimensions with ``error_on_non_matrix``; without
    it, such a variable is normalised as the matrix ``(-1, shape[-1])``."""
    if len(shape) > 2 and error_on_non_matrix:
        raise ValueError(
            f"{subject}: {path!r} has {len(shape)} dimensions {shape}, but "
            "error_on_non_matrix=True. Pass error_on_non_matrix=False to normalise it as a "
            f"matrix of shape {(-1, shape[-1])}, or exclude it with variable_filter."
        )


def u_dtype(value: Any, param_dtype: Any) -> Any:
    """The dtype of ``u``: ``param_dtype``, complex for a complex weight (its singular
    vectors are complex, whatever ``param_dtype`` says)."""
    if jnp.iscomplexobj(value):
        return jnp.promote_types(param_dtype, jnp.complex64)
    return param_dtype


def normalized(
    value: jax.Array, u: jax.Array, n_steps: int, epsilon: float, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``value / sigma(value)`` from the stored ``u``, and the new ``u`` and ``sigma``.

    ``value`` has two or more dimensions (normalised as the matrix ``(-1, shape[-1])``, see
    ``check_matrix``) and ``n_steps >= 1``; ``u`` has shape ``(1, shape[-1])``. Power
    iteration, ``sigma`` and the division run in at least float32 (see ``_numerics``); in
    float32 these are flax's operations in flax's order.

    Args:
        value: the weight.
        u: the stored right singular vector estimate.
        n_steps: power-iteration steps.
        epsilon: added to squared norms in the power iteration.
        dtype: the ``dtype`` option (``None`` to infer).

    Returns:
        ``(normalised, u, sigma)``: the normalised weight in ``value``'s shape, of the dtype
        inferred from ``value`` and ``u`` (as flax); the statistics in the dtype of ``u``
        and ``value`` together (``sigma`` real).
    """
    shape = value.shape
    matrix = jnp.reshape(value, (-1, shape[-1]))
    result_dtype = canonicalize_dtype(value, u, dtype=dtype)
    stats_dtype = jnp.result_type(u, value)
    new_u, v = power_iteration(matrix, u, n_steps, epsilon)
    normalised, sigma = spectral_normalize(matrix, new_u, v, dtype=result_dtype)
    return (
        normalised.reshape(shape),
        new_u.astype(stats_dtype),
        sigma.astype(jnp.finfo(stats_dtype).dtype),
    )


def fixed_point(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``u`` and ``sigma`` that power iteration on ``value`` converges to, from the SVD.

    The SVD gives that fixed point exactly, also where power iteration converges slowly
    (close top singular values): from it, the forward's ``n_steps`` find ``sigma`` at once.
    In row-vector form ``u`` is the conjugate of the top right singular vector, shape
    ``(1, shape[-1])``, and ``sigma`` the top singular value; both in the compute dtype.
    """
    matrix = value.reshape(-1, value.shape[-1]).astype(compute_dtype(value.dtype))
    _, singular_values, vh = jnp.linalg.svd(matrix, full_matrices=False)
    return jnp.conj(vh[:1]), singular_values[0]
