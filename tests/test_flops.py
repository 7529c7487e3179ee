"""wrapkit.flops against hand-derived counts and against XLA's own cost analysis.

XLA's numbers come from ``jax.jit(f).lower(*args).cost_analysis()``, the analysis of the HLO
before optimisation. Inputs are passed as arguments: XLA folds elementwise arithmetic on
compile-time constants, which a test of a rule should not depend on.
"""

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

from wrapkit import flops
from wrapkit.flops import _rules

KEY = jax.random.key(0)


def xla_cost(fn, *args, platform=None):
    """XLA's (flops, transcendentals) for ``fn(*args)``, lowered for ``platform``."""
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # one dict per computation in some jax versions
        cost = cost[0]
    return int(cost.get("flops", 0)), int(cost.get("transcendentals", 0))


def our_cost(fn, *args):
    result = flops.count(fn, *args)
    return result.flops, result.transcendentals


def normal(*shape, dtype=np.float32, seed=0):
    """Concrete data, made in numpy so that no test waits for a compilation."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def spec(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["traced", "jit"])
def variant(request):
    return request.param


# -- Cost and FlopCount --------------------------------------------------------------------------


def test_costs_add_and_multiply_by_integers():
    cost = flops.Cost(flops=2, transcendentals=1)
    assert cost + flops.Cost(flops=3) == flops.Cost(5, 1)
    assert 3 * cost == cost * 3 == flops.Cost(6, 3)
    assert not flops.Cost() and cost
    bits = flops.Cost(rng_bits=64)
    assert bits and 2 * (bits + cost) == flops.Cost(4, 2, 128)
    assert repr(cost) == "Cost(flops=2, transcendentals=1)"
    assert repr(bits) == "Cost(flops=0, transcendentals=0, rng_bits=64)"
    with pytest.raises(TypeError, match="unsupported operand"):
        cost * 1.5


def test_a_count_is_data_with_queries():
    result = flops.count(lambda x, w: jnp.tanh(x @ w), normal(8, 16), normal(16, 4))
    assert result.total == flops.Cost(2 * 8 * 16 * 4, 8 * 4)
    assert dict(result.by_primitive) == {
        "dot_general": flops.Cost(2 * 8 * 16 * 4),
        "tanh": flops.Cost(transcendentals=32),
    }
    assert result.exact and result.unsupported == () and not result.lower_bound
    assert str(result) == "1,024 FLOPs, 32 transcendentals"
    with pytest.raises(TypeError, match="does not support item assignment"):
        result.by_primitive["add"] = flops.Cost()  # type: ignore[index]


def test_counting_a_jitted_function_is_counting_the_function(variant):
    x, w = normal(4, 8), normal(8, 3)
    assert our_cost(variant(lambda x, w: jax.nn.softmax(x @ w)), x, w) == xla_cost(
        lambda x, w: jax.nn.softmax(x @ w), x, w
    )


def test_abstract_arguments_and_pytrees_are_counted_without_running():
    args = {"x": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
    w = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    result = flops.count(lambda tree, w: tree["x"] @ w, args, w=w)
    assert result.flops == 2 * 8 * 16 * 4


# -- hand-derived ground truth -------------------------------------------------------------------

DOTS = {
    "matmul": ("ij,jk->ik", (3, 4), (4, 5), 2 * 3 * 4 * 5),
    "batched": ("bij,bjk->bik", (2, 3, 4), (2, 4, 5), 2 * 2 * 3 * 4 * 5),
    "two_contracting": ("ijk,jkl->il", (3, 4, 5), (4, 5, 6), 2 * 3 * 6 * (4 * 5)),
    "inner": ("i,i->", (7,), (7,), 2 * 7),
    "outer": ("i,j->ij", (3,), (4,), 2 * 3 * 4),
    "batch_and_free": ("bhqd,bhkd->bhqk", (2, 4, 5, 8), (2, 4, 6, 8), 2 * 2 * 4 * 5 * 6 * 8),
}


@pytest.mark.parametrize("spec,lhs,rhs,expected", DOTS.values(), ids=DOTS.keys())
def test_dot_general_is_two_flops_per_multiply_add(spec, lhs, rhs, expected):
    fn = functools.partial(jnp.einsum, spec)
    assert our_cost(fn, normal(*lhs), normal(*rhs)) == (expected, 0)
    assert xla_cost(fn, normal(*lhs), normal(*rhs)) == (expected, 0)


def conv2d(x, k, strides=(1, 1), padding="SAME", lhs_dilation=None, rhs_dilation=None, groups=1):
    return lax.conv_general_dilated(
        x,
        k,
        strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        ("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# (input NHWC, kernel HWIO, options, multiply-adds worked out by hand)
CONVS = {
    # Per dimension, an output of 4 under a 3-tap window padded (1, 1) sees 2, 3, 3, 2 real
    # taps: 10. In 2-D: 4 corners x 4 + 8 edges x 6 + 4 inner x 9 = 100 = 10 * 10.
    "same_3x3_on_4x4": ((1, 4, 4, 1), (3, 3, 1, 1), {}, 100),
    "same_3x3_on_4x4_channels": ((2, 4, 4, 2), (3, 3, 2, 3), {}, 2 * 100 * 2 * 3),
    # A 2x2 output, each position reading all 9 taps.
    "valid_3x3_on_4x4": ((1, 4, 4, 1), (3, 3, 1, 1), {"padding": "VALID"}, 4 * 9),
    # SAME with stride 2 pads (0, 1): the outputs read 3 and 2 real rows, so 5 per dimension.
    "strided_same": ((1, 4, 4, 1), (3, 3, 1, 1), {"strides": (2, 2)}, 5 * 5),
    # A 3x3 kernel dilated by 2 spans 5: one output on a 5x5 input, 9 taps.
    "dilated_kernel": ((1, 5, 5, 1), (3, 3, 1, 1), {"padding": "VALID", "rhs_dilation": (2, 2)}, 9),
    # Depthwise: each of the 4 output channels reads 1 input channel, 16 positions x 9 taps in
    # VALID on 6x6.
    "depthwise": ((1, 6, 6, 4), (3, 3, 1, 4), {"padding": "VALID", "groups": 4}, 4 * 16 * 9),
    # Input dilation 2 puts holes between the 3 real inputs (length 5); padded (2, 2) and read by
    # 3 taps, each real input meets each tap once: 3 * 3 per dimension.
    "lhs_dilated": (
        (1, 3, 3, 1),
        (3, 3, 1, 1),
        {"padding": ((2, 2), (2, 2)), "lhs_dilation": (2, 2)},
        9 * 9,
    ),
}


@pytest.mark.parametrize("lhs,rhs,options,multiply_adds", CONVS.values(), ids=CONVS.keys())
def test_convolution_counts_only_kernel_taps_on_real_input(lhs, rhs, options, multiply_adds):
    fn = functools.partial(conv2d, **options)
    x, k = normal(*lhs), normal(*rhs)
    assert our_cost(fn, x, k) == (2 * multiply_adds, 0)
    assert xla_cost(fn, x, k) == (2 * multiply_adds, 0)


def test_transposed_convolution_counts_each_input_once_per_kernel_tap():
    # A stride-2 transposed convolution of 3 inputs with 3 taps: every input meets every tap once.
    fn = functools.partial(lax.conv_transpose, strides=(2,), padding="VALID")
    x, k = normal(1, 3, 2), normal(3, 2, 5)  # NWC, WIO: 2 -> 5 channels
    assert our_cost(fn, x, k) == (2 * 3 * 3 * 2 * 5, 0)
    assert xla_cost(fn, x, k) == (2 * 3 * 3 * 2 * 5, 0)


HAND = {
    # 40 elements summed into 4: 36 additions.
    "reduce_sum": (lambda x: x.sum(axis=1), (4, 10), (36, 0)),
    # XLA assumes a comparison sort, n * ceil(log2 n) over all 40 elements.
    "sort": (lambda x: jnp.sort(x, axis=1), (4, 10), (40 * 6, 0)),
    # A cumulative sum is a reduce-window spanning the whole axis: n - 1 steps per output.
    "cumsum": (lambda x: jnp.cumsum(x, axis=1), (4, 10), (40 * 9, 0)),
    # 2x2 max pooling, stride 2, on 4x6: 6 windows of 3 comparisons.
    "max_pool": (lambda x: nn.max_pool(x[None, ..., None], (2, 2), (2, 2)), (4, 6), (6 * 3, 0)),
    # x**5 = x**4 * x by squaring: x*x, (x*x)**2, * x.
    "integer_pow": (lambda x: x**5, (4, 10), (40 * 3, 0)),
    # exp is one transcendental per element, no FLOP.
    "exp": (jnp.exp, (4, 10), (0, 40)),
}


@pytest.mark.parametrize("fn,shape,expected", HAND.values(), ids=HAND.keys())
def test_families_against_hand_derived_counts(fn, shape, expected):
    assert our_cost(fn, normal(*shape)) == expected
    assert xla_cost(fn, normal(*shape)) == expected


def test_factories_cost_per_element_and_per_combining_step():
    eqn = jax.make_jaxpr(lambda x: x.max(axis=0))(normal(6, 5)).eqns[0]
    assert flops.elementwise(flops=2, transcendentals=1)(eqn) == flops.Cost(10, 5)
    assert flops.reduction(flops=3)(eqn) == flops.Cost(3 * (30 - 5))


# -- parity with XLA, primitive by primitive -----------------------------------------------------

UNARY = {
    "neg": lax.neg,
    "abs": lax.abs,
    "sign": lax.sign,
    "floor": lax.floor,
    "ceil": lax.ceil,
    "round": lax.round,
    "round_even": functools.partial(lax.round, rounding_method=lax.RoundingMethod.TO_NEAREST_EVEN),
    "is_finite": lax.is_finite,
    "exp": lax.exp,
    "exp2": lax.exp2,
    "expm1": lax.expm1,
    "log": lax.log,
    "log1p": lax.log1p,
    "tanh": lax.tanh,
    "logistic": lax.logistic,
    "sin": lax.sin,
    "cos": lax.cos,
    "tan": lax.tan,
    "asin": lax.asin,
    "acos": lax.acos,
    "atan": lax.atan,
    "sinh": lax.sinh,
    "cosh": lax.cosh,
    "asinh": lax.asinh,
    "acosh": lambda x: lax.acosh(x + 2),
    "atanh": lambda x: lax.atanh(x / 8),
    "erf": lax.erf,
    "erfc": lax.erfc,
    "erf_inv": lambda x: lax.erf_inv(x / 8),
    "lgamma": lax.lgamma,
    "digamma": lax.digamma,
    "bessel_i0e": lax.bessel_i0e,
    "bessel_i1e": lax.bessel_i1e,
    "sqrt": lax.sqrt,
    "rsqrt": lax.rsqrt,
    "cbrt": lax.cbrt,
    "square": lax.square,
    "integer_pow_3": lambda x: lax.integer_pow(x, 3),
    "integer_pow_-2": lambda x: lax.integer_pow(x, -2),
    "integer_pow_0": lambda x: lax.integer_pow(x, 0),
    "reciprocal": lax.reciprocal,
    "reduce_precision": lambda x: lax.reduce_precision(x, 5, 10),
    "convert_to_int": lambda x: x.astype(jnp.int32),
    "convert_to_bool": lambda x: x.astype(jnp.bool_),
    "convert_to_bfloat16": lambda x: x.astype(jnp.bfloat16),
    "bitcast_convert": lambda x: lax.bitcast_convert_type(x, jnp.int32),
    "not": lambda x: ~(x > 0),
    "population_count": lambda x: lax.population_count(x.astype(jnp.int32)),
    "clz": lambda x: lax.clz(x.astype(jnp.int32)),
    "stop_gradient": lax.stop_gradient,
    "relu": jax.nn.relu,
    "gelu_tanh": jax.nn.gelu,
    "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "logsumexp": jax.nn.logsumexp,
    "standardize": jax.nn.standardize,
    "one_plus_x_times_one": lambda x: (x + 0) * 1 - 0,  # identities XLA drops
    "complex_exp": lambda x: jnp.exp(x.astype(jnp.complex64)),
    "complex_log": lambda x: jnp.log(x.astype(jnp.complex64)),
    "complex_sqrt": lambda x: jnp.sqrt(x.astype(jnp.complex64)),
    "complex_abs": lambda x: jnp.abs(x.astype(jnp.complex64)),
    "conj": lambda x: jnp.conj(x.astype(jnp.complex64)),
    "real": lambda x: jnp.real(x.astype(jnp.complex64)),
}

BINARY = {
    "add": lax.add,
    "sub": lax.sub,
    "mul": lax.mul,
    "div": lax.div,
    "max": lax.max,
    "min": lax.min,
    "rem": lax.rem,
    "pow": lax.pow,
    "atan2": lax.atan2,
    "nextafter": lax.nextafter,
    "eq": lax.eq,
    "lt": lax.lt,
    "ge": lax.ge,
    "and": lambda x, y: (x > 0) & (y > 0),
    "or": lambda x, y: (x > 0) | (y > 0),
    "xor": lambda x, y: (x > 0) ^ (y > 0),
    "shift_left": lambda x, y: lax.shift_left(x.astype(jnp.int32), y.astype(jnp.int32)),
    "integer_div": lambda x, y: lax.div(x.astype(jnp.int32), y.astype(jnp.int32) + 3),
    "select_bool": lambda x, y: lax.select(x > y, x, y),
    "select_n_int": lambda x, y: lax.select_n((x > 0).astype(jnp.int32) + (y > 0), x, y, x * y),
    "clamp": lambda x, y: lax.clamp(-1.0, x, y),
    "clip": lambda x, y: jnp.clip(x, -0.5, 0.5) + y,
    "where": lambda x, y: jnp.where(x > 0, x, y),
    "polygamma": lambda x, y: lax.polygamma(jnp.round(jnp.abs(x)), jnp.abs(y) + 1),
    "zeta": lambda x, y: lax.zeta(jnp.abs(x) + 2, jnp.abs(y) + 1),
    "complex": lax.complex,
    "complex_mul": lambda x, y: lax.complex(x, y) * lax.complex(y, x),
    "logaddexp": jnp.logaddexp,
    "matmul_bf16_to_f32": lambda x, y: jnp.matmul(
        x.astype(jnp.bfloat16), y.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    ),
}


@pytest.mark.parametrize("fn", UNARY.values(), ids=UNARY.keys())
def test_elementwise_matches_xla(fn):
    x = normal(6, 7)
    assert our_cost(fn, x) == xla_cost(fn, x)


@pytest.mark.parametrize("fn", BINARY.values(), ids=BINARY.keys())
def test_binary_matches_xla(fn):
    x, y = normal(6, 7), normal(6, 7, seed=1)
    assert our_cost(fn, x, y) == xla_cost(fn, x, y)


EXPANDED = ["erfc", "erf_inv", "lgamma", "digamma", "bessel_i0e", "sinh", "cosh", "asin", "atanh"]
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: jnp.dtype(dtype).name)
@pytest.mark.parametrize("name", EXPANDED)
def test_expansions_follow_xla_for_each_float_width(name, dtype):
    """16-bit floats are computed in float32 (two more converts); float64 may use more terms."""
    with jax.enable_x64(dtype == jnp.float64):
        x = normal(5, 3, dtype=dtype)
        assert our_cost(UNARY[name], x) == xla_cost(UNARY[name], x)


ITERATIVE = {
    "igamma": lambda x, y: lax.igamma(jnp.abs(x) + 1, jnp.abs(y) + 1),
    "igammac": lambda x, y: lax.igammac(jnp.abs(x) + 1, jnp.abs(y) + 1),
    "betainc": lambda x, y: lax.betainc(jnp.abs(x) + 1, jnp.abs(y) + 1, jax.nn.sigmoid(x)),
}


@pytest.mark.parametrize("fn", ITERATIVE.values(), ids=ITERATIVE.keys())
def test_series_expansions_match_xla_within_its_loop_constant(fn):
    """XLA adds one FLOP per program for the series' while loop, which a rule cannot see."""
    x, y = normal(16, 8), normal(16, 8, seed=1)
    ours, theirs = our_cost(fn, x, y), xla_cost(fn, x, y)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-3) and ours[1] == theirs[1]


