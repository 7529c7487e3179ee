"""FLOP rules: one small function per primitive family, each matched to XLA's cost analysis.

A rule maps one jaxpr equation to a ``Cost``. The numbers are those of XLA's
``HloCostAnalysis`` on the HLO that JAX lowers the primitive to: an elementwise HLO op costs 1
FLOP per output element (or 1 transcendental for exp, log, tanh, ...), a dot or convolution 2
FLOPs per multiply-add. Where JAX lowers one primitive to several HLO ops (``logistic``,
``erf_inv``, ``select_n`` with an integer predicate, ...) the rule charges the whole expansion,
so that loop-free totals agree with ``jax.jit(f).lower(*args).cost_analysis()``.

Primitives that call other jaxprs (``jit``, ``scan``, ``cond``, ...) are not rules: the walker in
``_count.py`` recurses into them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import jax
import numpy as np
from jax import dtypes, lax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn

__all__ = ["ZERO_COST", "Cost", "FlopRule", "elementwise", "reduction", "register_rule"]


@dataclass(frozen=True, slots=True, repr=False)
class Cost:
    """FLOPs, transcendentals and random bits of some work, as exact Python integers.

    Costs add, and multiply by an integer (a loop's trip count). Random bit generation
    (``jax.random``'s bits and key derivation) costs no FLOPs: it is counted as the number
    of random bits produced, ``rng_bits``, which the repr shows only when there are any.

    Examples:
        >>> from wrapkit.flops import Cost
        >>> 3 * (Cost(flops=2) + Cost(transcendentals=1))
        Cost(flops=6, transcendentals=3)
        >>> Cost(flops=1) + Cost(rng_bits=4096)
        Cost(flops=1, transcendentals=0, rng_bits=4096)
    """

    flops: int = 0
    transcendentals: int = 0
    rng_bits: int = 0

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(
            self.flops + other.flops,
            self.transcendentals + other.transcendentals,
            self.rng_bits + other.rng_bits,
        )

    def __mul__(self, times: int) -> Cost:
        if not isinstance(times, int | np.integer) or isinstance(times, bool):
            return NotImplemented
        times = int(times)
        return Cost(self.flops * times, self.transcendentals * times, self.rng_bits * times)

    __rmul__ = __mul__

    def __bool__(self) -> bool:
        return bool(self.flops or self.transcendentals or self.rng_bits)

    def __repr__(self) -> str:
        bits = f", rng_bits={self.rng_bits}" if self.rng_bits else ""
        return f"Cost(flops={self.flops}, transcendentals={self.transcendentals}{bits})"


class FlopRule(Protocol):
    """The cost of one equation of a primitive: ``rule(eqn) -> Cost``.

    ``eqn.invars`` and ``eqn.outvars`` carry ``.aval.shape`` and ``.aval.dtype``; ``eqn.params``
    holds the primitive's parameters. The cost is for one execution of the equation; the walker
    multiplies by enclosing loop lengths.
    """

    def __call__(self, eqn: JaxprEqn, /) -> Cost: ...


_Rule = TypeVar("_Rule", bound=FlopRule)

# The global registry: primitive name -> rule. ``count(..., rules=...)`` merges over a copy.
_RULES: dict[str, FlopRule] = {}


def register_rule(*names: str) -> Callable[[_Rule], _Rule]:
    """Register a FLOP rule for one or more primitives, for every later count.

    A registered rule replaces any built-in rule of the same name. To count one call differently,
    pass ``rules={name: rule}`` to [`count`][wrapkit.flops.count] instead.

    Args:
        *names: primitive names, as in ``eqn.primitive.name`` (``"dot_general"``, ``"erf"``).

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        TypeError: if no name is given, a name is not a string, or the decorated object is not
            callable.

    Examples:
        >>> import jax
        >>> from wrapkit import flops
        >>> double = jax.extend.core.Primitive("double")
        >>> _ = double.def_abstract_eval(lambda x: x)
        >>> @flops.register_rule("double")
        ... def _(eqn):
        ...     return flops.Cost(flops=eqn.outvars[0].aval.size)
        >>> flops.count(double.bind, jax.ShapeDtypeStruct((3, 4), "float32")).flops
        12
    """
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError(
            f"register_rule expects one or more primitive names as strings, got {names!r}. "
            'Write @register_rule("my_primitive").'
        )

    def register(rule: _Rule) -> _Rule:
        if not callable(rule):
            raise TypeError(
                f"register_rule({', '.join(map(repr, names))}) decorates a rule "
                f"`rule(eqn) -> Cost`, got {type(rule).__name__}."
            )
        for name in names:
            _RULES[name] = rule
        return rule

    return register


# Primitives that do no arithmetic: data movement, layout, metadata and host effects. XLA's
# HloCostAnalysis gives their HLO (reshape, broadcast, transpose, slice, pad, iota, copy, ...) 0
# FLOPs too. Convert, select, compare and bitcast-convert are NOT here: XLA counts 1 FLOP per
# element for each; nor is gather, whose fill-or-drop mode lowers to masking. Truly zero FLOPs.
ZERO_COST: frozenset[str] = frozenset(
    {
        # layout and data movement
        "reshape",
        "broadcast_in_dim",
        "transpose",
        "squeeze",
        "rev",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "concatenate",
        "pad",
        "split",
        "stack",
        "unstack",
        "tile",
        "iota",
        "copy",
        # identities that exist for autodiff, naming, sharding or ordering
        "stop_gradient",
        "name",
        "optimization_barrier",
        "sharding_constraint",
        "layout_constraint",
        "with_memory_space_constraint",
        "reshard",
        "mesh_cast",
        "device_put",
        "pvary",
        "dce_sink",
        "create_token",
        "after_all",
        "platform_index",
        # PRNG key boxing: views of the key data
        "random_wrap",
        "random_unwrap",
        "random_clone",
        # communication moves data but adds nothing
        "all_gather",
        "all_to_all",
        "ppermute",
        # host side effects
        "debug_callback",
        "debug_print",
    }
)
"""Primitives that do no arithmetic (reshape, transpose, slice, copy, ...); never unsupported."""


def _aval(var: Any) -> Any:
    """A variable's abstract value: a ShapedArray for every primitive costed here."""
    return var.aval


def _size(aval: Any) -> int:
    return math.prod(aval.shape)


def _elements(var: Any) -> int:
    return math.prod(var.aval.shape)


def _check_count(name: str, value: object) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def elementwise(flops: int = 1, transcendentals: int = 0) -> FlopRule:
    """A rule charging a fixed cost per element of the equation's first output.

    Args:
        flops: FLOPs per output element.
        transcendentals: transcendental operations per output element.

    Returns:
        The rule.

    Raises:
        ValueError: if a count is negative or not an integer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from wrapkit import flops
        >>> eqn = jax.make_jaxpr(jnp.sin)(jnp.ones((2, 5))).eqns[0]
        >>> flops.elementwise(flops=3)(eqn)  # 3 per element of the (2, 5) output
        Cost(flops=30, transcendentals=0)
    """
    per_element = Cost(
        _check_count("flops", flops), _check_count("transcendentals", transcendentals)
    )

    def rule(eqn: JaxprEqn) -> Cost:
        return per_element * _elements(eqn.outvars[0])

    return rule


def reduction(flops: int = 1, transcendentals: int = 0) -> FlopRule:
    """A rule for reducing an array: a fixed cost per combining step.

    Reducing ``n`` input elements to ``m`` outputs takes ``n - m`` combining steps, which is how
    XLA counts a reduce.

    Args:
        flops: FLOPs per combining step.
        transcendentals: transcendental operations per combining step.

    Returns:
        The rule.

    Raises:
        ValueError: if a count is negative or not an integer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from wrapkit import flops
        >>> eqn = jax.make_jaxpr(lambda x: x.sum(axis=1))(jnp.ones((4, 10))).eqns[0]
        >>> flops.reduction()(eqn)  # 40 elements to 4 sums: 36 additions
        Cost(flops=36, transcendentals=0)
    """
    per_step = Cost(_check_count("flops", flops), _check_count("transcendentals", transcendentals))

    def rule(eqn: JaxprEqn) -> Cost:
        return per_step * (_elements(eqn.invars[0]) - _elements(eqn.outvars[0]))

    return rule


def _register(rule: FlopRule, *names: str) -> None:
    register_rule(*names)(rule)


# Primitives that compute each output element from the same element of their operands. XLA
# folds them when all operands are compile-time constants.
_ELEMENTWISE: set[str] = set()


def _register_elementwise(rule: FlopRule, *names: str) -> None:
    _register(rule, *names)
    _ELEMENTWISE.update(names)


def _body_cost(jaxpr: Jaxpr | ClosedJaxpr | None) -> Cost:
    """Cost of one application of a scalar computation (a reducer, a scatter combiner).

    These computations come from ``lax`` and hold only primitives with built-in rules.
    """
    if jaxpr is None:
        return Cost()
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = Cost()
    for eqn in jaxpr.eqns:
        rule = _RULES.get(eqn.primitive.name)
        if rule is not None:
            total += rule(eqn)
    return total


# -- elementwise ---------------------------------------------------------------------------------

# One HLO op per element: add, compare, select with a boolean predicate, convert, ...
_register_elementwise(
    elementwise(),
    *("add", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign"),
    *("floor", "ceil", "round", "is_finite", "clamp", "reduce_precision", "add_any"),
    *("eq", "ne", "lt", "le", "gt", "ge", "eq_to", "le_to", "lt_to"),
    *("and", "or", "not", "xor", "population_count", "clz"),
    *("shift_left", "shift_right_arithmetic", "shift_right_logical"),
    *("real", "imag", "complex", "bitcast_convert_type"),
)
# One transcendental HLO op per element (XLA's list: exp, log, tanh, sqrt, ...); atan lowers to
# atan2(x, 1).
_register_elementwise(
    elementwise(flops=0, transcendentals=1),
    *("expm1", "tanh", "tan", "atan", "atan2", "rsqrt", "cbrt", "pow", "erf"),
)
_register_elementwise(elementwise(flops=1, transcendentals=1), "exp2")  # exp(x * ln 2)
_register_elementwise(elementwise(flops=4), "conj")  # complex(real(x), -imag(x))
_register_elementwise(elementwise(flops=24), "nextafter")  # integer bit manipulation, 24 HLO ops


def _expansion(
    f32: tuple[int, int],
    *,
    f64: tuple[int, int] | None = None,
    upcast: int = 0,
    complex64: tuple[int, int] | None = None,
) -> FlopRule:
    """A primitive XLA expands into several ops for some dtypes, costed per output element.

    ``f32`` is the (flops, transcendentals) per element for float32 (and any dtype not named);
    ``f64`` for float64 where XLA's polynomial is longer; ``complex64`` for complex inputs.
    ``upcast`` is the number of operands plus the result when 16-bit floats are computed in
    float32: one convert each.
    """
    per32, per64 = Cost(*f32), Cost(*(f64 or f32))
    per16 = per32 + Cost(upcast)
    per_complex = Cost(*(complex64 or f32))

    def rule(eqn: JaxprEqn) -> Cost:
        aval = _aval(eqn.invars[0])
        dtype = np.dtype(aval.dtype)
        if dtype.kind == "c":
            per = per_complex
        else:
            per = per16 if dtype.itemsize == 2 else per64 if dtype.itemsize == 8 else per32
        return per * _elements(eqn.outvars[0])

    return rule


# Transcendental HLO ops, which XLA expands for complex numbers.
_register_elementwise(_expansion((0, 1), complex64=(15, 4)), "exp")
_register_elementwise(_expansion((0, 1), complex64=(62, 4)), "log")
_register_elementwise(_expansion((0, 1), complex64=(79, 5)), "log1p")
_register_elementwise(_expansion((0, 1), complex64=(86, 7)), "sqrt")
_register_elementwise(_expansion((0, 1), complex64=(14, 4)), "sin")
_register_elementwise(_expansion((0, 1), complex64=(15, 4)), "cos")
_register_elementwise(_expansion((1, 0), complex64=(14, 0)), "square")
_register_elementwise(_expansion((3, 1), complex64=(18, 4)), "logistic")  # 1 / (1 + exp(-x))
# Measured on XLA's expansions (CHLO decompositions) of each op.
_register_elementwise(_expansion((5, 2)), "asin")
_register_elementwise(_expansion((3, 2)), "acos")
_register_elementwise(_expansion((11, 3)), "asinh")
_register_elementwise(_expansion((7, 4)), "acosh")
_register_elementwise(_expansion((6, 2)), "atanh")
_register_elementwise(_expansion((10, 3), upcast=2), "sinh")
_register_elementwise(_expansion((3, 2), upcast=2), "cosh")
_register_elementwise(_expansion((62, 1), f64=(90, 1), upcast=2), "erfc")
_register_elementwise(_expansion((37, 2), f64=(100, 2), upcast=2), "erf_inv")
_register_elementwise(_expansion((53, 4), upcast=2), "lgamma")
_register_elementwise(_expansion((73, 3), upcast=2), "digamma")
_register_elementwise(_expansion((83, 1), f64=(173, 1), upcast=2), "bessel_i0e", "bessel_i1e")
_register_elementwise(_expansion((260, 19), upcast=3), "polygamma")
_register_elementwise(_expansion((121, 11), upcast=3), "zeta")
# These expansions contain series loops that XLA counts once, as it counts any while loop.
_register_elementwise(_expansion((183, 6), upcast=3), "igamma", "igammac")
_register_elementwise(_expansion((335, 14), upcast=3), "igamma_grad_a")
_register_elementwise(_expansion((293, 17), upcast=4), "regularized_incomplete_beta")


def _integer_pow(eqn: JaxprEqn) -> Cost:
    # JAX lowers x**y to square-and-multiply: bit_length - 1 squarings, popcount - 1 products,
    # and a division for a negative exponent.
    y = eqn.params["y"]
    if y == 0:
        return Cost()
    bits = abs(y)
    multiplies = bits.bit_length() + bits.bit_count() - 2 + (y < 0)
    return Cost(multiplies * _elements(eqn.outvars[0]))


_register_elementwise(_integer_pow, "integer_pow")


def _convert_element_type(eqn: JaxprEqn) -> Cost:
    # complex -> real takes the real part first; -> bool compares with zero; a convert to the
    # same type (a weak-type change) lowers to nothing.
    source = np.dtype(_aval(eqn.invars[0]).dtype)
    target = np.dtype(eqn.params["new_dtype"])
    ops = 0
    if source.kind == "c" and target.kind != "c":
        ops, source = 1, np.dtype(source.char.lower())  # F -> f, D -> d
    if target == np.bool_ and source != np.bool_:
        ops, source = ops + 1, np.dtype(np.bool_)
    ops += source != target
    return Cost(ops * _elements(eqn.outvars[0]))


_register_elementwise(_convert_element_type, "convert_element_type")


def _select_n(eqn: JaxprEqn) -> Cost:
    # A boolean predicate is one select. An integer predicate over n cases lowers to a binary
    # tree of n - 1 compares (on the predicate) and n - 1 selects (on the output).
    which, *cases = eqn.invars
    out = _elements(eqn.outvars[0])
    if np.dtype(_aval(which).dtype) == np.bool_:
        return Cost(out if len(cases) == 2 else 0)
    return Cost((len(cases) - 1) * (out + _elements(which)))


_register_elementwise(_select_n, "select_n")

# -- contractions --------------------------------------------------------------------------------


def _dot_general(eqn: JaxprEqn) -> Cost:
    # 2 FLOPs per multiply-add: each output element sums over the contracting dimensions.
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = _aval(eqn.invars[0]).shape
    depth = math.prod(lhs_shape[d] for d in lhs_contracting)
    return Cost(2 * _elements(eqn.outvars[0]) * depth)


_register(_dot_general, "dot_general")


def _valid_taps(
    in_size: int,
    out_size: int,
    kernel: int,
    stride: int,
    pad_low: int,
    base_dilation: int,
    window_dilation: int,
) -> int:
    """(output, kernel tap) pairs of one spatial dimension that land on a real input element.

    A tap lands on padding or on a hole of the base (lhs) dilation for no work, so XLA does not
    count it. Output ``o`` and tap ``k`` read dilated position ``u = o*stride - pad_low +
    k*window_dilation``, real when ``0 <= u <= (in_size-1)*base_dilation`` and ``u`` is a
    multiple of ``base_dilation``. For each tap the valid ``o`` are an arithmetic progression.
    """
    if in_size <= 0 or out_size <= 0:
        return 0
    last = (in_size - 1) * base_dilation
    total = 0
    for k in range(kernel):
        offset = k * window_dilation - pad_low  # u = o*stride + offset
        lo = max(0, -((offset) // stride))  # ceil(-offset / stride)
        hi = min(out_size - 1, (last - offset) // stride)
        if lo > hi:
            continue
        if base_dilation == 1:
            total += hi - lo + 1
            continue
        # o*stride == -offset (mod base_dilation)
        g = math.gcd(stride, base_dilation)
        if offset % g:
            continue
        period = base_dilation // g
        first = (-offset // g) * pow(stride // g, -1, period) % period if period > 1 else 0
        total += (hi - first) // period - (lo - 1 - first) // period
    return total


def _conv_general_dilated(eqn: JaxprEqn) -> Cost:
    """XLA's convolution count: multiply-adds over the kernel taps that read real input."""
    params = eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    lhs_shape = _aval(eqn.invars[0]).shape
    rhs_shape = _aval(eqn.invars[1]).shape
    out_shape = _aval(eqn.outvars[0]).shape
    ndim = len(lhs_spec) - 2
    lhs_dilation = params["lhs_dilation"] or (1,) * ndim
    rhs_dilation = params["rhs_dilation"] or (1,) * ndim
    taps = 1
    for i in range(ndim):
        taps *= _valid_taps(
            lhs_shape[lhs_spec[2 + i]],
            out_shape[out_spec[2 + i]],
            rhs_shape[rhs_spec[2 + i]],
            params["window_strides"][i],
            params["padding"][i][0],
            lhs_dilation[i],
            rhs_dilation[i],
        )
    in_features = lhs_shape[lhs_spec[1]] // params["feature_group_count"]
    batch = lhs_shape[lhs_spec[0]] // params["batch_group_count"]
    out_features = out_shape[out_spec[1]]
    return Cost(2 * batch * in_features * out_features * taps)


_register(_conv_general_dilated, "conv_general_dilated")

# -- reductions ----------------------------------------------------------------------------------

_register(
    reduction(),
    *("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"),
    *("reduce_and", "reduce_or", "reduce_xor"),
)


def _argminmax(eqn: JaxprEqn) -> Cost:
    # The comparator of the variadic reduce: compare, equal, index compare, and, or, 2 selects;
    # floats add a NaN test (ne) and an or.
    per_step = 9 if np.issubdtype(_aval(eqn.invars[0]).dtype, np.inexact) else 7
    return Cost(per_step * (_elements(eqn.invars[0]) - _elements(eqn.outvars[0])))


_register(_argminmax, "argmax", "argmin")


def _reduce(eqn: JaxprEqn) -> Cost:
    # A reduce with a user computation: its cost per combining step.
    steps = _elements(eqn.invars[0]) - _elements(eqn.outvars[0])
    return _body_cost(eqn.params["jaxpr"]) * steps


_register(_reduce, "reduce")


def _window_steps(eqn: JaxprEqn, window: tuple[int, ...], padding: Any) -> int:
    """Combining steps of a reduce-window: (window size - 1) per output, as XLA counts.

    XLA special-cases a window that spans one whole padded dimension (a reduce followed by a
    broadcast): it counts that as one reduce of the dimension plus one step per output row.
    """
    out_shape = _aval(eqn.outvars[0]).shape
    out = math.prod(out_shape)
    steps = (math.prod(window) - 1) * out
    reduced = [d for d, size in enumerate(window) if size != 1]
    padded = [d for d, (lo, hi) in enumerate(padding) if lo or hi]
    if len(eqn.outvars) == 1 and len(reduced) == 1 and len(padded) == 1:
        for d, size in enumerate(window):
            lo, hi = padding[d]
            if size != 1 and lo != 0 and hi != 0 and lo == hi and size == 2 * lo + 1:
                if lo == out_shape[d] - 1:
                    steps = out // out_shape[d] + out_shape[d] - 1
                break
    return steps


def _window_reduction(per_step: Cost) -> FlopRule:
    def rule(eqn: JaxprEqn) -> Cost:
        params = eqn.params
        return per_step * _window_steps(eqn, params["window_dimensions"], params["padding"])

    return rule


_register(_window_reduction(Cost(1)), "reduce_window_sum", "reduce_window_max", "reduce_window_min")


def _reduce_window(eqn: JaxprEqn) -> Cost:
    params = eqn.params
    steps = _window_steps(eqn, params["window_dimensions"], params["padding"])
    return _body_cost(params["jaxpr"]) * steps


_register(_reduce_window, "reduce_window")


def _cumulative(per_step: Cost) -> FlopRule:
    # JAX lowers cumsum & co. to a reduce-window whose window spans the whole axis, padded by
    # n - 1 on one side: XLA counts n - 1 steps per output element.
    def rule(eqn: JaxprEqn) -> Cost:
        aval = _aval(eqn.outvars[0])
        return per_step * ((aval.shape[eqn.params["axis"]] - 1) * _size(aval))

    return rule


_register(_cumulative(Cost(1)), "cumsum", "cumprod", "cummax", "cummin")
# logaddexp: max, sub, abs, neg, exp, log1p, add, and a NaN select.
_register(_cumulative(Cost(8, 2)), "cumlogsumexp")


def _select_and_scatter_add(eqn: JaxprEqn) -> Cost:
    # Per source element: window - 1 selecting compares and 1 scattering add.
    source = _elements(eqn.invars[0])
    return Cost(source * math.prod(eqn.params["window_dimensions"]))


_register(_select_and_scatter_add, "select_and_scatter_add")


def _select_and_scatter(eqn: JaxprEqn) -> Cost:
    params = eqn.params
    source = _elements(eqn.invars[1])
    selects = source * (math.prod(params["window_dimensions"]) - 1)
    return (
        _body_cost(params["select_jaxpr"]) * selects + _body_cost(params["scatter_jaxpr"]) * source
    )


_register(_select_and_scatter, "select_and_scatter")


def _select_and_gather_add(eqn: JaxprEqn) -> Cost:
    # A variadic reduce-window whose combiner is a compare and two selects.
    params = eqn.params
    return Cost(3) * _window_steps(eqn, params["window_dimensions"], params["padding"])


_register(_select_and_gather_add, "select_and_gather_add")


def _sort(eqn: JaxprEqn) -> Cost:
    # XLA assumes a comparison sort: n * ceil(log2 n) over all n elements of the first operand.
    n = _elements(eqn.invars[0])
    return Cost(n * (n - 1).bit_length()) if n > 1 else Cost()


_register(_sort, "sort", "approx_top_k")  # approx_top_k lowers to a sort off TPU


def _xla_counts_nothing(eqn: JaxprEqn) -> Cost:
    return Cost()


# Not truly zero FLOPs, but XLA's HloCostAnalysis has no cost for TopK (a TODO in XLA) or for
# reduce-scatter; matching it keeps loop-free totals equal to XLA's.
_register(_xla_counts_nothing, "top_k", "reduce_scatter")


def _gather(eqn: JaxprEqn) -> Cost:
    # XLA's gather moves data only, but JAX lowers the fill-or-drop mode (jnp.take's and
    # flax Embed's default) as an in-bounds gather plus a mask: indices converted to the
    # canonical int64, compared with 0 and the upper bound (ge, le, and), reduced over the index
    # vector, and a select of the output against the fill value.
    if eqn.params["mode"] != lax.GatherScatterMode.FILL_OR_DROP:
        return Cost()
    indices = _aval(eqn.invars[1])
    n = _size(indices)
    index_dtype = dtypes.canonicalize_dtype(np.int64)
    convert = n if np.dtype(indices.dtype) != index_dtype else 0
    vector = indices.shape[-1] if indices.shape else 1
    mask = 3 * n + (n - n // vector if vector else 0)
    return Cost(convert + mask + _elements(eqn.outvars[0]))


_register(_gather, "gather")


def _scatter(eqn: JaxprEqn) -> Cost:
    # The combiner runs once per update element; a plain scatter's combiner returns the update.
    return _body_cost(eqn.params["update_jaxpr"]) * _elements(eqn.invars[2])


_register(
    _scatter, "scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min", "scatter-max"
)


def _all_reduce(eqn: JaxprEqn) -> Cost:
    # XLA assumes two replicas: one add per output element.
    return Cost(sum(_elements(v) for v in eqn.outvars))


_register(_all_reduce, "psum", "psum_invariant", "pmax", "pmin")

# -- linear algebra and FFT ----------------------------------------------------------------------


def _fft(eqn: JaxprEqn) -> Cost:
    # XLA: 4 complex multiply-adds per element per butterfly stage, floor(log2 n) stages per axis.
    stages = math.prod(max(n.bit_length() - 1, 0) for n in eqn.params["fft_lengths"])
    return Cost(2 * 4 * stages * _elements(eqn.invars[0]))


_register(_fft, "fft")


def _cholesky(eqn: JaxprEqn) -> Cost:
    # XLA's estimate for its Cholesky op, n^3 / 3 per matrix. (CPU and GPU lower to a LAPACK
    # or cuSOLVER call, which XLA reports as unknown.)
    aval = _aval(eqn.invars[0])
    return Cost(aval.shape[-1] * _size(aval) // 3)


_register(_cholesky, "cholesky")


def _triangular_solve(eqn: JaxprEqn) -> Cost:
    # XLA's estimate for its TriangularSolve op: one multiply-add per element of b per row of a.
    a, b = eqn.invars
    return Cost(2 * _aval(a).shape[-1] * _elements(b))


_register(_triangular_solve, "triangular_solve")

# -- random numbers ------------------------------------------------------------------------------
# FLOPs mean what papers mean: generating random bits is not floating-point work, so these
# rules cost it as the number of random bits produced (``rng_bits``) and no FLOPs, whatever
# the key implementation (threefry's hash, RBG's generator). Turning bits into numbers
# (``jax.random.uniform``'s shift, or, bitcast, ...) is arithmetic, and counted as FLOPs.


def _bits(aval: Any) -> int:
    """Bits held by an abstract array; a PRNG key counts the bits of its key data."""
    if dtypes.issubdtype(aval.dtype, dtypes.prng_key):
        return _size(aval) * _key_data_bits(aval.dtype)
    return _size(aval) * np.dtype(aval.dtype).itemsize * 8


@functools.cache
def _key_data_bits(dtype: Any) -> int:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return math.prod(data.shape) * np.dtype(data.dtype).itemsize * 8


def _random_output(eqn: JaxprEqn) -> Cost:
    # random_bits, random_split, random_fold_in: every output bit is a random bit (a split
    # or fold_in makes new keys by hashing).
    return Cost(rng_bits=sum(_bits(_aval(var)) for var in eqn.outvars))


_register(_random_output, "random_bits", "random_split", "random_fold_in")
_register(_xla_counts_nothing, "random_seed")  # lays the seed out as key data: no random bits


def _rng_bit_generator(eqn: JaxprEqn) -> Cost:
    # The generated array; the new generator state (outvars[0]) is bookkeeping.
    return Cost(rng_bits=_bits(_aval(eqn.outvars[1])))


_register(_rng_bit_generator, "rng_bit_generator")
_register(_random_output, "rng_uniform", "threefry2x32")


def _iota_2x32_shape(eqn: JaxprEqn) -> Cost:
    # A 64-bit iota over the shape: the per-dimension iotas times their strides (the last
    # stride is 1, a multiply XLA drops), summed, then a shift and two converts to the (hi, lo)
    # 32-bit halves.
    aval = _aval(eqn.outvars[0])
    return Cost((2 * len(aval.shape) + 1) * _size(aval))


_register(_iota_2x32_shape, "iota_2x32_shape")
