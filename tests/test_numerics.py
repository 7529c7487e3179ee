"""The shared numerics against numpy (float64 ground truth), in every floating dtype.

Expected values come from numpy in float64 (``np.linalg.norm``, ``np.linalg.svd``) or are
exact by construction; tolerances are a few roundings of the dtype under test, never the
last bit of an XLA result (CPUs differ: AVX-512's rsqrt is not correctly rounded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrapkit._numerics import (
    compute_dtype,
    l2_normalize,
    norm_floor,
    power_iteration,
    spectral_normalize,
)

REAL = [jnp.float32, jnp.bfloat16, jnp.float16]
REAL_IDS = ["float32", "bfloat16", "float16"]
ALL = [*REAL, jnp.complex64]
ALL_IDS = [*REAL_IDS, "complex64"]


def tolerance(dtype: Any) -> float:
    """A few roundings of ``dtype``: what casting a float32 result to it may cost."""
    return 4 * float(jnp.finfo(dtype).eps)


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request: pytest.FixtureRequest) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return request.param


def random(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """Normal values in ``dtype``, made by numpy, returned as float64/complex128."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        values = values + 1j * rng.standard_normal(shape)
    # Round to the dtype once, so that numpy's ground truth sees the same inputs.
    return np.asarray(jnp.asarray(values, dtype)).astype(values.dtype)


def numpy_l2_normalize(x: np.ndarray, axis: Any, eps: float) -> np.ndarray:
    squared = np.sum(np.abs(x) ** 2, axis=axis, keepdims=True)
    return x / np.sqrt(squared + eps)


# -- compute_dtype, norm_floor ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (jnp.float16, jnp.float32),
        (jnp.bfloat16, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.complex64, jnp.complex64),
    ],
    ids=["float16", "bfloat16", "float32", "complex64"],
)
def test_compute_dtype_is_at_least_float32(dtype: Any, expected: Any) -> None:
    assert compute_dtype(dtype) == jnp.dtype(expected)


def test_norm_floor_clamps_only_float16() -> None:
    # float16's smallest normal number is 2**-14; bfloat16 has float32's range.
    assert norm_floor(jnp.float16) == 2.0**-28
    assert norm_floor(jnp.bfloat16) is None
    assert norm_floor(jnp.float32) is None
    assert norm_floor(jnp.complex64) is None


# -- l2_normalize -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("axis", [None, 0, (0, 2)], ids=["all", "0", "(0,2)"])
def test_l2_normalize_matches_numpy(variant: Any, dtype: Any, axis: Any) -> None:
    x = random((3, 4, 2), dtype)
    y = variant(lambda a: l2_normalize(a, axis=axis))(jnp.asarray(x, dtype))
    assert y.dtype == jnp.dtype(dtype)
    expected = numpy_l2_normalize(x, axis, 1e-12)
    tol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(y).astype(expected.dtype), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
def test_l2_normalize_keeps_precision_when_asked(dtype: Any) -> None:
    x = random((4, 3), dtype)
    y = l2_normalize(jnp.asarray(x, dtype), axis=0, dtype=compute_dtype(dtype))
    assert y.dtype == compute_dtype(dtype)
    # Computed in float32 from inputs exact in float32: float32's tolerance, not the dtype's.
    np.testing.assert_allclose(
        np.asarray(y).astype(x.dtype), numpy_l2_normalize(x, 0, 1e-12), rtol=1e-6, atol=1e-6
    )


def test_float32_is_flaxs_operations_in_flaxs_order() -> None:
    """What makes float32 outputs agree with flax's to the last bit on any machine."""
    from flax.linen.normalization import _l2_normalize as flax_l2_normalize

    x = jnp.ones((4, 3))
    ours = jax.make_jaxpr(lambda a: l2_normalize(a, axis=(0,), eps=1e-12))(x)
    theirs = jax.make_jaxpr(lambda a: flax_l2_normalize(a, axis=(0,), eps=1e-12))(x)
    assert str(ours) == str(theirs)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("scale", [0.0, 1e-4], ids=["zero", "tiny"])
def test_small_low_precision_vectors_give_finite_values_and_gradients(
    variant: Any, dtype: Any, scale: float
) -> None:
    x = jnp.asarray(scale * random((4, 3), jnp.float32), dtype)

    def loss(a: jax.Array) -> jax.Array:
        return l2_normalize(a, axis=0).astype(jnp.float32).sum()

    value, grad = variant(jax.value_and_grad(loss))(x)
    assert grad.dtype == jnp.dtype(dtype)
    chex.assert_tree_all_finite((value, grad))


