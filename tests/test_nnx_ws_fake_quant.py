"""wrapkit.nnx.WeightStandardization and wrapkit.nnx.FakeQuant: the Linen twins' outputs,
numpy references, raw weights untouched, straight-through gradients, dtypes, stacks, errors.

Expected values come from the Linen twins on the same variables (built from the NNX state:
``nn.Dense``, ``nn.Conv`` and ``nn.Einsum`` kernels have the layouts of ``nnx.Linear``,
``nnx.Conv`` and ``nnx.Einsum``), or from numpy in float64. The transformed kernel is read
through the wrapped layer itself: without bias, a layer applied to the standard basis of its
fan-in returns its kernel exactly. Kernels are drawn (as in ``tests/test_fake_quant.py``) so
that no value lies near a rounding tie of any grid used here, where float32 and float64 may
round apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_fake_quant import no_ties, numpy_fake_quantize
from test_weight_standardization import numpy_standardize

import wrapkit.linen
import wrapkit.nnx
from wrapkit.nnx import FakeQuant, Inverse, Leaf, WeightStandardization

LOW_PRECISION = [jnp.float16, jnp.bfloat16]
LOW_PRECISION_IDS = ["float16", "bfloat16"]
# Every grid the kernels below are quantised on: (bits, symmetric, fan-in axes or None).
GRIDS = [(8, True), (3, False), (2, True), (4, True)]


@pytest.fixture(params=[lambda f: f, nnx.jit], ids=["eager", "jit"], scope="module")
def variant(request: pytest.FixtureRequest) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return request.param


@dataclasses.dataclass(frozen=True)
class Kind:
    """An NNX layer, its Linen twin, its kernel's shape, and the basis that returns it."""

    name: str
    make: Callable[[bool], nnx.Module]
    twin: Callable[[bool], nn.Module]
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # (fan-in, *the layer's input shape)

    def basis(self) -> jax.Array:
        return jnp.eye(self.input_shape[0]).reshape(self.input_shape)

    def kernel_of(self, output: jax.Array) -> np.ndarray:
        return np.asarray(output, np.float64).reshape(self.kernel_shape)

    def fan_in(self) -> tuple[int, ...]:
        return tuple(range(len(self.kernel_shape) - 1))

    def x(self) -> jax.Array:
        shape = (3, *self.input_shape[1:])
        return jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)


KINDS = [
    Kind(
        "linear",
        lambda bias: nnx.Linear(4, 3, use_bias=bias, rngs=nnx.Rngs(0)),
        lambda bias: nn.Dense(3, use_bias=bias),
        (4, 3),
        (4, 4),
    ),
    Kind(
        "conv",
        lambda bias: nnx.Conv(2, 3, (2, 2), padding="VALID", use_bias=bias, rngs=nnx.Rngs(0)),
        lambda bias: nn.Conv(3, (2, 2), padding="VALID", use_bias=bias),
        (2, 2, 2, 3),
        (8, 2, 2, 2),
    ),
    Kind(
        "einsum",
        lambda bias: nnx.Einsum(
            "bi,ijk->bjk", (4, 2, 3), (2, 3) if bias else None, rngs=nnx.Rngs(0)
        ),
        lambda bias: nn.Einsum((4, 2, 3), "bi,ijk->bjk", use_bias=bias),
        (4, 2, 3),
        (4, 4),
    ),
]
KIND_IDS = [kind.name for kind in KINDS]


def tie_free(shape: tuple[int, ...]) -> np.ndarray:
    """0.5 + N(0, 1) in float32 (returned in float64), from the first seed whose values are
    away from every rounding tie of ``GRIDS``, per channel and per tensor."""
    for seed in range(100):
        values = 0.5 + np.random.default_rng(seed).standard_normal(shape)
        values = values.astype(np.float32).astype(np.float64)
        fan_in = tuple(range(len(shape) - 1))
        if all(
            no_ties(values, bits, symmetric, axes)
            for bits, symmetric in GRIDS
            for axes in (fan_in, None)
        ):
            return values
    raise AssertionError(f"no tie-free kernel of shape {shape} among 100 seeds")


def layer(kind: Kind, bias: bool = True) -> nnx.Module:
    """``kind``'s layer with a tie-free kernel of non-zero mean and a non-zero bias."""
    module = kind.make(bias)
    module.kernel[...] = jnp.asarray(tie_free(kind.kernel_shape), jnp.float32)
    if bias:
        shape = module.bias.shape
        module.bias[...] = jnp.asarray(np.linspace(-1.0, 1.0, np.prod(shape)).reshape(shape))
    return module