INDEX = jnp.array([[2], [0], [5]])
GATHER = lax.GatherDimensionNumbers(
    offset_dims=(0, 2), collapsed_slice_dims=(1,), start_index_map=(1,)
)
SCATTER = lax.ScatterDimensionNumbers(
    update_window_dims=(0, 2), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1,)
)

STRUCTURED = {
    "reduce_max": lambda x: x.max(axis=(0, 2)),
    "reduce_prod": lambda x: x.prod(axis=1),
    "reduce_and": lambda x: (x > 0).all(axis=1),
    "argmax": lambda x: jnp.argmax(x, axis=1),
    "argmin_int": lambda x: jnp.argmin(x.astype(jnp.int32), axis=2),
    "reduce_custom": lambda x: lax.reduce(x, 0.0, lambda a, b: a * b + a, (1,)),
    "cumprod": lambda x: jnp.cumprod(x, axis=1),
    "cummax_reverse": lambda x: lax.cummax(x, axis=2, reverse=True),
    "cumlogsumexp": lambda x: lax.cumlogsumexp(x, axis=1),
    "reduce_window_sum": lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 3, 3), (1, 1, 1), "SAME"),
    "reduce_window_min": lambda x: lax.reduce_window(
        x, jnp.inf, lax.min, (1, 3, 2), (1, 2, 1), "SAME"
    ),
    "reduce_window_custom": lambda x: lax.reduce_window(
        x, 1.0, lambda a, b: a * b, (1, 2, 2), (1, 1, 1), "VALID"
    ),
    "reduce_then_broadcast_window": lambda x: lax.reduce_window(
        x, 0.0, lax.add, (1, 19, 1), (1, 1, 1), ((0, 0), (9, 9), (0, 0))
    ),
    "avg_pool": lambda x: nn.avg_pool(x, (3,), strides=(2,), padding="SAME"),
    "avg_pool_no_pad_count": lambda x: nn.avg_pool(
        x, (3,), padding="SAME", count_include_pad=False
    ),
    "max_pool_grad": jax.grad(lambda x: nn.max_pool(x, (2,), (2,)).sum()),
    "max_pool_jvp": lambda x: jax.jvp(lambda x: nn.max_pool(x, (3,), (2,)), (x,), (x,)),
    "sort_two_operands": lambda x: lax.sort((x, -x), dimension=1, num_keys=1),
    "argsort": lambda x: jnp.argsort(x, axis=2),
    "top_k": lambda x: lax.top_k(x, 3),
    "approx_max_k": lambda x: lax.approx_max_k(x, 3),
    "gather": lambda x: lax.gather(x, INDEX, GATHER, (4, 1, 8)),
    "scatter_add": lambda x: lax.scatter_add(x, INDEX, x[:, :3], SCATTER),
    "scatter_mul": lambda x: lax.scatter_mul(x, INDEX, x[:, :3], SCATTER),
    "scatter": lambda x: lax.scatter(x, INDEX, x[:, :3], SCATTER),
    "fft": jnp.fft.fft,
    "rfft2": jnp.fft.rfft2,
    "one_hot": lambda x: jax.nn.one_hot(jnp.argmax(x, axis=-1), 8),
    "variance": lambda x: x.var(axis=1),
    "dynamic_slice": lambda x: lax.dynamic_slice(x, (1, 2, 3), (2, 2, 2)),
}