def test_flax_gives_nan_for_a_float16_zero_vector() -> None:
    """Regression: flax sums the squares in float16, where epsilon=1e-12 is zero."""
    from flax.linen.normalization import _l2_normalize as flax_l2_normalize

    x = jnp.zeros((4, 3), jnp.float16)
    assert bool(jnp.isnan(flax_l2_normalize(x, axis=0)).all())
    chex.assert_trees_all_equal(l2_normalize(x, axis=0), x)  # 0 * a finite number: exact


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_l2_normalize_does_not_depend_on_the_scale_of_its_input(dtype: Any) -> None:
    x = random((8, 3), jnp.float32, seed=3)
    y = l2_normalize(jnp.asarray(x, dtype), axis=0)
    small = l2_normalize(jnp.asarray(1e-3 * x, dtype), axis=0)
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(small, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol
    )


def test_zero_vector_gradient_is_one_over_sqrt_eps() -> None:
    # d/dx (x / sqrt(|x|**2 + eps)) at x = 0 is 1 / sqrt(eps); eps = 2**-20 makes it 2**10.
    grad = jax.grad(lambda a: l2_normalize(a, eps=2.0**-20)[0])(jnp.zeros(3))
    np.testing.assert_allclose(grad, [2.0**10, 0.0, 0.0], rtol=1e-6)


# -- power_iteration, spectral_normalize ----------------------------------------------------


@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)], ids=["tall", "wide", "square"])
def test_sigma_converges_to_the_largest_singular_value(
    variant: Any, dtype: Any, shape: tuple[int, int]
) -> None:
    matrix = random(shape, dtype, seed=1)
    u0 = jnp.asarray(random((1, shape[1]), jnp.float32, seed=2), dtype)

    def run(w: jax.Array, u: jax.Array) -> tuple[jax.Array, ...]:
        u, v = power_iteration(w, u, n_steps=100, eps=1e-12)
        return (u, v, *spectral_normalize(w, u, v))

    u, v, normalised, sigma = variant(run)(jnp.asarray(matrix, dtype), u0)
    assert u.dtype == v.dtype == compute_dtype(dtype)
    assert normalised.dtype == jnp.dtype(dtype)
    assert sigma.dtype == jnp.float32  # real, also for a complex matrix
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    # The gap between the top two singular values sets the convergence; 100 steps suffice
    # for these seeds to well below float32's tolerance.
    np.testing.assert_allclose(float(sigma), singular_values[0], rtol=1e-5)
    top = np.linalg.svd(np.asarray(normalised).astype(matrix.dtype), compute_uv=False)[0]
    np.testing.assert_allclose(top, 1.0, rtol=tolerance(dtype))


@pytest.mark.parametrize("dtype", ALL, ids=ALL_IDS)
def test_zero_matrix_has_sigma_zero_and_stays_zero(variant: Any, dtype: Any) -> None:
    matrix = jnp.zeros((3, 2), dtype)

    def run(w: jax.Array) -> tuple[jax.Array, ...]:
        u, v = power_iteration(w, jnp.ones((1, 2), dtype), n_steps=2, eps=1e-12)
        return (u, v, *spectral_normalize(w, u, v))

    u, v, normalised, sigma = variant(run)(matrix)
    # Zero times finite numbers, divided by 1: exact by construction.
    chex.assert_trees_all_equal((u, v, normalised), (0 * u, 0 * v, matrix))
    assert float(sigma) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_tiny_low_precision_matrix_gives_its_sigma(dtype: Any) -> None:
    """1e-4 * W: float16 cannot hold the squares, float32 can."""
    matrix = jnp.asarray(1e-4 * random((4, 3), jnp.float32, seed=4), dtype)
    u, v = power_iteration(matrix, jnp.ones((1, 3), dtype), n_steps=100, eps=1e-12)
    normalised, sigma = spectral_normalize(matrix, u, v)
    chex.assert_tree_all_finite((u, v, normalised, sigma))
    exact = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0]
    # eps=1e-12 is a part in 1e5 of these squared norms (about 1e-7): it shows at 1e-5.
    np.testing.assert_allclose(float(sigma), exact, rtol=1e-4)
