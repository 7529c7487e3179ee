"""WeightStandardization: numpy parity on every kernel layout, gradients, dtypes, lifts, errors.

Expected values come from numpy in float64 or from a formula written out in this file, never
from a run. Tolerances are a few roundings of the dtype under test.

The reference tests read the standardised kernel through the wrapped layer itself: a layer
without bias applied to the standard basis of its fan-in (``eye``, shaped as its input)
returns its kernel, exactly (each output is one kernel entry times 1, plus zeros).
``tests/test_fake_quant.py`` uses the same layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wrapkit
from wrapkit.linen import SpectralNorm, WeightNorm, WeightStandardization

# Few, small examples: eager jax compiles each operation once per new shape.
SETTINGS = settings(max_examples=3, deadline=None, database=None, print_blob=True)
EPS = 1e-10
X = jax.random.normal(jax.random.key(1), (2, 4))
LOW_PRECISION = [jnp.float16, jnp.bfloat16]
LOW_PRECISION_IDS = ["float16", "bfloat16"]


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"], scope="module")
def variant(request: pytest.FixtureRequest) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return request.param


def tolerance(dtype: Any) -> float:
    """A few roundings of ``dtype``: what one cast of a float32 result (and a matmul) costs."""
    return 4 * float(jnp.finfo(dtype).eps)


def normal_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """0.5 + N(0, 1), drawn by numpy from the bits of the key: a non-zero mean to remove.

    numpy compiles nothing, where jax's samplers compile once per new shape.
    """
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    except jax.errors.TracerArrayConversionError:
        return jnp.zeros(shape, dtype)  # flax traces initialisers to check shapes
    values = 0.5 + np.random.default_rng(seed).standard_normal(tuple(shape))
    return jnp.asarray(values, dtype)


# -- layers whose output on a basis is their kernel ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer without bias, its kernel's shape, and the input that returns the kernel."""

    kind: str
    make: Callable[[Any], nn.Module]
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # (fan-in, *the layer's input shape)

    def basis(self, dtype: Any = jnp.float32) -> jax.Array:
        return jnp.eye(self.input_shape[0], dtype=dtype).reshape(self.input_shape)

    def kernel_of(self, output: jax.Array) -> np.ndarray:
        return np.asarray(output.astype(jnp.float32), np.float64).reshape(self.kernel_shape)


def _options(dtype: Any) -> dict[str, Any]:
    return {"use_bias": False, "kernel_init": normal_init, "dtype": dtype, "param_dtype": dtype}


def dense(n_in: int, n_out: int) -> Layer:
    return Layer("dense", lambda dt: nn.Dense(n_out, **_options(dt)), (n_in, n_out), (n_in, n_in))


def conv(window: tuple[int, ...], n_in: int, n_out: int) -> Layer:
    """HWIO: on a VALID input of the window's size, each basis image gives one kernel row."""
    fan_in = int(np.prod(window)) * n_in
    return Layer(
        "conv",
        lambda dt: nn.Conv(n_out, window, padding="VALID", **_options(dt)),
        (*window, n_in, n_out),
        (fan_in, *window, n_in),
    )


def dense_general(inputs: tuple[int, int], features: tuple[int, int]) -> Layer:
    fan_in = inputs[0] * inputs[1]
    return Layer(
        "dense_general",
        lambda dt: nn.DenseGeneral(features, axis=(-2, -1), **_options(dt)),
        (*inputs, *features),
        (fan_in, *inputs),
    )


def einsum(shape: tuple[int, int, int]) -> Layer:
    return Layer(
        "einsum",
        lambda dt: nn.Einsum(shape, "ab,bcd->acd", **_options(dt)),
        shape,
        (shape[0], shape[0]),
    )


def _dim(low: int = 1) -> st.SearchStrategy[int]:
    return st.integers(low, 3)