def raw(module: nnx.Module) -> dict[str, Any]:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def call(variant: Callable[..., Any], model: nnx.Module, x: jax.Array) -> jax.Array:
    return variant(lambda m, x: m(x))(model, x)


def linen_twin(cls: type, kind: Kind, options: dict[str, Any], inner: nnx.Module) -> Any:
    """The Linen wrapper of ``kind``'s twin, applied with ``inner``'s variables."""
    model = cls(kind.twin(True), **options)
    variables = {"params": {"layer_instance": nnx.to_pure_dict(nnx.state(inner, nnx.Param))}}
    return lambda x: model.apply(variables, x)


WRAPPERS = [
    (WeightStandardization, wrapkit.linen.WeightStandardization, {}),
    (WeightStandardization, wrapkit.linen.WeightStandardization, {"feature_axes": None}),
    (FakeQuant, wrapkit.linen.FakeQuant, {}),
    (FakeQuant, wrapkit.linen.FakeQuant, {"bits": 3, "symmetric": False}),
    (FakeQuant, wrapkit.linen.FakeQuant, {"bits": 4, "feature_axes": None}),
]
WRAPPER_IDS = ["ws", "ws-per-tensor", "fq", "fq-3-bit-asymmetric", "fq-4-bit-per-tensor"]


def reference(cls: type, options: dict[str, Any], kernel: np.ndarray) -> np.ndarray:
    """The transformed kernel in float64, from the definitions."""
    axes = tuple(range(kernel.ndim - 1)) if options.get("feature_axes", -1) == -1 else None
    if cls is WeightStandardization:
        return numpy_standardize(kernel, axes if axes is not None else tuple(range(kernel.ndim)))
    return numpy_fake_quantize(kernel, options.get("bits", 8), options.get("symmetric", True), axes)


# -- the Linen twins and numpy ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(("cls", "twin", "options"), WRAPPERS, ids=WRAPPER_IDS)
def test_outputs_equal_the_linen_twins_on_the_same_variables(variant, kind, cls, twin, options):
    inner = layer(kind)
    x = kind.x()
    ours = call(variant, cls(inner, **options), x)
    expected = linen_twin(twin, kind, options, inner)(x)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(("cls", "twin", "options"), WRAPPERS, ids=WRAPPER_IDS)
def test_the_kernel_seen_equals_a_float64_reference(variant, kind, cls, twin, options):
    inner = layer(kind, bias=False)
    kernel = np.asarray(inner.kernel[...], np.float64)
    seen = kind.kernel_of(call(variant, cls(inner, **options), kind.basis()))
    np.testing.assert_allclose(seen, reference(cls, options, kernel), rtol=2e-6, atol=2e-6)


# -- the raw weights -----------------------------------------------------------------------


