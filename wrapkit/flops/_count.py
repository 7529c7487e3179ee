"""The jaxpr walker: leaf equations go to rules, calls and loops are recursed into."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

# jax lowers a jit only after dropping dead code, so XLA never sees (or costs) it. The DCE pass
# is public only through jax.interpreters.
from jax.interpreters import partial_eval as pe

from .._name_stack import scopes as _scopes
from .._warnings import warn
from ._rules import _ELEMENTWISE, _RULES, ZERO_COST, Cost, FlopRule

__all__ = ["FlopCount", "UnsupportedPrimitiveWarning", "count", "count_jaxpr"]

# on_cost(scopes, primitive, cost), called once per costed leaf equation.
OnCost = Callable[[tuple[str, ...], str, Cost], object]


class UnsupportedPrimitiveWarning(UserWarning):
    """A counted program holds primitives that have no FLOP rule; they count as nothing."""


@dataclass(frozen=True)
class FlopCount:
    """The FLOPs of a program, with what they are made of and how exact they are.

    Attributes:
        flops: floating-point (and integer) operations; one multiply-add is 2.
        transcendentals: exp, log, tanh, sqrt, ... counted apart from ``flops``, as XLA does.
        by_primitive: ``Cost`` per primitive name, loop lengths included; read-only.
        unsupported: sorted names of primitives with no rule. They are left out of the totals.
        lower_bound: a ``while`` loop was counted once; the true cost may be any multiple.
        branches: how many ``cond``/``switch`` equations were counted by their most expensive
            branch (one per equation visited: a cond in a scan body counts once, whatever the
            scan's length).
        rng_bits: random bits generated (``jax.random``'s bits and key derivation), which
            cost no FLOPs.
    """

    flops: int
    transcendentals: int
    by_primitive: Mapping[str, Cost] = field(default_factory=lambda: MappingProxyType({}))
    unsupported: tuple[str, ...] = ()
    lower_bound: bool = False
    branches: int = 0
    rng_bits: int = 0

    @property
    def total(self) -> Cost:
        """``Cost(flops, transcendentals, rng_bits)``."""
        return Cost(self.flops, self.transcendentals, self.rng_bits)

    @property
    def exact(self) -> bool:
        """Whether the count is exact: no unsupported primitive, no while loop, no branch."""
        return not (self.unsupported or self.lower_bound or self.branches)

    def __str__(self) -> str:
        notes = []
        if self.lower_bound:
            notes.append("lower bound: a while loop counted once")
        if self.branches:
            notes.append(f"{self.branches} cond(s) counted by their most expensive branch")
        if self.unsupported:
            notes.append(f"unsupported, counted as 0: {', '.join(self.unsupported)}")
        text = f"{self.flops:,} FLOPs, {self.transcendentals:,} transcendentals"
        if self.rng_bits:
            text += f", {self.rng_bits:,} random bits"
        return text + "".join(f"\n  ({note})" for note in notes)


class _Tally:
    """A mutable running count; merged into its parent, then frozen into a FlopCount."""

    __slots__ = (
        "flops",
        "transcendentals",
        "by_primitive",
        "unsupported",
        "lower_bound",
        "branches",
        "rng_bits",
    )

    def __init__(self) -> None:
        self.flops = 0
        self.transcendentals = 0
        self.by_primitive: dict[str, Cost] = {}
        self.unsupported: set[str] = set()
        self.lower_bound = False
        self.branches = 0
        self.rng_bits = 0

    def add(self, primitive: str, cost: Cost) -> None:
        self.flops += cost.flops
        self.transcendentals += cost.transcendentals
        self.rng_bits += cost.rng_bits
        previous = self.by_primitive.get(primitive)
        self.by_primitive[primitive] = cost if previous is None else previous + cost

    def merge(self, other: _Tally, times: int) -> None:
        """Add ``times`` runs of what ``other`` counted; its flags and branches once."""
        for primitive, cost in other.by_primitive.items():
            self.add(primitive, cost * times)
        self.unsupported |= other.unsupported
        self.lower_bound |= other.lower_bound
        self.branches += other.branches

    def freeze(self) -> FlopCount:
        return FlopCount(
            flops=self.flops,
            transcendentals=self.transcendentals,
            by_primitive=MappingProxyType(dict(sorted(self.by_primitive.items()))),
            unsupported=tuple(sorted(self.unsupported)),
            lower_bound=self.lower_bound,
            branches=self.branches,
            rng_bits=self.rng_bits,
        )


def _open(jaxpr: Jaxpr | ClosedJaxpr) -> Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


# Call-like primitives: the parameter holding the jaxpr that runs once per call.
_CALLS: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_jvp_call_jaxpr": "fun_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "custom_vmap_call": "call",
    "composite": "jaxpr",
}

# XLA folds elementwise work on compile-time constants (literals, closed-over arrays and what is
# computed from them alone) and drops the identities x * 1, x + 0, x - 0 and select(p, x, x)
# before it costs the program. Constants pass through these data-movement primitives.
_CONSTANT_SHAPING = frozenset(
    {"broadcast_in_dim", "reshape", "squeeze", "transpose", "slice", "concatenate", "pad", "rev"}
)
_FOLDABLE = frozenset(_ELEMENTWISE) | _CONSTANT_SHAPING
# Primitives that keep a constant 0 or 1 a 0 or 1.
_KEEPS_VALUE = frozenset({"broadcast_in_dim", "reshape", "squeeze", "convert_element_type"})
_VARIABLE = object()


def _literal_value(value: Any) -> int | None:
    """0 or 1 for a scalar literal equal to it, else None (a constant of no interest)."""
    if np.ndim(value) == 0:
        if value == 0:
            return 0
        if value == 1:
            return 1
    return None


def _folded(eqn: JaxprEqn, name: str, constants: dict[Any, int | None]) -> bool:
    """Whether XLA folds ``eqn`` away; records the constants it makes."""
    values: list[Any] = []
    for var in eqn.invars:
        if type(var) is Literal:
            values.append(_literal_value(var.val))
        else:
            values.append(constants.get(var, _VARIABLE))
    if _VARIABLE not in values:
        value = values[0] if name in _KEEPS_VALUE else None
        for out in eqn.outvars:
            constants[out] = value
        return True
    if name == "mul":
        return 1 in values
    if name in ("add", "add_any"):
        return 0 in values
    if name == "sub":
        return values[1] == 0
    if name == "select_n":
        cases = eqn.invars[1:]
        return all(case is cases[0] for case in cases[1:])
    return False


def _dce(jaxpr: Jaxpr) -> Jaxpr:
    return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


_Inputs = tuple[Any, ...] | None
"""Per input of a jaxpr: a known constant (0, 1 or None) or _VARIABLE; None if all variable."""


class _Walker:
    """Counts jaxprs with one set of rules; caches per-jaxpr tallies by identity."""

    def __init__(self, rules: Mapping[str, FlopRule], on_cost: OnCost | None) -> None:
        self.rules = rules
        self.on_cost = on_cost
        # (id(jaxpr), inputs) -> (jaxpr, tally); the jaxpr is held so that its id stays unique.
        self.tallies: dict[tuple[int, _Inputs], tuple[Jaxpr, _Tally]] = {}

    def tally(self, jaxpr: Jaxpr, inputs: _Inputs = None) -> _Tally:
        """The cost of one run of ``jaxpr``, without reporting to ``on_cost``."""
        key = (id(jaxpr), inputs)
        hit = self.tallies.get(key)
        if hit is not None:
            return hit[1]
        tally = _Tally()
        self.walk(jaxpr, tally, 1, None, inputs)
        self.tallies[key] = (jaxpr, tally)
        return tally

    def walk(
        self,
        jaxpr: Jaxpr,
        tally: _Tally,
        times: int,
        prefix: tuple[str, ...] | None,
        inputs: _Inputs = None,
    ) -> None:
        """Add ``times`` runs of ``jaxpr`` to ``tally``; report leaves if ``prefix`` is given."""
        rules, on_cost = self.rules, self.on_cost
        constants: dict[Any, int | None] = dict.fromkeys(jaxpr.constvars)
        if inputs is not None and len(inputs) == len(jaxpr.invars):
            constants.update(
                (var, value)
                for var, value in zip(jaxpr.invars, inputs, strict=True)
                if value is not _VARIABLE
            )
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in _FOLDABLE and _folded(eqn, name, constants):
                continue
            rule = rules.get(name)
            if rule is not None:
                cost = rule(eqn)
                if cost:
                    if times != 1:
                        cost = cost * times
                    tally.add(name, cost)
                    if prefix is not None and on_cost is not None:
                        on_cost(prefix + _scopes(eqn), name, cost)
            elif name not in ZERO_COST:
                self.structured(eqn, name, tally, times, prefix, constants)

    def call(
        self,
        eqn: JaxprEqn,
        jaxpr: Jaxpr,
        tally: _Tally,
        times: int,
        prefix: tuple[str, ...] | None,
        inputs: _Inputs = None,
    ) -> None:
        if prefix is None:
            tally.merge(self.tally(jaxpr, inputs), times)
        else:
            self.walk(jaxpr, tally, times, prefix + _scopes(eqn), inputs)

    def structured(
        self,
        eqn: JaxprEqn,
        name: str,
        tally: _Tally,
        times: int,
        prefix: tuple[str, ...] | None,
        constants: dict[Any, int | None],
    ) -> None:
        params = eqn.params
        if name in _CALLS:
            # JAX lowers these calls inline, so constant arguments fold inside them too; a jit
            # becomes an HLO call, whose arguments XLA does not look into.
            inline = name not in ("jit", "pjit") or params.get("inline", False)
            inputs = _constant_inputs(eqn, constants) if inline else None
            self.call(eqn, _open(params[_CALLS[name]]), tally, times, prefix, inputs)
        elif name == "scan":
            self.call(eqn, _open(params["jaxpr"]), tally, times * params["length"], prefix)
        elif name == "while":
            tally.lower_bound = True
            self.call(eqn, _open(params["cond_jaxpr"]), tally, times, prefix)
            self.call(eqn, _open(params["body_jaxpr"]), tally, times, prefix)
        elif name == "cond":
            branches = [_open(branch) for branch in params["branches"]]
            costs = [self.tally(branch) for branch in branches]
            chosen = max(
                range(len(branches)),
                key=lambda i: (costs[i].flops, costs[i].transcendentals, costs[i].rng_bits),
            )
            for other in costs:  # a rule missing in any branch makes the choice uncertain
                tally.unsupported |= other.unsupported
            tally.branches += len(branches) > 1
            self.call(eqn, branches[chosen], tally, times, prefix)
        elif name == "shard_map":
            # The body runs on every shard of the axes it makes manual.
            mesh_shape = params["mesh"].shape
            shards = math.prod(mesh_shape[axis] for axis in params["newly_manual_axes"])
            self.call(eqn, _open(params["jaxpr"]), tally, times * shards, prefix)
        elif name == "custom_linear_solve":
            self.call(eqn, _open(params["jaxprs"].solve), tally, times, prefix)
        else:
            tally.unsupported.add(name)


def _constant_inputs(eqn: JaxprEqn, constants: dict[Any, int | None]) -> _Inputs:
    inputs = tuple(
        _literal_value(var.val) if type(var) is Literal else constants.get(var, _VARIABLE)
        for var in eqn.invars
    )
    return None if all(value is _VARIABLE for value in inputs) else inputs


def _check_rules(rules: object) -> dict[str, FlopRule]:
    if rules is None:
        return dict(_RULES)
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"rules must be a mapping from primitive name to rule, got {type(rules).__name__}. "
            'Pass rules={"my_primitive": wrapkit.flops.elementwise(flops=1)}.'
        )
    problems = [
        f"{name!r}: {type(rule).__name__}"
        for name, rule in rules.items()
        if not isinstance(name, str) or not callable(rule)
    ]
    if problems:
        raise TypeError(
            "rules maps primitive names (str) to rules `rule(eqn) -> Cost`; these entries are "
            f"not: {', '.join(problems)}."
        )
    return {**_RULES, **rules}


def count_jaxpr(
    jaxpr: ClosedJaxpr | Jaxpr,
    *,
    rules: Mapping[str, FlopRule] | None = None,
    on_cost: Callable[[tuple[str, ...], str, Cost], object] | None = None,
) -> FlopCount:
    """Count the FLOPs of a jaxpr.

    Like XLA, the count leaves out dead equations (JAX drops them before lowering) and
    elementwise work on compile-time constants (XLA folds it). Calls (``jit``, ``custom_jvp``,
    ``custom_vjp``, ``checkpoint``) are counted once per call; a ``scan`` body ``length``
    times; a ``while`` loop once (``lower_bound``); a ``cond`` by its most expensive branch
    (``branches``).

    Args:
        jaxpr: the program, e.g. from ``jax.make_jaxpr(f)(*args)``.
        rules: rules by primitive name that take precedence over the registered ones, for this
            call only.
        on_cost: called as ``on_cost(scopes, primitive, cost)`` once for every leaf equation
            with a non-zero cost; equations that do no arithmetic, are folded away or have no
            rule are not reported, nor are the call, loop and branch equations themselves.
            ``cost`` already includes the lengths of the enclosing scans. ``scopes`` is the
            equation's full name stack, outermost first: the ``jax.named_scope`` (and flax
            module) names on every enclosing call, loop or branch equation, then the
            equation's own, with transforms (``jvp``, ``transpose``, ...) dropped. Of a
            ``cond``, only the counted branch is reported. The reported costs add up to the
            returned totals exactly.

    Returns:
        The count. If it lists ``unsupported`` primitives, one warning was issued.

    Raises:
        TypeError: if ``jaxpr`` is not a jaxpr, ``rules`` not a mapping of names to callables,
            or ``on_cost`` not callable.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from wrapkit import flops
        >>> def mlp(x, w1, w2):
        ...     with jax.named_scope("hidden"):
        ...         h = jnp.tanh(x @ w1)
        ...     return h @ w2
        >>> args = (jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((32, 4)))
        >>> seen = []
        >>> result = flops.count_jaxpr(
        ...     jax.make_jaxpr(mlp)(*args), on_cost=lambda *report: seen.append(report)
        ... )
        >>> result.flops, result.transcendentals  # 2 x 8 x 16 x 32 + 2 x 8 x 32 x 4
        (10240, 256)
        >>> for report in seen:
        ...     print(*report)
        ('hidden',) dot_general Cost(flops=8192, transcendentals=0)
        ('hidden',) tanh Cost(flops=0, transcendentals=256)
        () dot_general Cost(flops=2048, transcendentals=0)
    """
    if not isinstance(jaxpr, ClosedJaxpr | Jaxpr):
        raise TypeError(
            f"count_jaxpr expects a ClosedJaxpr or Jaxpr, got {type(jaxpr).__name__}. "
            "Make one with jax.make_jaxpr(f)(*args), or count a function with "
            "wrapkit.flops.count(f, *args)."
        )
    merged = _check_rules(rules)
    if on_cost is not None and not callable(on_cost):
        raise TypeError(
            f"on_cost must be callable as on_cost(scopes, primitive, cost), "
            f"got {type(on_cost).__name__}."
        )
    walker = _Walker(merged, on_cost)
    tally = _Tally()
    walker.walk(_dce(_open(jaxpr)), tally, 1, () if on_cost is not None else None)
    result = tally.freeze()
    if result.unsupported:
        names = ", ".join(result.unsupported)
        first = result.unsupported[0]
        warn(
            f"No FLOP rule for primitive(s) {names}; they are counted as 0 and listed in "
            f"FlopCount.unsupported. Add a rule for one count with "
            f"count(..., rules={{{first!r}: rule}}), or for all counts with "
            f"@wrapkit.flops.register_rule({first!r}); a rule is `rule(eqn) -> Cost`, and "
            f"wrapkit.flops.elementwise(flops=...) makes one.",
            UnsupportedPrimitiveWarning,
        )
    return result


def count(
    fn: Callable[..., Any],
    /,
    *args: Any,
    rules: Mapping[str, FlopRule] | None = None,
    **kwargs: Any,
) -> FlopCount:
    """Count the FLOPs of ``fn(*args, **kwargs)`` without running it.

    ``fn`` is traced with ``jax.make_jaxpr``; arguments may be arrays or
    ``jax.ShapeDtypeStruct`` (in any pytree). Close over non-array arguments, and a keyword
    argument named ``rules``, with ``functools.partial``. See
    [`count_jaxpr`][wrapkit.flops.count_jaxpr] for the conventions.

    Args:
        fn: the function to count.
        *args: its positional arguments, concrete or abstract.
        rules: rules by primitive name that take precedence over the registered ones, for this
            call only.
        **kwargs: its keyword arguments.

    Returns:
        The count.

    Raises:
        TypeError: if ``fn`` is not callable, or ``rules`` is not a mapping of names to rules.

    Examples:
        >>> import jax
        >>> from wrapkit import flops
        >>> x = jax.ShapeDtypeStruct((8, 16), "float32")
        >>> w = jax.ShapeDtypeStruct((16, 32), "float32")
        >>> result = flops.count(lambda x, w: jax.numpy.tanh(x @ w), x, w)
        >>> result.flops, result.transcendentals  # 2 x 8 x 16 x 32, and 8 x 32 tanh
        (8192, 256)
    """
    if not callable(fn):
        raise TypeError(
            f"count expects a callable as its first argument, got {type(fn).__name__}. "
            "Pass the function and its arguments: count(model.apply, params, x)."
        )
    return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs), rules=rules)
