"""FakeQuant and its numerics: the grid against numpy, straight-through gradients, dtypes, errors.

Expected values come from numpy in float64. Rounding to the grid is where float32 and float64
may part: a value within a hair of a rounding tie (``k + 0.5`` grid steps) can round either
way. Random cases with such a value are skipped (``assume``), fixed ones assert that they
have none, so every comparison here is between the same integers.

The layers whose output on a basis is their (quantised) kernel, and the lifted-transform and
stacking checks, are shared with ``tests/test_weight_standardization.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_weight_standardization import (
    FROZEN,
    KINDS,
    LOW_PRECISION,
    LOW_PRECISION_IDS,
    SETTINGS,
    X,
    check_remat_matches_plain,
    check_scan_matches_loop,
    conv,
    dense,
    fan_in_axes,
    feature_axes_for,
    jnp_spectral_norm,
    jnp_weight_norm,
    layers,
    normal_init,
    scalar_loss,
    stacked_kernels,
    tolerance,
    transformed_kernel,
)

import wrapkit
from wrapkit._numerics import fake_quantize, integer_range, quantization_grid
from wrapkit.linen import FakeQuant, SpectralNorm, WeightNorm

BITS = [2, 8]
SYMMETRY = [True, False]
SYMMETRY_IDS = ["symmetric", "asymmetric"]


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"], scope="module")
def variant(request: pytest.FixtureRequest) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return request.param


def numpy_grid(
    w: np.ndarray, bits: int, symmetric: bool, axes: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, zero point, the zero point before rounding), from the definitions."""
    if symmetric:
        scale = np.abs(w).max(axis=axes, keepdims=True) / (2 ** (bits - 1) - 1)
        scale = np.where(scale > 0, scale, 1.0)
        return scale, np.zeros_like(scale), np.zeros_like(scale)
    low = np.minimum(w.min(axis=axes, keepdims=True), 0.0)
    high = np.maximum(w.max(axis=axes, keepdims=True), 0.0)
    scale = (high - low) / (2**bits - 1)
    scale = np.where(scale > 0, scale, 1.0)
    return scale, np.round(-low / scale), -low / scale


def numpy_fake_quantize(w: np.ndarray, bits: int, symmetric: bool, axes: Any) -> np.ndarray:
    """The quantised ``w`` in float64; asserts no value is near a rounding tie (see above)."""
    scale, zero_point, unrounded = numpy_grid(w, bits, symmetric, axes)
    assert not near_tie(w / scale) and not near_tie(unrounded), "pick data without ties"
    if symmetric:
        low, high = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    integers = np.clip(np.round(w / scale) + zero_point, low, high)
    return (integers - zero_point) * scale


def near_tie(t: np.ndarray) -> bool:
    """Some value of ``t`` is within 1e-4 of a half-integer, where float32 may round otherwise.

    float32's ``w / scale`` is off by a few ulps of at most 255: about 1e-5.
    """
    return bool(np.any(np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4))


def no_ties(w: np.ndarray, bits: int, symmetric: bool, axes: Any) -> bool:
    scale, _, unrounded = numpy_grid(w, bits, symmetric, axes)
    return not (near_tie(w / scale) or near_tie(unrounded))


def random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """0.5 + N(0, 1) rounded to float32, returned as the same numbers in float64."""
    values = 0.5 + np.random.default_rng(seed).standard_normal(shape)
    return values.astype(np.float32).astype(np.float64)


# -- numerics -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
@pytest.mark.parametrize("axis", [(0, 1, 2), None], ids=["per-channel", "per-tensor"])
def test_fake_quantize_matches_numpy(variant, bits, symmetric, axis):
    x = random((3, 3, 2, 4))
    ours = variant(lambda a: fake_quantize(a, bits, symmetric=symmetric, axis=axis))(
        jnp.asarray(x, jnp.float32)
    )
    assert ours.dtype == jnp.float32
    expected = numpy_fake_quantize(x, bits, symmetric, axis)
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected, rtol=1e-6, atol=1e-7)
    scale, zero_point = quantization_grid(
        jnp.asarray(x, jnp.float32), bits, symmetric=symmetric, axis=axis
    )
    expected_scale, expected_zero_point, _ = numpy_grid(x, bits, symmetric, axis)
    np.testing.assert_allclose(np.asarray(scale, np.float64), expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero_point, np.float64), expected_zero_point)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