@pytest.mark.parametrize("fn", STRUCTURED.values(), ids=STRUCTURED.keys())
def test_structured_primitives_match_xla(fn):
    x = normal(4, 19, 8)
    assert our_cost(fn, x) == xla_cost(fn, x)


def test_fill_or_drop_gather_pays_for_its_mask_as_xla_does():
    table, ids = normal(50, 8), jnp.array([[1, 2, 3], [49, 0, 7]])
    for mode in ["fill", "clip", "wrap"]:
        fn = functools.partial(jnp.take, axis=0, mode=mode)
        assert our_cost(fn, table, ids) == xla_cost(fn, table, ids)
    # Fill: jnp.take wraps negative indices (lt, add, select: 3 per index); the gather's mask
    # compares each with 0 and the bound and ands the two (3 more), and the 6x8 output is
    # selected against the fill value.
    assert our_cost(functools.partial(jnp.take, axis=0), table, ids) == (6 * 6 + 6 * 8, 0)


ZEROS = {
    "reshape": lambda x: x.reshape(-1),
    "transpose": lambda x: x.T,
    "broadcast": lambda x: jnp.broadcast_to(x, (2, *x.shape)),
    "squeeze": lambda x: x[None].squeeze(0),
    "slice": lambda x: x[1:3, ::2],
    "rev": lambda x: x[::-1],
    "concatenate": lambda x: jnp.concatenate([x, x]),
    "stack": lambda x: jnp.stack([x, x]),
    "tile": lambda x: jnp.tile(x, (2, 2)),
    "pad": lambda x: lax.pad(x, 0.0, ((1, 2, 1), (0, -1, 0))),
    "split": lambda x: jnp.split(x, 2, axis=0),
    "iota": lambda x: jnp.arange(7.0),
    "copy": lambda x: jnp.array(x, copy=True),
    "optimization_barrier": lax.optimization_barrier,
    "dynamic_update_slice": lambda x: lax.dynamic_update_slice(x, x[:2, :3], (1, 2)),
}


