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
    # For real x this is flax's x * x. (Traced, jnp.conj and jnp.real of a real array emit
    # no operation; run eagerly each copies the array, so real x skips them.)
    if not jnp.iscomplexobj(x):
        return x * x
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


def lora_scale(rank: int, alpha: float | None, *, rslora: bool = False) -> float:
    """The factor ``s`` of a LoRA delta ``s * A @ B``.

    ``alpha / rank`` (Hu et al. 2021), or ``alpha / sqrt(rank)`` for rsLoRA (Kalajdzievski
    2023, https://arxiv.org/abs/2312.03732), which keeps the update's scale stable as the rank
    grows. ``alpha=None`` means ``alpha = rank``.

    Examples:
        >>> from wrapkit._numerics import lora_scale
        >>> lora_scale(8, 16.0), lora_scale(16, 16.0, rslora=True), lora_scale(4, None)
        (2.0, 4.0, 1.0)
    """
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha / (rank**0.5 if rslora else rank)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: each element zeroed with probability ``rate``, the rest scaled by
    ``1 / (1 - rate)``, as ``flax.linen.Dropout`` does.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from wrapkit._numerics import dropout
        >>> y = dropout(jnp.ones(1000), 0.5, jax.random.key(0))
        >>> sorted({float(v) for v in y})
        [0.0, 2.0]
    """
    keep = jax.random.bernoulli(key, 1.0 - rate, jnp.shape(x))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


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


# -- weight standardisation and fake quantisation -------------------------------------------


def reduction_axes(
    ndim: int, feature_axes: SupportsIndex | Sequence[SupportsIndex] | None
) -> tuple[int, ...] | None:
    """The axes of an ``ndim``-array that are not ``feature_axes``; ``None`` if out of range.

    ``feature_axes=None`` keeps no axis apart: every axis is reduced.

    Examples:
        >>> from wrapkit._numerics import reduction_axes
        >>> reduction_axes(4, -1), reduction_axes(3, (0, -1)), reduction_axes(2, None)
        ((0, 1, 2), (1,), (0, 1))
        >>> reduction_axes(2, 2) is None
        True
    """
    if feature_axes is None:
        return tuple(range(ndim))
    kept = canonical_axes(ndim, feature_axes)
    if kept is None:
        return None
    return tuple(axis for axis in range(ndim) if axis not in kept)


def standardize(
    x: jax.Array,
    axis: int | Sequence[int] | None = None,
    eps: float = 1e-10,
    *,
    dtype: Any = None,
) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over ``axis`` (all axes when ``None``).

    Weight standardisation (Qiao et al., https://arxiv.org/abs/1903.10520) as BiT's
    ``StdConv`` computes it (Kolesnikov et al., https://arxiv.org/abs/1912.11370): the
    variance is the mean of the squared deviations from the mean (biased, in two passes),
    and ``eps`` is added to the variance, not to the standard deviation. Both moments run
    in ``compute_dtype`` (at least float32) and the result is cast once. For float16 ``x``
    the variance is first clamped at ``norm_floor``, as ``l2_normalize`` clamps the squared
    norm: the gradient at a constant ``x`` is ``1 / sqrt(var + eps)``, which for
    ``eps=1e-10`` is ``1e5``, beyond float16's 65504. A complex ``x`` has variance
    ``mean(|x - mean|**2)``.

    Args:
        x: a real or complex array.
        axis: the axes to take the mean and variance over; ``None`` for all.
        eps: added to the variance before the reciprocal square root.
        dtype: the dtype of the result; default ``x``'s.

    Returns:
        ``x`` with zero mean and unit variance along ``axis``; a constant ``x`` becomes 0.

    Examples:
        Each column is standardised on its own, whatever its scale (rounded with numpy: the
        last bits depend on the CPU's reciprocal square root):

        >>> import jax.numpy as jnp, numpy as np
        >>> from wrapkit._numerics import standardize
        >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> np.round(np.asarray(standardize(x, axis=0)), 6)
        array([[-1., -1.],
               [ 1.,  1.]], dtype=float32)

        A constant input (here zero) becomes zero, in any dtype:

        >>> standardize(jnp.zeros(3, jnp.float16))
        Array([0., 0., 0.], dtype=float16)
    """
    axis = tuple(axis) if isinstance(axis, Sequence) else axis
    x = jnp.asarray(x)
    wide = x.astype(compute_dtype(x.dtype))
    centred = wide - wide.mean(axis=axis, keepdims=True)
    variance = _squared_magnitude(centred).mean(axis=axis, keepdims=True)
    floor = norm_floor(x.dtype)
    if floor is not None:
        variance = jnp.maximum(variance, floor)
    out = centred * jax.lax.rsqrt(variance + eps)
    return out.astype(x.dtype if dtype is None else dtype)