@pytest.mark.parametrize("axis", [(0, 1, 2), None], ids=["per-channel", "per-tensor"])
def test_every_value_lies_on_the_grid(variant, bits, symmetric, axis):
    x = jnp.asarray(random((3, 3, 2, 4), seed=1), jnp.float32)
    q = np.asarray(variant(lambda a: fake_quantize(a, bits, symmetric=symmetric, axis=axis))(x))
    scale, zero_point = (
        np.asarray(a, np.float64)
        for a in quantization_grid(x, bits, symmetric=symmetric, axis=axis)
    )
    low, high = integer_range(bits, symmetric=symmetric)
    integers = q / scale + zero_point
    # q is (k - zero_point) * scale rounded once to float32: k within a few ulps of 255.
    np.testing.assert_allclose(integers, np.round(integers), atol=1e-4)
    k = np.round(integers)
    assert low <= k.min() and k.max() <= high
    assert np.all(zero_point == np.round(zero_point))
    assert np.all((low <= zero_point) & (zero_point <= high))
    # A min/max grid uses its ends: the largest magnitude (symmetric), or both extremes.
    reduce = (0, 1, 2, 3) if axis is None else axis
    if symmetric:
        np.testing.assert_array_equal(np.abs(k).max(axis=reduce), high)
    else:
        assert np.all(k.max(axis=reduce) == high)  # every max(x) is positive here
        negative = np.asarray(x).min(axis=reduce) < 0
        assert np.all(k.min(axis=reduce)[negative] == low)
    columns = [np.asarray(q)] if axis is None else [q[..., j] for j in range(q.shape[-1])]
    assert all(len(np.unique(column)) <= high - low + 1 for column in columns)


@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
def test_zeros_stay_exactly_zero(variant, symmetric):
    """Zero is on every grid: a zero weight, a zero channel, and zeros among others."""
    x = np.asarray(random((4, 3), seed=2))
    x[:, 1] = 0.0  # a zero channel
    x[::2, 0] = 0.0  # zeros among non-zeros
    q = variant(lambda a: fake_quantize(a, 4, symmetric=symmetric, axis=0))(jnp.asarray(x))
    chex.assert_tree_all_finite(q)
    assert np.all(np.asarray(q)[x == 0] == 0)
    zero = variant(lambda a: fake_quantize(a, 4, symmetric=symmetric, axis=None))(jnp.zeros(5))
    chex.assert_trees_all_equal(zero, jnp.zeros(5))


def test_fake_quantize_refuses_complex_arrays():
    with pytest.raises(TypeError, match=r"quantization_grid needs a real array, got complex64\."):
        fake_quantize(jnp.ones(3, jnp.complex64), 8, symmetric=True)


# -- the wrapper against numpy, on every kernel layout -------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_matches_numpy_on_every_kernel_layout(variant: Any, kind: str, data: st.DataObject):
    layer = data.draw(layers(kind), label="layer")
    rank = len(layer.kernel_shape)
    feature_axes = data.draw(feature_axes_for(rank), label="feature_axes")
    bits = data.draw(st.sampled_from(BITS), label="bits")
    symmetric = data.draw(st.booleans(), label="symmetric")
    raw, seen = transformed_kernel(
        lambda inner: FakeQuant(inner, bits, symmetric, feature_axes), layer, variant
    )
    axes = fan_in_axes(rank, feature_axes)
    assume(no_ties(raw, bits, symmetric, axes))
    expected = numpy_fake_quantize(raw, bits, symmetric, axes)
    np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=1e-7)


# -- the straight-through gradient ---------------------------------------------------------


@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
@pytest.mark.parametrize(
    ("inner", "x", "apply_plain"),
    [
        (
            nn.Dense(3, kernel_init=normal_init),
            X,
            lambda params, x: x @ params["kernel"] + params["bias"],
        ),
        (
            nn.Conv(3, (2, 2), kernel_init=normal_init),
            jax.random.normal(jax.random.key(2), (1, 4, 4, 2)),
            lambda params, x: nn.Conv(3, (2, 2)).apply({"params": params}, x),
        ),
    ],
    ids=["dense", "conv"],
)
def test_gradient_is_the_plain_models_gradient_at_the_quantised_kernel(
    variant, symmetric, inner, x, apply_plain
):
    """The straight-through estimator: d loss(q(w)) / dw is d loss / dk at k = q(w)."""
    model = FakeQuant(inner, bits=4, symmetric=symmetric)
    params = model.init(jax.random.key(0), x)["params"]
    inner_params = params["layer_instance"]
    kernel = inner_params["kernel"]
    axes = tuple(range(kernel.ndim - 1))
    quantised = numpy_fake_quantize(np.asarray(kernel, np.float64), 4, symmetric, axes)

    def loss(params):
        return scalar_loss(model.apply({"params": params}, x))

    def plain_loss(inner_params):
        return scalar_loss(apply_plain(inner_params, x))

    grads = variant(jax.grad(loss))(params)["layer_instance"]
    at_quantised = {**inner_params, "kernel": jnp.asarray(quantised, jnp.float32)}
    # The same function of the same kernel, differentiated along two programs: float32 sums.
    chex.assert_trees_all_close(grads, jax.grad(plain_loss)(at_quantised), rtol=1e-5, atol=1e-5)
    # Not the gradient at the raw kernel: the forward pass did see the quantised one.
    raw_kernel_grad = jax.grad(plain_loss)(inner_params)["kernel"]
    assert not np.allclose(grads["kernel"], raw_kernel_grad, rtol=1e-3)