@pytest.mark.parametrize("fn", ZEROS.values(), ids=ZEROS.keys())
def test_data_movement_is_free(fn):
    x = normal(6, 8)
    assert our_cost(fn, x) == xla_cost(fn, x) == (0, 0)


def test_dead_code_is_not_counted_as_jax_drops_it_before_lowering():
    def fn(x, w):
        _ = jnp.exp(x @ w)  # unused
        return x + 1

    x, w = normal(8, 8), normal(8, 8)
    assert our_cost(fn, x, w) == xla_cost(fn, x, w) == (64, 0)


def test_work_on_constants_is_folded_as_xla_folds_it():
    table = jnp.arange(8.0)

    def fn(x):
        scale = jnp.sqrt(2.0) * jnp.sin(table)  # constants only: folded
        return x * scale

    x = normal(4, 8)
    assert our_cost(fn, x) == xla_cost(fn, x) == (32, 0)


# -- convolutions against XLA --------------------------------------------------------------------


@st.composite
def convolutions(draw):
    ndim = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    batch_groups = 1 if groups > 1 else draw(st.sampled_from([1, 1, 2]))
    return {
        "lhs": (
            batch_groups * draw(st.integers(1, 2)),
            groups * draw(st.integers(1, 3)),
            *(draw(st.integers(1, 9)) for _ in range(ndim)),
        ),
        "out_features": groups * batch_groups * draw(st.integers(1, 3)),
        "kernel": tuple(draw(st.integers(1, 4)) for _ in range(ndim)),
        "window_strides": tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
        "padding": tuple((draw(st.integers(-1, 3)), draw(st.integers(-1, 3))) for _ in range(ndim)),
        "lhs_dilation": tuple(draw(st.sampled_from([1, 1, 2, 3])) for _ in range(ndim)),
        "rhs_dilation": tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(ndim)),
        "feature_group_count": groups,
        "batch_group_count": batch_groups,
    }