def integer_range(bits: int, *, symmetric: bool) -> tuple[int, int]:
    """The least and the greatest integer of a ``bits``-bit grid.

    A symmetric grid leaves out ``-2**(bits - 1)``, so that it is symmetric about zero
    (``-127`` to ``127`` in 8 bits, as TensorFlow Lite's quantisation specification has
    it for weights, https://ai.google.dev/edge/litert/models/quantization_spec); an
    asymmetric one holds ``0`` to ``2**bits - 1``.

    Examples:
        >>> from wrapkit._numerics import integer_range
        >>> integer_range(8, symmetric=True), integer_range(8, symmetric=False)
        ((-127, 127), (0, 255))
        >>> integer_range(2, symmetric=True), integer_range(2, symmetric=False)
        ((-1, 1), (0, 3))
    """
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantization_grid(
    x: jax.Array, bits: int, *, symmetric: bool, axis: int | Sequence[int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """The scale and zero point of the ``bits``-bit min/max grid of ``x`` over ``axis``.

    The grid's values are ``(k - zero_point) * scale`` for the integers ``k`` of
    ``integer_range(bits, symmetric=symmetric)``:

    - symmetric: ``scale = max(|x|) / (2**(bits - 1) - 1)`` and ``zero_point = 0``;
    - asymmetric: the range ``[min(x), max(x)]`` is first widened to hold 0, so that zero
      (padding, a pruned weight) is on the grid exactly, as in Jacob et al.
      (https://arxiv.org/abs/1712.05877) and TensorFlow's and PyTorch's min/max
      observers; then ``scale = (hi - lo) / (2**bits - 1)`` and
      ``zero_point = round(-lo / scale)``.

    A zero range (a zero ``x``, a zero channel) has scale 1 instead of 0, so that dividing
    by it gives 0, not NaN. Computed in ``compute_dtype`` (at least float32) from the
    current values: the grid is stateless.

    Args:
        x: a real array.
        bits: the width of the grid's integers, at least 2.
        symmetric: a grid symmetric about zero (True) or spanning ``[min, max]`` (False).
        axis: the axes one grid spans; ``None`` for one grid over all of ``x``. Every
            index of the other axes has a grid of its own (per-channel quantisation).

    Returns:
        ``(scale, zero_point)`` in ``compute_dtype``, with the reduced axes kept (size 1)
        so that they broadcast against ``x``; ``zero_point`` holds integers.

    Raises:
        TypeError: for a complex ``x``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit._numerics import quantization_grid
        >>> x = jnp.array([[-2.0, 0.5], [1.0, 0.25]])
        >>> quantization_grid(x, 2, symmetric=True, axis=0)  # integers -1, 0, 1
        (Array([[2. , 0.5]], dtype=float32), Array([[0., 0.]], dtype=float32))
        >>> quantization_grid(jnp.array([-0.5, 0.0, 0.3, 1.0]), 2, symmetric=False)
        (Array([0.5], dtype=float32), Array([1.], dtype=float32))
        >>> quantization_grid(jnp.zeros(3), 8, symmetric=False)
        (Array([1.], dtype=float32), Array([0.], dtype=float32))
    """
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"quantization_grid needs a real array, got {x.dtype}.")
    axis = tuple(axis) if isinstance(axis, Sequence) else axis
    wide = x.astype(compute_dtype(x.dtype))
    _, highest = integer_range(bits, symmetric=symmetric)
    if symmetric:
        scale = jnp.abs(wide).max(axis=axis, keepdims=True) / highest
    else:
        low = jnp.minimum(wide.min(axis=axis, keepdims=True), 0)
        high = jnp.maximum(wide.max(axis=axis, keepdims=True), 0)
        scale = (high - low) / highest
    # Tested on the scale, not the range: a range that is not zero but whose scale
    # underflows (or is flushed to zero as a denormal) must not be divided by either.
    scale = jnp.where(scale > 0, scale, 1.0)
    if symmetric:
        return scale, jnp.zeros_like(scale)
    # |low| is -low (low <= 0), and +0 rather than -0 for a range that starts at zero.
    return scale, jnp.round(jnp.abs(low) / scale)


def fake_quantize(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool,
    axis: int | Sequence[int] | None = None,
    dtype: Any = None,
) -> jax.Array:
    """``x`` rounded to its ``bits``-bit min/max grid, with a straight-through gradient.

    Simulated quantisation for quantisation-aware training (Jacob et al.,
    https://arxiv.org/abs/1712.05877):
    ``q = (clip(round(x / scale) + zero_point, lo, hi) - zero_point) * scale``, with the
    grid of ``quantization_grid`` and the integers ``lo``, ``hi`` of ``integer_range``.
    ``round`` rounds half to even. Computed in ``compute_dtype`` (at least float32) and
    cast once.

    The gradient is the straight-through estimator (Bengio et al.,
    https://arxiv.org/abs/1308.3432) in its identity form: the result is
    ``q + (x - stop_gradient(x))`` with ``q`` computed from ``stop_gradient(x)``. Its value
    is ``q`` exactly (``x - x`` is exactly 0) and its derivative with respect to ``x`` is
    the identity, so the gradient of ``loss(fake_quantize(x))`` is the gradient of
    ``loss`` evaluated at ``q``; the grid (scale, zero point) gets none. A min/max grid
    spans every value it is made from, so nothing is clipped and the clipped estimator
    (zero gradient outside the grid's range) would give the same.

    Args:
        x: a real array.
        bits: the width of the grid's integers, at least 2.
        symmetric: a grid symmetric about zero (True) or spanning ``[min, max]`` (False).
        axis: the axes one grid spans; ``None`` for one grid over all of ``x``.
        dtype: the dtype of the result; default ``x``'s.

    Returns:
        ``x`` on its grid: ``scale`` times an integer, minus the zero point.

    Raises:
        TypeError: for a complex ``x``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from wrapkit._numerics import fake_quantize
        >>> x = jnp.array([-1.5, -0.7, 0.0, 0.8, 1.5])
        >>> fake_quantize(x, 3, symmetric=True)  # integers -3 to 3, scale 1.5 / 3
        Array([-1.5, -0.5,  0. ,  1. ,  1.5], dtype=float32)
        >>> fake_quantize(jnp.array([-0.5, 0.0, 0.3, 1.0]), 2, symmetric=False)
        Array([-0.5,  0. ,  0.5,  1. ], dtype=float32)
        >>> jax.grad(lambda x: fake_quantize(x, 3, symmetric=True).sum())(x)
        Array([1., 1., 1., 1., 1.], dtype=float32)

        A zero input stays zero (its grid has scale 1), in any dtype:

        >>> fake_quantize(jnp.zeros(3, jnp.float16), 8, symmetric=False)
        Array([0., 0., 0.], dtype=float16)
    """
    x = jnp.asarray(x)
    wide = x.astype(compute_dtype(x.dtype))
    frozen = jax.lax.stop_gradient(wide)
    scale, zero_point = quantization_grid(frozen, bits, symmetric=symmetric, axis=axis)
    lowest, highest = integer_range(bits, symmetric=symmetric)
    # Float bounds: integer ones would be converted to floats in the program.
    integers = jnp.clip(jnp.round(frozen / scale) + zero_point, float(lowest), float(highest))
    quantized = (integers - zero_point) * scale
    out = quantized + (wide - frozen)
    return out.astype(x.dtype if dtype is None else dtype)