@st.composite
def layers(draw: st.DrawFn, kind: str) -> Layer:
    """A layer of ``kind`` with random sizes: kernels of rank 2 (Dense) to 4."""
    if kind == "dense":
        return dense(draw(_dim(2)), draw(_dim()))
    if kind == "conv":
        window = tuple(draw(st.lists(_dim(), min_size=1, max_size=2)))
        return conv(window, draw(_dim()), draw(_dim()))
    if kind == "dense_general":
        return dense_general((draw(_dim()), draw(_dim(2))), (draw(_dim()), draw(_dim())))
    return einsum((draw(_dim(2)), draw(_dim()), draw(_dim())))


KINDS = ["dense", "conv", "dense_general", "einsum"]


def feature_axes_for(rank: int) -> st.SearchStrategy[Any]:
    """Feature axes that leave at least one axis to reduce over."""
    choices: list[Any] = [-1, None]
    if rank >= 3:
        choices += [(-2, -1), (0, rank - 1)]
    return st.sampled_from(choices)


def fan_in_axes(rank: int, feature_axes: Any) -> tuple[int, ...]:
    if feature_axes is None:
        return tuple(range(rank))
    kept = {axis % rank for axis in np.atleast_1d(feature_axes).tolist()}
    return tuple(axis for axis in range(rank) if axis not in kept)


def numpy_standardize(w: np.ndarray, axes: tuple[int, ...], eps: float = EPS) -> np.ndarray:
    centred = w - w.mean(axis=axes, keepdims=True)
    return centred / np.sqrt((np.abs(centred) ** 2).mean(axis=axes, keepdims=True) + eps)


def jnp_standardize(w: jax.Array, axes: tuple[int, ...], eps: float = EPS) -> jax.Array:
    """The forward pass written out in jnp, for jax.grad and the FLOP count."""
    centred = w - jnp.mean(w, axis=axes, keepdims=True)
    variance = jnp.mean(centred * centred, axis=axes, keepdims=True)
    return centred * jax.lax.rsqrt(variance + eps)