@settings(max_examples=60, deadline=None)
@given(options=convolutions())
def test_every_convolution_matches_xla_exactly(options):
    options = dict(options)
    lhs = spec(*options.pop("lhs"))
    in_features = lhs.shape[1] // options["feature_group_count"]
    rhs = spec(options.pop("out_features"), in_features, *options.pop("kernel"))
    fn = functools.partial(lax.conv_general_dilated, **options)
    try:
        out = jax.eval_shape(fn, lhs, rhs)
    except (TypeError, ValueError):
        out = None  # not a valid convolution: a negative output size
    assume(out is not None and math.prod(out.shape) > 0)
    assert our_cost(fn, lhs, rhs) == xla_cost(fn, lhs, rhs)


TRANSPOSED = {
    "valid": {"strides": (2, 2), "padding": "VALID"},
    "same": {"strides": (2, 3), "padding": "SAME"},
    "explicit": {"strides": (3, 1), "padding": ((1, 2), (0, 1))},
    "dilated": {"strides": (1, 1), "padding": "SAME", "rhs_dilation": (2, 1)},
    "transpose_kernel": {"strides": (2, 2), "padding": "SAME", "transpose_kernel": True},
}


@pytest.mark.parametrize("options", TRANSPOSED.values(), ids=TRANSPOSED.keys())
def test_transposed_convolution_matches_xla_exactly(options):
    fn = functools.partial(
        lax.conv_transpose, dimension_numbers=("NHWC", "HWIO", "NHWC"), **options
    )
    # 3 input features to 4 output features; a transposed kernel swaps its I and O.
    kernel = (3, 2, 4, 3) if options.get("transpose_kernel") else (3, 2, 3, 4)
    x, k = spec(2, 5, 4, 3), spec(*kernel)
    assert our_cost(fn, x, k) == xla_cost(fn, x, k)


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", 1], ids=str)
@pytest.mark.parametrize("layer", [nn.Conv, nn.ConvTranspose], ids=lambda cls: cls.__name__)
def test_flax_convolutions_match_xla_exactly(layer, padding):
    module = layer(6, (3, 3), strides=(2, 2), padding=padding)
    x = spec(2, 7, 6, 3)
    variables = jax.eval_shape(module.init, KEY, x)
    assert our_cost(module.apply, variables, x) == xla_cost(module.apply, variables, x)


# -- models --------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (64, 32):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Conv(16, (3, 3), strides=2, padding="VALID")(x)
        x = nn.avg_pool(x, (2, 2), padding="SAME")
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(100, 32)(tokens)
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=4)(h, h, deterministic=True)
        x = x + nn.Dropout(0.1, deterministic=True)(h)
        h = nn.Dense(32)(nn.gelu(nn.Dense(128)(nn.LayerNorm()(x))))
        return x + h


MODELS = {
    "mlp": (MLP(), spec(4, 20)),
    "cnn": (CNN(), spec(2, 16, 16, 3)),
    "transformer_block": (Block(), spec(2, 10, dtype=jnp.int32)),
}


def programs(model, x):
    """The model's forward, gradient and VJP programs, on abstract variables."""
    variables = jax.eval_shape(model.init, KEY, x)

    def forward(variables, x):
        return model.apply(variables, x)

    def grad(variables, x):
        return jax.grad(lambda v: jnp.mean(model.apply(v, x) ** 2))(variables)

    def vjp(variables, x, cotangent):
        return jax.vjp(lambda v: model.apply(v, x), variables)[1](cotangent)

    cotangent = jax.eval_shape(forward, variables, x)
    return {
        "forward": (forward, (variables, x)),
        "grad": (grad, (variables, x)),
        "vjp": (vjp, (variables, x, cotangent)),
    }


@pytest.mark.parametrize("program", ["forward", "grad", "vjp"])
@pytest.mark.parametrize("model,x", MODELS.values(), ids=MODELS.keys())
def test_models_and_their_gradients_match_xla(model, x, program):
    fn, args = programs(model, x)[program]
    ours, theirs = our_cost(fn, *args), xla_cost(fn, *args)
    assert ours[0] == pytest.approx(theirs[0], rel=0.01)
    assert ours[1] == pytest.approx(theirs[1], rel=0.01)


def test_batch_norm_in_training_and_its_gradient_match_xla():
    model, x = CNN(), spec(2, 16, 16, 3)
    variables = jax.eval_shape(model.init, KEY, x)

    def loss(params, batch_stats, x):
        variables = {"params": params, "batch_stats": batch_stats}
        out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return out.sum()

    args = (variables["params"], variables["batch_stats"], x)
    for fn in [loss, jax.grad(loss)]:
        ours, theirs = our_cost(fn, *args), xla_cost(fn, *args)
        assert ours[0] == pytest.approx(theirs[0], rel=0.01) and ours[1] == theirs[1]