# -- precision: float16, bfloat16 and zero kernels -----------------------------------------


@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_kernel_is_the_float32_result_rounded_once(variant, dtype, symmetric):
    layer = conv((2, 2), 3, 4)
    wrap = lambda inner: FakeQuant(inner, bits=8, symmetric=symmetric)  # noqa: E731
    raw, seen = transformed_kernel(wrap, layer, variant, dtype)
    # raw is the dtype's kernel, exactly: numpy quantises the same numbers in float64.
    expected = numpy_fake_quantize(raw, 8, symmetric, (0, 1, 2))
    tol = tolerance(dtype)
    np.testing.assert_allclose(seen, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("symmetric", SYMMETRY, ids=SYMMETRY_IDS)
@pytest.mark.parametrize(
    "dtype", [jnp.float32, *LOW_PRECISION], ids=["float32", *LOW_PRECISION_IDS]
)
def test_zero_kernel_gives_the_bias_and_finite_gradients(variant, dtype, symmetric):
    model = FakeQuant(nn.Dense(3, dtype=dtype, param_dtype=dtype), symmetric=symmetric)
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]["layer_instance"]
    zero = {"params": {"layer_instance": {**params, "kernel": jnp.zeros((4, 3), dtype)}}}

    def loss(variables):
        return model.apply(variables, X).astype(jnp.float32).sum()

    value, grads = variant(jax.value_and_grad(loss))(zero)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)
    assert grads["params"]["layer_instance"]["kernel"].dtype == jnp.dtype(dtype)
    y = variant(model.apply)(zero, X)
    assert y.dtype == jnp.dtype(dtype)
    chex.assert_trees_all_equal(y, jnp.broadcast_to(params["bias"], (2, 3)))  # 0 exactly


# -- lifted transforms, jit and grad ------------------------------------------------------


def test_nn_scan_matches_a_python_loop_under_jit_and_grad():
    check_scan_matches_loop(lambda dense: FakeQuant(dense, bits=4))


def test_nn_remat_matches_the_plain_module_under_jit_and_grad():
    check_remat_matches_plain(lambda dense: FakeQuant(dense, bits=4, symmetric=False))


# -- stacking -----------------------------------------------------------------------------


def quantised(kernel: Any) -> jax.Array:
    """FakeQuant(bits=4)'s kernel, per output feature, computed by numpy in float64."""
    return jnp.asarray(numpy_fake_quantize(np.asarray(kernel, np.float64), 4, True, (0,)))