def transformed_kernel(
    wrapper: Callable[[nn.Module], nn.Module], layer: Layer, variant: Any, dtype: Any = jnp.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(raw kernel, kernel the wrapped layer sees), both as float64 numpy arrays."""
    model = wrapper(layer.make(dtype))
    x = layer.basis(dtype)
    variables = model.init(jax.random.key(0), x)
    raw = np.asarray(variables["params"]["layer_instance"]["kernel"].astype(jnp.float32))
    seen = variant(model.apply)(variables, x)
    assert seen.dtype == jnp.dtype(dtype)
    return raw.astype(np.float64), layer.kernel_of(seen)


# -- numerics of the wrapper against numpy ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_matches_numpy_on_every_kernel_layout(variant: Any, kind: str, data: st.DataObject):
    layer = data.draw(layers(kind), label="layer")
    rank = len(layer.kernel_shape)
    feature_axes = data.draw(feature_axes_for(rank), label="feature_axes")
    raw, seen = transformed_kernel(
        lambda inner: WeightStandardization(inner, feature_axes=feature_axes), layer, variant
    )
    expected = numpy_standardize(raw, fan_in_axes(rank, feature_axes))
    np.testing.assert_allclose(seen, expected, rtol=2e-5, atol=2e-5)


def test_each_output_feature_has_zero_mean_and_unit_variance(variant):
    layer = conv((3, 3), 2, 4)
    _, seen = transformed_kernel(WeightStandardization, layer, variant)
    np.testing.assert_allclose(seen.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(seen.var(axis=(0, 1, 2)), 1, rtol=1e-5)


def test_complex_kernel_is_standardised_with_its_modulus(variant):
    model = WeightStandardization(nn.Dense(3, param_dtype=jnp.complex64, dtype=jnp.complex64))
    variables = model.init(jax.random.key(0), X)
    y = variant(model.apply)(variables, X)
    assert y.dtype == jnp.complex64
    params = variables["params"]["layer_instance"]
    kernel = np.asarray(params["kernel"], np.complex128)
    assert np.abs(kernel.imag).max() > 0.1  # a complex kernel indeed
    expected = np.asarray(X, np.float64) @ numpy_standardize(kernel, (0,)) + params["bias"]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


# -- gradients ------------------------------------------------------------------------------


def scalar_loss(y: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(y) * jnp.linspace(-1.0, 2.0, y.shape[-1]))


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
def test_gradient_is_jax_grad_of_the_forward_written_out(variant, inner, x, apply_plain):
    model = WeightStandardization(inner)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params):
        return scalar_loss(model.apply({"params": params}, x))

    def reference(params):
        inner_params = params["layer_instance"]
        kernel = inner_params["kernel"]
        standardised = jnp_standardize(kernel, tuple(range(kernel.ndim - 1)))
        return scalar_loss(apply_plain({**inner_params, "kernel": standardised}, x))

    value, grads = variant(jax.value_and_grad(loss))(params)
    expected_value, expected_grads = jax.value_and_grad(reference)(params)
    chex.assert_trees_all_close(value, expected_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-5)
    # The gradient of a standardised kernel is orthogonal to a shift of each column.
    kernel_grad = grads["layer_instance"]["kernel"]
    chex.assert_trees_all_close(
        kernel_grad.sum(axis=tuple(range(kernel_grad.ndim - 1))), 0.0, atol=1e-5
    )


# -- precision: float16, bfloat16, zero and small kernels -----------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_kernel_is_the_float32_result_rounded_once(variant, dtype):
    layer = conv((2, 2), 3, 4)
    raw, seen = transformed_kernel(WeightStandardization, layer, variant, dtype)
    # raw is the dtype's kernel, exactly: numpy standardises the same numbers in float64.
    expected = numpy_standardize(raw, (0, 1, 2))
    tol = tolerance(dtype)
    np.testing.assert_allclose(seen, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "dtype", [jnp.float32, *LOW_PRECISION], ids=["float32", *LOW_PRECISION_IDS]
)
@pytest.mark.parametrize("scale", [0.0, 1e-3], ids=["zero", "small"])
def test_zero_and_small_kernels_give_finite_outputs_and_gradients(variant, dtype, scale):
    model = WeightStandardization(nn.Dense(3, dtype=dtype, param_dtype=dtype))
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]["layer_instance"]
    kernel = (scale * params["kernel"].astype(jnp.float32)).astype(dtype)
    variables = {"params": {"layer_instance": {**params, "kernel": kernel}}}

    def loss(variables):
        return model.apply(variables, X).astype(jnp.float32).sum()

    value, grads = variant(jax.value_and_grad(loss))(variables)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)
    assert grads["params"]["layer_instance"]["kernel"].dtype == jnp.dtype(dtype)
    y = model.apply(variables, X)
    assert y.dtype == jnp.dtype(dtype)
    if scale == 0:
        # A constant kernel standardises to 0, exactly (0 times a finite number).
        chex.assert_trees_all_equal(y, jnp.broadcast_to(params["bias"], (2, 3)))
    else:
        # Not the unscaled kernel's output: epsilon is not negligible next to a 1e-6 variance.
        as_float64 = [np.asarray(a.astype(jnp.float32), np.float64) for a in (X, kernel)]
        expected = as_float64[0] @ numpy_standardize(as_float64[1], (0,)) + np.asarray(
            params["bias"].astype(jnp.float32)
        )
        tol = tolerance(dtype)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=tol, atol=tol)


# -- lifted transforms, jit and grad ------------------------------------------------------

FEATURES = 3


class Step(nn.Module):
    """One layer in the ``(carry, x) -> (carry, y)`` form of ``nn.scan``."""

    wrap: Callable[[nn.Module], nn.Module]

    @nn.compact
    def __call__(self, carry: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(self.wrap(nn.Dense(FEATURES, kernel_init=normal_init))(carry)), None


def check_scan_matches_loop(wrap: Callable[[nn.Module], nn.Module]) -> None:
    """``nn.scan`` over three layers against a Python loop: values and gradients, jitted."""
    length = 3
    scanned = nn.scan(
        Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=length
    )(wrap)
    x = jax.random.normal(jax.random.key(3), (2, FEATURES))
    variables = scanned.init(jax.random.key(0), x, None)

    def scan_loss(variables):
        y, _ = scanned.apply(variables, x, None)
        return scalar_loss(y)

    def loop_loss(variables):
        carry = x
        for i in range(length):
            layer = jax.tree_util.tree_map(lambda a, i=i: a[i], variables)
            carry, _ = Step(wrap).apply(layer, carry, None)
        return scalar_loss(carry)

    value, grads = jax.jit(jax.value_and_grad(scan_loss))(variables)
    expected_value, expected_grads = jax.jit(jax.value_and_grad(loop_loss))(variables)
    chex.assert_trees_all_close(value, expected_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)


class Block(nn.Module):
    wrap: Callable[[nn.Module], nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wrap(nn.Dense(FEATURES, kernel_init=normal_init))(x)


def check_remat_matches_plain(wrap: Callable[[nn.Module], nn.Module]) -> None:
    """``nn.remat`` of a block with the wrapper against the block: values and gradients."""
    x = jax.random.normal(jax.random.key(3), (2, FEATURES))
    plain, remat = Block(wrap), nn.remat(Block)(wrap)
    variables = plain.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(remat.init(jax.random.key(0), x)) == (
        jax.tree_util.tree_structure(variables)
    )

    def loss(model):
        return lambda variables: scalar_loss(model.apply(variables, x))

    value, grads = jax.jit(jax.value_and_grad(loss(remat)))(variables)
    expected_value, expected_grads = jax.jit(jax.value_and_grad(loss(plain)))(variables)
    chex.assert_trees_all_close(value, expected_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-7)


def test_nn_scan_matches_a_python_loop_under_jit_and_grad():
    check_scan_matches_loop(WeightStandardization)


def test_nn_remat_matches_the_plain_module_under_jit_and_grad():
    check_remat_matches_plain(WeightStandardization)


# -- stacking -----------------------------------------------------------------------------


def jnp_weight_norm(kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """flax's WeightNorm, written out: ``scale * v / ||v||`` over the fan-in axis."""
    return kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0, keepdims=True) + 1e-12) * scale