# -- calls, loops and branches -------------------------------------------------------------------

A = normal(8, 8, seed=3)


def test_scan_counts_its_body_length_times_where_xla_counts_it_once():
    def scanned(c, a):
        return lax.scan(lambda c, x: (jnp.tanh(c @ a), None), c, None, length=10)[0]

    def unrolled(c, a):
        for _ in range(10):
            c = jnp.tanh(c @ a)
        return c

    c = normal(4, 8)
    body = (2 * 4 * 8 * 8, 4 * 8)
    assert our_cost(scanned, c, A) == our_cost(unrolled, c, A) == xla_cost(unrolled, c, A)
    assert our_cost(scanned, c, A) == (10 * body[0], 10 * body[1])
    # XLA counts a loop body once, plus the loop's own counter increment and compare.
    assert xla_cost(scanned, c, A) == (body[0] + 2, body[1])


def test_a_while_loop_is_counted_once_and_flagged_a_lower_bound():
    def fn(c, a, n):
        return lax.fori_loop(0, n, lambda i, c: c @ a, c)

    c = normal(4, 8)
    result = flops.count(fn, c, A, 5)
    assert result.lower_bound and not result.exact
    assert "lower bound" in str(result)
    # Once: the body's matmul, the counter's increment and compare. So does XLA.
    assert (result.flops, result.transcendentals) == (2 * 4 * 8 * 8 + 2, 0)
    assert xla_cost(fn, c, A, 5) == (result.flops, 0)


def test_a_loop_with_static_bounds_is_a_scan_and_counted_in_full():
    result = flops.count(lambda c, a: lax.fori_loop(0, 3, lambda i, c: c @ a, c), normal(4, 8), A)
    # The counter's increment is dead code: the loop's result does not use it.
    assert result.flops == 3 * 2 * 4 * 8 * 8 and not result.lower_bound


def test_cond_counts_its_most_expensive_branch_and_says_so():
    def fn(c, a, i):
        return lax.switch(i, [lambda u: jnp.sin(u), lambda u: u @ a, lambda u: u + 1], c)

    c = normal(4, 8)
    result = flops.count(fn, c, A, 1)
    assert result.branches == 1 and not result.exact
    assert result.flops == 2 * 4 * 8 * 8 + 1  # the matmul branch, and clamping the index
    assert xla_cost(fn, c, A, 1)[0] == result.flops  # XLA too takes the largest


def test_remat_is_counted_once_forward_and_its_recomputation_in_the_backward_pass():
    def loss(c, a, remat):
        block = lambda u: jnp.sin(jnp.sin(u @ a)) @ a  # noqa: E731
        return jnp.sum((jax.checkpoint(block) if remat else block)(c))

    c = normal(4, 8)
    plain = functools.partial(loss, remat=False)
    remat = functools.partial(loss, remat=True)
    assert our_cost(remat, c, A) == our_cost(plain, c, A) == xla_cost(remat, c, A)
    value_and_grad_plain = jax.value_and_grad(plain)
    value_and_grad_remat = jax.value_and_grad(remat)
    recomputed = our_cost(value_and_grad_remat, c, A)
    assert recomputed == xla_cost(value_and_grad_remat, c, A)
    # The backward pass recomputes u @ a and the first sin, which plain autodiff had saved.
    assert recomputed[0] - our_cost(value_and_grad_plain, c, A)[0] == 2 * 4 * 8 * 8
    assert recomputed[1] - our_cost(value_and_grad_plain, c, A)[1] == 4 * 8


@jax.custom_jvp
def custom_jvp_fn(x):
    return jnp.exp(x) @ A


custom_jvp_fn.defjvp(lambda p, t: (custom_jvp_fn(p[0]), (jnp.exp(p[0]) * t[0]) @ A))


@jax.custom_vjp
def custom_vjp_fn(x):
    return jnp.sin(x) @ A


custom_vjp_fn.defvjp(lambda x: (custom_vjp_fn(x), x), lambda x, g: (jnp.cos(x) * (g @ A.T),))

CALLS = {
    "custom_jvp": custom_jvp_fn,
    "custom_jvp_grad": jax.grad(lambda x: custom_jvp_fn(x).sum()),
    "custom_vjp": custom_vjp_fn,
    "custom_vjp_grad": jax.grad(lambda x: custom_vjp_fn(x).sum()),
    "nested_jit": jax.jit(lambda x: jax.jit(lambda u: jnp.exp(u @ A))(x) @ A),
    "dot_product_attention": lambda x: jax.nn.dot_product_attention(
        x[None, :, None], x[None, :, None], x[None, :, None]
    ),
    "linear_solve": lambda x: lax.custom_linear_solve(lambda v: 2.0 * v, x, lambda _, v: v / 2.0),
}


@pytest.mark.parametrize("fn", CALLS.values(), ids=CALLS.keys())
def test_calls_are_recursed_into_as_xla_does(fn):
    x = normal(4, 8)
    assert our_cost(fn, x) == xla_cost(fn, x)


def test_shard_map_counts_its_body_on_every_shard():
    mesh = jax.sharding.AbstractMesh((4,), ("i",))  # enough to trace; nothing runs
    fn = jax.shard_map(
        lambda x: jnp.sin(x @ x.T), mesh=mesh, in_specs=jax.P("i"), out_specs=jax.P("i")
    )
    # Each of 4 shards multiplies its (2, 8) rows by their (8, 2) transpose and takes the sin.
    assert our_cost(fn, spec(8, 8)) == (4 * 2 * 2 * 2 * 8, 4 * 2 * 2)


# -- random numbers ------------------------------------------------------------------------------