STACKS = {
    # name: (build, the kernel the Dense sees written out as the composition, call options)
    "FakeQuant(WeightNorm)": (
        lambda dense: FakeQuant(WeightNorm(dense), bits=4),
        lambda k, v: quantised(jnp_weight_norm(k, v["scale"])),
        {},
    ),
    "WeightNorm(FakeQuant)": (
        lambda dense: WeightNorm(FakeQuant(dense, bits=4)),
        lambda k, v: jnp_weight_norm(quantised(k).astype(jnp.float32), v["scale"]),
        {},
    ),
    "FakeQuant(SpectralNorm)": (
        lambda dense: FakeQuant(SpectralNorm(dense), bits=4),
        lambda k, v: quantised(jnp_spectral_norm(k, v["u"])),
        FROZEN,
    ),
    "SpectralNorm(FakeQuant)": (
        lambda dense: SpectralNorm(FakeQuant(dense, bits=4)),
        lambda k, v: jnp_spectral_norm(quantised(k).astype(jnp.float32), v["u"]),
        FROZEN,
    ),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_stacks_with_weight_norm_and_spectral_norm_in_both_orders(stack):
    build, composition, options = STACKS[stack]
    seen, kernel, extras = stacked_kernels(build, options, jax.jit)
    chex.assert_trees_all_close(
        seen, composition(kernel, extras).astype(jnp.float32), rtol=1e-5, atol=1e-6
    )


# -- summary ------------------------------------------------------------------------------


def jnp_fake_quantize(w: jax.Array) -> jax.Array:
    """Symmetric 8-bit fake quantisation per output feature, written out in jnp."""
    frozen = jax.lax.stop_gradient(w)
    scale = jnp.max(jnp.abs(frozen), axis=0, keepdims=True) / 127
    scale = jnp.where(scale > 0, scale, 1.0)
    zero_point = jnp.zeros_like(scale)
    integers = jnp.clip(jnp.round(frozen / scale) + zero_point, -127.0, 127.0)
    return (integers - zero_point) * scale + (w - frozen)


def test_summary_row_costs_the_quantisation_and_the_layer_is_its_child():
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    table = wrapkit.summary(FakeQuant(nn.Dense(32)), x, vjp=True)
    root = table.root
    assert (root.module_type, root.wrapper) == ("FakeQuant", True)
    (child,) = (table.rows[index] for index in root.children)
    assert (child.module_type, child.method) == ("Dense", "__call__")
    assert child.own_flops == 2 * 8 * 16 * 32 + 8 * 32
    kernel = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    assert root.own_flops == wrapkit.flops.count(jnp_fake_quantize, kernel).flops
    # Per weight: |w|, a combining step of the max, divide by the scale, round, clip (max
    # and min), multiply by the scale, and the straight-through w - w and its addition; a
    # symmetric grid's zero point is a constant 0, which XLA folds away. Per output feature:
    # the scale's division and its zero guard (compare, select), less one combining step.
    n, features = 16 * 32, 32
    assert root.own_flops == 9 * n + 2 * features
    assert root.own_transcendentals == 0


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"bits": 1},
            r"bits must be an int from 2 to 16, got 1: a symmetric 1-bit grid holds only the "
            r"integer 0\. Pass e\.g\. bits=8, or bits=2 for ternary weights",
        ),
        ({"bits": -8}, r"bits must be an int from 2 to 16, got -8: "),
        (
            {"bits": 32},
            r"bits must be an int from 2 to 16, got 32: no integer format wider than int16 is "
            r"used for quantised weights, .* Pass bits=16 at most, or leave the layer unwrapped\.",
        ),
        (
            {"bits": 8.0},
            r"bits must be an int from 2 to 16, got 8\.0 \(float\)\. Pass e\.g\. bits=8\.",
        ),
        ({"bits": True}, r"bits must be an int from 2 to 16, got True \(bool\)\."),
        ({"bits": "8"}, r"bits must be an int from 2 to 16, got '8' \(str\)\."),
        (
            {"symmetric": "yes"},
            r"symmetric must be True or False, got 'yes'\. Pass symmetric=False for an "
            r"asymmetric \(min/max, zero-point\) grid\.",
        ),
        ({"symmetric": 0}, r"symmetric must be True or False, got 0\."),
        (
            {"feature_axes": True},
            r"feature_axes must be an int, a tuple of ints or None, got True \(bool\)\. Pass "
            r"e\.g\. feature_axes=-1 \(the last axis, a kernel's output features\), "
            r"feature_axes=\(0, -1\), or None for one grid per variable\.",
        ),
        ({"feature_axes": 1.5}, r"feature_axes must be .*, got 1\.5 \(float\)\."),
        (
            {"dtype": jnp.complex64},
            r"dtype must be None or a real floating-point dtype, got the dtype complex64: "
            r"quantised weights are real\. Pass e\.g\. dtype=jnp\.float32",
        ),
        ({"dtype": "float33"}, r"dtype must be None or a real .*, got 'float33': "),
        ({"dtype": jnp.int8}, r"dtype must be None or a real .*, got the dtype int8: "),
    ],
    ids=[
        "bits=1",
        "bits=-8",
        "bits=32",
        "bits=8.0",
        "bits=True",
        "bits-str",
        "symmetric=yes",
        "symmetric=0",
        "feature_axes=True",
        "feature_axes=1.5",
        "dtype=complex64",
        "dtype=float33",
        "dtype=int8",
    ],
)
def test_invalid_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=rf"^FakeQuant\(Dense\) {message}"):
        FakeQuant(nn.Dense(3), **options)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^FakeQuant\(Dense\) has 3 problems:\n  - bits must be an int from 2 to 16, got "
        r"1: .*\n  - symmetric must be True or False, got 'no'\. .*\n  - feature_axes must be "
        r"an int, a tuple of ints or None, got 'last' \(str\)\.",
    ):
        FakeQuant(nn.Dense(3), bits=1, symmetric="no", feature_axes="last")