def jnp_spectral_norm(kernel: jax.Array, u0: jax.Array) -> jax.Array:
    """One step of power iteration from the stored ``u``, then ``kernel / sigma``."""

    def unit(a: jax.Array) -> jax.Array:
        return a * jax.lax.rsqrt(jnp.sum(a * a) + 1e-12)

    v = unit(u0 @ kernel.T)
    u = unit(v @ kernel)
    return kernel / (v @ kernel @ u.T)[0, 0]


class Stacked(nn.Module):
    """Builds a stack in ``@nn.compact``: the Dense and the wrappers are siblings."""

    build: Callable[[nn.Module], nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, **options: Any) -> jax.Array:
        return self.build(nn.Dense(4, use_bias=False, kernel_init=normal_init))(x, **options)


def leaf_named(tree: Any, suffix: str) -> Any:
    """The one leaf of ``tree`` whose key path ends with ``suffix``, or ``None``."""
    leaves = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jax.tree_util.keystr(path).endswith(suffix)
    ]
    assert len(leaves) <= 1
    return leaves[0] if leaves else None


def stacked_kernels(
    build: Callable[[nn.Module], nn.Module], options: dict[str, Any], variant: Any
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """(the kernel the stack's Dense sees on ``eye``, its raw kernel, the stack's variables).

    The variables are WeightNorm's ``scale`` and SpectralNorm's stored ``u``, by name.
    """
    model = Stacked(build)
    x = jnp.eye(3)
    variables = model.init(jax.random.key(0), x, **options)
    # A scale away from one, so that where WeightNorm sits shows.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            jnp.linspace(0.5, 2.0, 4)
            if jax.tree_util.keystr(path).endswith("/kernel/scale']")
            else leaf
        ),
        variables,
    )
    seen = variant(lambda v: model.apply(v, x, **options))(variables)
    extras = {
        "scale": leaf_named(variables, "/kernel/scale']"),
        "u": leaf_named(variables, "/kernel/u']"),
    }
    return seen, leaf_named(variables["params"], "['kernel']"), extras