RANDOM = {
    "bits": lambda key: jax.random.bits(key, (6, 10, 8)),
    "bits_uint8_odd": lambda key: jax.random.bits(key, (7, 3), jnp.uint8),
    "normal": lambda key: jax.random.normal(key, (6, 10, 8)),
    "uniform": lambda key: jax.random.uniform(key, (300,)),
    "bernoulli": lambda key: jax.random.bernoulli(key, 0.3, (6, 10, 8)),
    "split": lambda key: jax.random.split(key, 50),
    "fold_in": lambda key: jax.random.fold_in(key, 7),
    "dropout": lambda key: nn.Dropout(0.5, deterministic=False).apply(
        {}, jnp.ones((16, 32)), rngs={"dropout": key}
    ),
}


# Random bits made per call with a threefry key (2 x 32 bits of key data) and an RBG key (4 x 32).
RANDOM_BITS = {
    "bits": lambda key_bits: 6 * 10 * 8 * 32,
    "bits_uint8_odd": lambda key_bits: 7 * 3 * 8,
    "normal": lambda key_bits: 6 * 10 * 8 * 32,
    "uniform": lambda key_bits: 300 * 32,
    "bernoulli": lambda key_bits: 6 * 10 * 8 * 32,
    "split": lambda key_bits: 50 * key_bits,
    "fold_in": lambda key_bits: key_bits,
    "dropout": lambda key_bits: 16 * 32 * 32 + key_bits,  # flax folds the stream in first
}
# The bits each one turns into numbers, for XLA's count of making them alone.
RANDOM_SOURCE = {
    "normal": lambda key: jax.random.bits(key, (6, 10, 8)),
    "uniform": lambda key: jax.random.bits(key, (300,)),
    "bernoulli": lambda key: jax.random.bits(key, (6, 10, 8)),
    "dropout": lambda key: jax.random.bits(jax.random.fold_in(key, 0), (16, 32)),
}


@pytest.mark.parametrize("impl,key_bits", [("threefry2x32", 64), ("rbg", 128)])
@pytest.mark.parametrize("name", RANDOM)
def test_random_bits_are_rng_bits_and_what_uses_them_flops(name, impl, key_bits):
    """FLOPs mean what papers mean: threefry's hash (117 integer ops a word) counted as FLOPs.

    What turns the bits into numbers is arithmetic, and matches XLA's count of the whole
    program less its count of generating the bits (GPU lowering: on CPU, JAX rolls
    threefry's rounds into a loop), within XLA's folding of a few scalar key operations.
    """
    key = jax.random.key(3, impl=impl)
    result = flops.count(RANDOM[name], key)
    assert result.rng_bits == RANDOM_BITS[name](key_bits)
    assert result.total == flops.Cost(
        result.flops, result.transcendentals, RANDOM_BITS[name](key_bits)
    )
    if name in RANDOM_SOURCE:
        whole = xla_cost(RANDOM[name], key, platform="cuda")
        source = xla_cost(RANDOM_SOURCE[name], key, platform="cuda")
        assert abs(result.flops - (whole[0] - source[0])) <= 6
        assert result.transcendentals == whole[1] - source[1]
    else:  # bits and keys only
        assert (result.flops, result.transcendentals) == (0, 0)


def test_random_bits_are_reported_per_primitive_and_never_as_flops():
    key = jax.random.key(3)
    result = flops.count(lambda key: jax.random.uniform(key, (8, 16)), key)
    assert result.by_primitive["random_bits"] == flops.Cost(rng_bits=8 * 16 * 32)
    assert "threefry2x32" not in result.by_primitive
    assert str(result).endswith(", 4,096 random bits")
    # Raw generators too: lax's rng_bit_generator and the threefry hash on words.
    raw = flops.count(
        lambda k: lax.rng_bit_generator(k, (8, 16), dtype=jnp.uint32)[1], spec(4, dtype=jnp.uint32)
    )
    assert raw.total == flops.Cost(rng_bits=8 * 16 * 32)
    uniform = flops.count(lambda x: x + lax.rng_uniform(0.0, 1.0, x.shape), spec(8, 16))
    assert uniform.total == flops.Cost(flops=8 * 16, rng_bits=8 * 16 * 32)  # the + only
    words = spec(8, 16, dtype=jnp.uint32)
    hashed = flops.count(jax.extend.random.threefry_2x32, spec(2, dtype=jnp.uint32), words)
    assert hashed.by_primitive["threefry2x32"] == flops.Cost(rng_bits=8 * 16 * 32)


def test_on_cpu_xla_sees_threefry_as_a_loop_and_counts_its_body_once():
    key = jax.random.key(3)
    fn = RANDOM["bits"]
    assert xla_cost(fn, key)[0] < xla_cost(fn, key, platform="cuda")[0] / 3
    assert flops.count(fn, key).exact  # ours is the same on every platform


# -- unsupported primitives and rules ------------------------------------------------------------

twice_p = jax.extend.core.Primitive("twice_for_tests")
twice_p.def_abstract_eval(lambda x: x)


def uses_twice(x):
    return twice_p.bind(twice_p.bind(x @ A)) + 1


def test_a_primitive_without_a_rule_is_listed_and_warned_about_once():
    x = normal(4, 8)
    message = (
        r"No FLOP rule for primitive\(s\) twice_for_tests; .* rules=\{'twice_for_tests': rule\}"
        r".*register_rule\('twice_for_tests'\)"
    )
    with pytest.warns(flops.UnsupportedPrimitiveWarning, match=message) as caught:
        result = flops.count(uses_twice, x)
    assert len(caught) == 1
    assert caught[0].filename == __file__  # it points at the caller's line
    assert result.unsupported == ("twice_for_tests",) and not result.exact
    assert result.flops == 2 * 4 * 8 * 8 + 4 * 8  # the matmul and the add only
    assert "unsupported, counted as 0: twice_for_tests" in str(result)