def loss(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(model(x)))


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("cls", [WeightStandardization, FakeQuant], ids=["ws", "fq"])
def test_raw_params_stay_bit_identical_after_forward_and_grad(variant, kind, cls):
    model = cls(layer(kind))
    x = kind.x()
    before = raw(model)
    call(variant, model, x)
    jax.tree.map(np.testing.assert_array_equal, raw(model), before)
    grads = variant(nnx.grad(loss))(model, x)
    jax.tree.map(np.testing.assert_array_equal, raw(model), before)
    assert set(nnx.to_pure_dict(grads)) == {"layer_instance"}  # no variables of their own
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# -- FakeQuant: the grid and the straight-through gradient ---------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bits", [2, 3])
def test_each_output_channel_lies_on_a_symmetric_grid(variant, kind, bits):
    inner = layer(kind, bias=False)
    seen = kind.kernel_of(call(variant, FakeQuant(inner, bits=bits), kind.basis()))
    kernel = np.asarray(inner.kernel[...], np.float64)
    channels = seen.reshape(-1, kind.kernel_shape[-1]).T
    scales = np.abs(kernel.reshape(-1, kind.kernel_shape[-1])).max(axis=0) / (2 ** (bits - 1) - 1)
    for channel, scale in zip(channels, scales, strict=True):
        assert len(np.unique(channel)) <= 2**bits - 1
        integers = channel / scale
        np.testing.assert_allclose(integers, np.round(integers), atol=1e-5)
        assert np.abs(np.round(integers)).max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_the_gradient_is_straight_through(variant, kind, symmetric):
    """d loss / d raw kernel = d loss / d kernel of the plain layer holding the grid weight."""
    inner = layer(kind)
    model = FakeQuant(inner, bits=3, symmetric=symmetric)
    without_bias = layer(kind, bias=False)
    quantised = call(variant, FakeQuant(without_bias, bits=3, symmetric=symmetric), kind.basis())
    plain = layer(kind)
    plain.kernel[...] = jnp.asarray(quantised.reshape(kind.kernel_shape))
    x = kind.x()
    ours = variant(nnx.grad(loss))(model, x)
    expected = variant(nnx.grad(loss))(plain, x)
    np.testing.assert_allclose(
        ours["layer_instance"]["kernel"][...], expected["kernel"][...], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        ours["layer_instance"]["bias"][...], expected["bias"][...], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(ours["layer_instance"]["kernel"][...], 0.0)


# -- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("cls", [WeightStandardization, FakeQuant], ids=["ws", "fq"])
def test_a_zero_low_precision_kernel_gives_finite_outputs_and_gradients(variant, cls, dtype):
    inner = nnx.Linear(
        4,
        3,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.zeros,
        bias_init=nnx.initializers.ones,
        rngs=nnx.Rngs(0),
    )
    model = cls(inner)
    x = jnp.ones((2, 4), dtype)
    out = call(variant, model, x)
    assert out.dtype == dtype
    # The transformed kernel is exactly zero: the output is the bias.
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.ones((2, 3), np.float32))
    grads = variant(nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32) ** 2)))(model, x)
    for grad in jax.tree.leaves(grads):
        assert grad.dtype == dtype
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("cls", [WeightStandardization, FakeQuant], ids=["ws", "fq"])
def test_dtype_sets_the_dtype_of_the_transformed_kernel(cls):
    inner = layer(KINDS[0], bias=False)
    leaf = Leaf("kernel", ("kernel",), inner.kernel[...], inner.kernel)
    assert cls(inner, dtype=jnp.bfloat16).transform(leaf).dtype == jnp.bfloat16
    assert cls(inner).transform(leaf).dtype == jnp.float32  # the weight's by default


# -- errors when built ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (
            FakeQuant,
            {"bits": 1},
            r"^FakeQuant\(Linear\) bits must be an int from 2 to 16, got 1: a symmetric 1-bit "
            r"grid holds only the integer 0\. Pass e\.g\. bits=8",
        ),
        (
            FakeQuant,
            {"bits": True},
            r"^FakeQuant\(Linear\) bits must be an int from 2 to 16, got True \(bool\)\. Pass "
            r"e\.g\. bits=8\.$",
        ),
        (
            WeightStandardization,
            {"epsilon": 0},
            r"^WeightStandardization\(Linear\) epsilon must be a finite positive number, got 0: "
            r"it keeps a constant weight \(a zero kernel\) at 0 instead of 0 / 0\.",
        ),
        (
            WeightStandardization,
            {"feature_axes": "x"},
            r"^WeightStandardization\(Linear\) feature_axes must be an int, a tuple of ints or "
            r"None, got 'x' \(str\)\. .*or None for one mean and variance over the whole "
            r"variable\.$",
        ),
        (
            FakeQuant,
            {"feature_axes": "x"},
            r"^FakeQuant\(Linear\) feature_axes must be an int, a tuple of ints or None, got "
            r"'x' \(str\)\. .*or None for one grid per variable\.$",
        ),
        (
            FakeQuant,
            {"dtype": jnp.int32},
            r"^FakeQuant\(Linear\) dtype must be None or a real floating-point dtype, got the "
            r"dtype int32: quantised weights are real\. Pass e\.g\. dtype=jnp\.float32",
        ),
    ],
    ids=["bits=1", "bits=True", "epsilon=0", "ws-feature_axes=x", "fq-feature_axes=x", "int32"],
)
def test_invalid_option_fails_when_built(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), **options)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^FakeQuant\(Linear\) has 2 problems:\n  - bits must be an int from 2 to 16, got "
        r"1: .*\n  - symmetric must be True or False, got 'no'\.",
    ):
        FakeQuant(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), bits=1, symmetric="no")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            WeightStandardization,
            r"^WeightStandardization\(Linear\): 'bias' of shape \(3,\) has no axis to "
            r"standardise over \(feature_axes=-1 covers all its axes\), so it would become "
            r"zeros\. Leave it out of variable_filter \(e\.g\. \{'kernel'\}\), or use "
            r"feature_axes=None for one mean and variance over it\.",
        ),
        (
            FakeQuant,
            r"^FakeQuant\(Linear\): 'bias' of shape \(3,\) has no axis to take a grid over "
            r"\(feature_axes=-1 covers all its axes\), so each element would be a grid of its "
            r"own and stay unquantised\. Leave it out of variable_filter \(e\.g\. "
            r"\{'kernel'\}\), or use feature_axes=None for one grid over it\.",
        ),
    ],
    ids=["ws", "fq"],
)
def test_feature_axes_covering_every_axis_fail_when_built(cls, message):
    with pytest.raises(ValueError, match=message):
        cls(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), variable_filter=None)