# SpectralNorm takes update_stats on every call; the other wrappers take no option.
FROZEN = {"update_stats": False}
STACKS = {
    # name: (build, the kernel the Dense sees written out as the composition, call options)
    "WeightStandardization(WeightNorm)": (
        lambda dense: WeightStandardization(WeightNorm(dense)),
        lambda k, v: jnp_standardize(jnp_weight_norm(k, v["scale"]), (0,)),
        {},
    ),
    "WeightNorm(WeightStandardization)": (
        lambda dense: WeightNorm(WeightStandardization(dense)),
        lambda k, v: jnp_weight_norm(jnp_standardize(k, (0,)), v["scale"]),
        {},
    ),
    "WeightStandardization(SpectralNorm)": (
        lambda dense: WeightStandardization(SpectralNorm(dense)),
        lambda k, v: jnp_standardize(jnp_spectral_norm(k, v["u"]), (0,)),
        FROZEN,
    ),
    "SpectralNorm(WeightStandardization)": (
        lambda dense: SpectralNorm(WeightStandardization(dense)),
        lambda k, v: jnp_spectral_norm(jnp_standardize(k, (0,)), v["u"]),
        FROZEN,
    ),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_stacks_with_weight_norm_and_spectral_norm_in_both_orders(stack):
    build, composition, options = STACKS[stack]
    seen, kernel, extras = stacked_kernels(build, options, jax.jit)
    chex.assert_trees_all_close(seen, composition(kernel, extras), rtol=1e-5, atol=1e-5)


def test_the_order_of_a_stack_matters():
    # WeightNorm's scale cancels under standardisation, and survives it the other way round.
    outer, _, _ = stacked_kernels(STACKS["WeightStandardization(WeightNorm)"][0], {}, jax.jit)
    inner, _, _ = stacked_kernels(STACKS["WeightNorm(WeightStandardization)"][0], {}, jax.jit)
    assert not np.allclose(outer, inner, rtol=1e-2)


# -- summary ------------------------------------------------------------------------------


def test_summary_row_costs_the_standardisation_and_the_layer_is_its_child():
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    table = wrapkit.summary(WeightStandardization(nn.Dense(32)), x, vjp=True)
    root = table.root
    assert (root.module_type, root.wrapper) == ("WeightStandardization", True)
    (child,) = (table.rows[index] for index in root.children)
    assert (child.module_type, child.method) == ("Dense", "__call__")
    assert child.own_flops == 2 * 8 * 16 * 32 + 8 * 32
    # Per weight: subtract the mean, square, multiply by 1/std, and one combining step in
    # each of the two sums; per output feature: two divisions by the fan-in, one addition of
    # epsilon, and one reciprocal square root.
    n, features = 16 * 32, 32
    assert root.own_flops == 5 * n + features
    assert root.own_transcendentals == features
    kernel = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    assert wrapkit.flops.count(lambda k: jnp_standardize(k, (0,)), kernel).flops == (root.own_flops)
    assert root.own_vjp_flops > root.own_flops  # the backward pass through the moments


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"epsilon": -1.0},
            r"epsilon must be a finite positive number, got -1\.0: it keeps a constant weight "
            r"\(a zero kernel\) at 0 instead of 0 / 0\. Pass a float; the default, 1e-10, is "
            r"BiT's\.",
        ),
        ({"epsilon": 0}, r"epsilon must be a finite positive number, got 0: "),
        ({"epsilon": float("inf")}, r"epsilon must be a finite positive number, got inf: "),
        ({"epsilon": "1e-10"}, r"epsilon must be .*, got '1e-10' \(str\): "),
        ({"epsilon": True}, r"epsilon must be .*, got True \(bool\): "),
        (
            {"feature_axes": True},
            r"feature_axes must be an int, a tuple of ints or None, got True \(bool\)\. Pass "
            r"e\.g\. feature_axes=-1 \(the last axis, a kernel's output features\), "
            r"feature_axes=\(0, -1\), or None for one mean and variance over the whole "
            r"variable\.",
        ),
        ({"feature_axes": 1.5}, r"feature_axes must be .*, got 1\.5 \(float\)\."),
        ({"feature_axes": (0, "1")}, r"feature_axes must be .*, got \(0, '1'\) \(tuple\)\."),
        (
            {"dtype": "float33"},
            r"dtype must be None or a floating-point or complex dtype, got 'float33'\. Pass "
            r"e\.g\. dtype=jnp\.float32",
        ),
        ({"dtype": jnp.int8}, r"dtype must be .*, got the dtype int8\."),
    ],
    ids=[
        "epsilon=-1",
        "epsilon=0",
        "epsilon=inf",
        "epsilon-str",
        "epsilon=True",
        "feature_axes=True",
        "feature_axes=1.5",
        "feature_axes-str-in-tuple",
        "dtype=float33",
        "dtype=int8",
    ],
)
def test_invalid_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=rf"^WeightStandardization\(Dense\) {message}"):
        WeightStandardization(nn.Dense(3), **options)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^WeightStandardization\(Dense\) has 2 problems:\n  - epsilon must be a "
        r"finite positive number, got -1: .*\n  - feature_axes must be an int, a tuple of ints "
        r"or None, got 'last' \(str\)\.",
    ):
        WeightStandardization(nn.Dense(3), epsilon=-1, feature_axes="last")