def test_rules_for_one_call_leave_the_registry_alone():
    x = normal(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = flops.count(uses_twice, x, rules={"twice_for_tests": flops.elementwise(flops=1)})
    assert result.unsupported == ()
    assert result.by_primitive["twice_for_tests"] == flops.Cost(2 * 4 * 8)
    assert "twice_for_tests" not in _rules._RULES
    with pytest.warns(flops.UnsupportedPrimitiveWarning, match="twice_for_tests"):
        assert flops.count(uses_twice, x).unsupported == ("twice_for_tests",)


def test_register_rule_adds_a_rule_for_every_later_count():
    try:

        @flops.register_rule("twice_for_tests")
        def twice_rule(eqn):
            return flops.Cost(flops=math.prod(eqn.outvars[0].aval.shape))

        assert flops.count(uses_twice, normal(4, 8)).by_primitive["twice_for_tests"] == (
            flops.Cost(2 * 4 * 8)
        )
    finally:
        del _rules._RULES["twice_for_tests"]


def test_rules_replace_built_in_ones_for_one_call():
    result = flops.count(jnp.exp, normal(3, 4), rules={"exp": flops.elementwise(flops=20)})
    assert result.total == flops.Cost(flops=240)
    assert flops.count(jnp.exp, normal(3, 4)).total == flops.Cost(transcendentals=12)


# -- on_cost -------------------------------------------------------------------------------------


def test_on_cost_reports_every_leaf_with_its_full_name_stack():
    def fn(x, a):
        with jax.named_scope("a"):

            @jax.jit
            def inner(u):
                with jax.named_scope("b"):
                    return jnp.sin(u @ a)

            y = inner(x)
        with jax.named_scope("loop"):

            def body(c, _):
                with jax.named_scope("step"):
                    return c @ a, None

            y = lax.scan(body, y, None, length=3)[0]
        return lax.cond(y.sum() > 0, lambda u: u @ a, lambda u: jnp.exp(u), y).sum()

    x = normal(4, 8)
    reports = []
    result = flops.count_jaxpr(
        jax.make_jaxpr(fn)(x, A), on_cost=lambda *report: reports.append(report)
    )
    matmul = flops.Cost(2 * 4 * 8 * 8)
    assert reports == [
        (("a", "b"), "dot_general", matmul),
        (("a", "b"), "sin", flops.Cost(transcendentals=32)),
        (("loop", "step"), "dot_general", 3 * matmul),  # already times the scan's length
        ((), "reduce_sum", flops.Cost(31)),
        ((), "gt", flops.Cost(1)),
        ((), "convert_element_type", flops.Cost(1)),
        ((), "dot_general", matmul),  # the counted branch only
        ((), "reduce_sum", flops.Cost(31)),
    ]
    assert sum((cost for *_, cost in reports), flops.Cost()) == result.total


def test_on_cost_adds_up_to_the_total_of_a_model_gradient_with_transforms_dropped():
    model, x = MODELS["transformer_block"]
    fn, args = programs(model, x)["grad"]
    reports = []
    result = flops.count_jaxpr(
        jax.make_jaxpr(fn)(*args), on_cost=lambda *report: reports.append(report)
    )
    assert sum((cost for *_, cost in reports), flops.Cost()) == result.total
    scopes = {scope for scopes, *_ in reports for scope in scopes}
    assert {"Block", "MultiHeadDotProductAttention_0", "Dense_0"} <= scopes
    assert not any("jvp" in scope or "transpose" in scope for scope in scopes)


# -- errors --------------------------------------------------------------------------------------


def test_count_wants_a_callable():
    with pytest.raises(TypeError, match=r"count expects a callable .* got ArrayImpl\. Pass the"):
        flops.count(jnp.ones(3))


def test_count_jaxpr_wants_a_jaxpr():
    with pytest.raises(TypeError, match=r"count_jaxpr expects a ClosedJaxpr or Jaxpr, got str"):
        flops.count_jaxpr("{ lambda ; }")  # type: ignore[arg-type]


def test_rules_must_map_names_to_callables():
    with pytest.raises(TypeError, match=r"rules must be a mapping .* got list"):
        flops.count(jnp.sin, normal(3), rules=[flops.elementwise()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"these entries are not: 'sin': int, 3: function\."):
        flops.count(jnp.sin, normal(3), rules={"sin": 1, 3: flops.elementwise()})


def test_on_cost_must_be_callable():
    with pytest.raises(TypeError, match=r"on_cost must be callable .* got str"):
        flops.count_jaxpr(jax.make_jaxpr(jnp.sin)(normal(3)), on_cost="print")


def test_register_rule_wants_names_and_a_rule():
    with pytest.raises(TypeError, match=r"one or more primitive names as strings, got \(\)"):
        flops.register_rule()
    with pytest.raises(TypeError, match=r"register_rule\('x'\) decorates a rule .* got int"):
        flops.register_rule("x")(3)


def test_factories_want_non_negative_integers():
    with pytest.raises(ValueError, match=r"flops must be a non-negative integer, got -1"):
        flops.elementwise(flops=-1)
    with pytest.raises(ValueError, match=r"transcendentals must be a non-negative integer"):
        flops.reduction(transcendentals=0.5)  # type: ignore[arg-type]


def test_zero_cost_primitives_have_no_rules():
    assert not (flops.ZERO_COST & _rules._RULES.keys())
    assert {"reshape", "transpose", "broadcast_in_dim", "copy"} <= flops.ZERO_COST
    assert np.isin(["convert_element_type", "select_n", "gather"], list(flops.ZERO_COST)).sum() == 0