@pytest.mark.parametrize(
    ("cls", "none_gives"),
    [(WeightStandardization, "one mean and variance"), (FakeQuant, "one grid per variable")],
    ids=["ws", "fq"],
)
def test_feature_axes_out_of_range_fail_when_built(cls, none_gives):
    with pytest.raises(
        ValueError,
        match=rf"^{cls.__name__}\(Conv\): feature_axes=\(0, 4\) is out of range for 'kernel' "
        rf"of shape \(2, 2, 2, 3\)\. Use axes in \[-4, 3\], or feature_axes=None for "
        rf"{none_gives}",
    ):
        cls(nnx.Conv(2, 3, (2, 2), rngs=nnx.Rngs(0)), feature_axes=(0, 4))


def test_fake_quant_refuses_a_complex_kernel_when_built():
    inner = nnx.Linear(4, 3, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))
    with pytest.raises(
        TypeError,
        match=r"^FakeQuant\(Linear\): 'kernel' is complex64, but fake quantisation needs real "
        r"weights\. Leave it out of variable_filter\.$",
    ):
        FakeQuant(inner)


def test_a_filter_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"^FakeQuant\(Linear\): variable_filter .* selects none"):
        FakeQuant(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), variable_filter="kernl")


# -- invert --------------------------------------------------------------------------------


def test_fake_quant_inverts_to_the_value_itself_with_a_caveat():
    inner = layer(KINDS[0])
    leaf = Leaf("kernel", ("kernel",), inner.kernel[...], inner.kernel)
    inverse = FakeQuant(inner, bits=4).invert(leaf)
    assert isinstance(inverse, Inverse)
    assert inverse.value is leaf.value and dict(inverse.variables) == {}
    assert inverse.caveat is not None
    assert inverse.caveat.startswith(
        "FakeQuant(4 bits) reproduces only weights that lie on their own quantisation grid"
    )


def test_weight_standardization_cannot_be_inverted():
    inner = layer(KINDS[0])
    leaf = Leaf("kernel", ("kernel",), inner.kernel[...], inner.kernel)
    with pytest.raises(NotImplementedError, match=r"^WeightStandardization cannot be inverted"):
        WeightStandardization(inner).invert(leaf)


# -- stacks and containers -----------------------------------------------------------------


def test_weight_standardization_of_weight_norm(variant):
    """WS(WN(v)) = standardize(g * v / ||v||): WN first, then WS, per output feature."""
    inner = layer(KINDS[0], bias=False)
    g = np.array([0.5, 2.0, 3.0])
    norm = wrapkit.nnx.WeightNorm(inner)
    norm.scale["kernel"][...] = jnp.asarray(g, jnp.float32)
    model = WeightStandardization(norm)
    v = np.asarray(inner.kernel[...], np.float64)
    expected = numpy_standardize(g * v / np.linalg.norm(v, axis=0), (0,))
    before = raw(model)
    seen = np.asarray(call(variant, model, jnp.eye(4)), np.float64)
    np.testing.assert_allclose(seen, expected, rtol=2e-6, atol=2e-6)
    jax.tree.map(np.testing.assert_array_equal, raw(model), before)
    assert list(model.layer_instance.scale) == ["kernel"]
    assert not hasattr(model, "scale")  # WeightStandardization has no variables of its own


@pytest.mark.parametrize("cls", [WeightStandardization, FakeQuant], ids=["ws", "fq"])
def test_both_linears_of_a_sequential_are_transformed(variant, cls):
    first = layer(KINDS[0], bias=False)
    second = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(1))
    second.kernel[...] = jnp.asarray(tie_free((3, 2)), jnp.float32)
    model = cls(nnx.Sequential(first, jax.nn.relu, second))
    x = np.asarray(KINDS[0].x(), np.float64)
    a, b = (np.asarray(k.kernel[...], np.float64) for k in (first, second))
    expected = np.maximum(x @ reference(cls, {}, a), 0.0) @ reference(cls, {}, b)
    np.testing.assert_allclose(
        call(variant, model, jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-5
    )