@pytest.mark.parametrize(
    ("feature_axes", "allowed"),
    [(2, r"\[-2, 1\]"), ((0, -3), r"\[-2, 1\]")],
    ids=["positive", "negative-in-tuple"],
)
def test_feature_axes_out_of_range_fail_in_the_first_call(feature_axes, allowed):
    model = WeightStandardization(nn.Dense(3), feature_axes=feature_axes)
    with pytest.raises(
        ValueError,
        match=rf"^WeightStandardization\(layer_instance\): feature_axes="
        rf"{re.escape(repr(feature_axes))} is out of range for 'layer_instance/kernel' of shape "
        rf"\(4, 3\)\. Use axes in {allowed}, or feature_axes=None for one mean and variance",
    ):
        model.init(jax.random.key(0), X)


def test_a_variable_without_an_axis_to_standardise_over_fails():
    """A bias with feature_axes=-1 would silently become zeros."""
    model = WeightStandardization(nn.Dense(3), variable_filter=None)
    with pytest.raises(
        ValueError,
        match=r"^WeightStandardization\(layer_instance\): 'layer_instance/bias' of shape "
        r"\(3,\) has no axis to standardise over \(feature_axes=-1 covers all its axes\), so "
        r"it would become zeros\. Leave it out of variable_filter \(e\.g\. \{'kernel'\}\), or "
        r"use feature_axes=None for one mean and variance over it\.",
    ):
        model.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    "options",
    [
        {"epsilon": 1e-5},
        {"epsilon": np.float32(1e-6)},
        {"epsilon": 1},
        {"feature_axes": None},
        {"feature_axes": (np.int64(0), -1)},
        {"feature_axes": [3]},
        {"dtype": jnp.bfloat16},
        {"dtype": "complex64"},
        {"variable_filter": "kernel"},
    ],
    ids=str,
)
def test_valid_options_are_accepted(options):
    WeightStandardization(nn.Dense(3), **options)


def test_feature_axes_none_takes_one_mean_and_variance(variant):
    layer = conv((2, 2), 2, 3)
    raw, seen = transformed_kernel(
        lambda inner: WeightStandardization(inner, feature_axes=None), layer, variant
    )
    np.testing.assert_allclose(seen, numpy_standardize(raw, (0, 1, 2, 3)), rtol=2e-5, atol=2e-5)


def test_wrap_pretrained_says_standardisation_cannot_be_inverted():

    x = jnp.ones((2, 3))
    plain = nn.Dense(4).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"WeightStandardization defines no invert"):
        wrapkit.linen.wrap_pretrained(
            WeightStandardization(nn.Dense(4)), plain, x, rngs=jax.random.key(0)
        )