def test_invalid_option_names_the_module_it_wraps():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return FakeQuant(nn.Dense(3), bits=0)(x)

    with pytest.raises(ValueError, match=r"^FakeQuant\(Dense_0\) bits must be an int from 2"):
        Top().init(jax.random.key(0), X)


def test_feature_axes_out_of_range_fail_in_the_first_call():
    model = FakeQuant(nn.Conv(3, (2, 2)), feature_axes=(0, 4))
    with pytest.raises(
        ValueError,
        match=r"^FakeQuant\(layer_instance\): feature_axes=\(0, 4\) is out of range for "
        r"'layer_instance/kernel' of shape \(2, 2, 2, 3\)\. Use axes in \[-4, 3\], or "
        r"feature_axes=None for one grid per variable\.",
    ):
        model.init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_a_variable_without_an_axis_to_take_a_grid_over_fails():
    """A bias with feature_axes=-1 would be a grid per element: silently unquantised."""
    model = FakeQuant(nn.Dense(3), variable_filter=None)
    with pytest.raises(
        ValueError,
        match=r"^FakeQuant\(layer_instance\): 'layer_instance/bias' of shape \(3,\) has no axis "
        r"to take a grid over \(feature_axes=-1 covers all its axes\), so each element would be "
        r"a grid of its own and stay unquantised\. Leave it out of variable_filter \(e\.g\. "
        r"\{'kernel'\}\), or use feature_axes=None for one grid over it\.",
    ):
        model.init(jax.random.key(0), X)


def test_per_tensor_grid_quantises_the_bias_too(variant):
    model = FakeQuant(
        nn.Dense(3, bias_init=normal_init), bits=2, feature_axes=None, variable_filter=None
    )
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]["layer_instance"]
    bias = np.asarray(params["bias"], np.float64)
    seen = variant(model.apply)(variables, jnp.zeros((1, 4)))  # the quantised bias
    np.testing.assert_allclose(
        np.asarray(seen[0]), numpy_fake_quantize(bias, 2, True, None), rtol=1e-6
    )


def test_a_complex_kernel_is_refused_in_the_first_call():
    model = FakeQuant(nn.Dense(3, param_dtype=jnp.complex64, dtype=jnp.complex64))
    with pytest.raises(
        TypeError,
        match=r"^FakeQuant\(layer_instance\): 'layer_instance/kernel' is complex64, but fake "
        r"quantisation needs real weights\. Leave it out of variable_filter\.",
    ):
        model.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 2},
        {"bits": 16},
        {"bits": np.int64(4)},
        {"symmetric": np.bool_(False)},
        {"feature_axes": None},
        {"feature_axes": ()},
        {"feature_axes": (np.int32(0), -1)},
        {"dtype": jnp.bfloat16},
        {"dtype": "float16"},
        {"variable_filter": "kernel"},
    ],
    ids=str,
)
def test_valid_options_are_accepted(options):
    FakeQuant(nn.Dense(3), **options)


def test_default_is_symmetric_8_bit_per_output_feature(variant):
    raw, seen = transformed_kernel(FakeQuant, dense(4, 3), variant)
    np.testing.assert_allclose(seen, numpy_fake_quantize(raw, 8, True, (0,)), rtol=1e-6)


def test_fold_gives_grid_weights_and_wrap_pretrained_takes_them_back():

    x = jax.random.normal(jax.random.key(1), (3, 8))
    model = FakeQuant(nn.Dense(4), bits=4)
    variables = model.init(jax.random.key(0), x)
    folded = wrapkit.linen.fold(model, variables, x)
    kernel = np.asarray(folded["params"]["kernel"], np.float64)
    scale = np.abs(kernel).max(axis=0) / 7  # symmetric 4 bits: integers -7..7 per channel
    np.testing.assert_allclose(kernel / scale, np.round(kernel / scale), atol=1e-4)
    np.testing.assert_allclose(nn.Dense(4).apply(folded, x), model.apply(variables, x), atol=1e-6)
    back = wrapkit.linen.wrap_pretrained(model, folded, x, rngs=jax.random.key(0))
    np.testing.assert_allclose(model.apply(back, x), nn.Dense(4).apply(folded, x), atol=1e-6)
    float_weights = nn.Dense(4).init(jax.random.key(5), x)
    with pytest.raises(ValueError, match=r"reproduces only weights that lie on their own"):
        wrapkit.linen.wrap_pretrained(model, float_weights, x, rngs=jax.random.key(0))
    loose = wrapkit.linen.wrap_pretrained(
        model, float_weights, x, rngs=jax.random.key(0), exact=False
    )
    np.testing.assert_array_equal(
        loose["params"]["layer_instance"]["kernel"], float_weights["params"]["kernel"]
    )
