"""A traced forward program, replayed so that ``jax.vjp`` linearises each repeated call once.

jax linearises a program one primitive at a time, and that costs more than tracing it: most of
a summary's time with ``vjp=True``. A model's repeated blocks (GPT-2's twelve ``Block``
calls) are one program on different inputs. ``replay`` finds the module calls whose
equations are the same program up to the names of their variables (the same primitives,
parameters, shapes, and name stacks below the call) and returns a function that evaluates
the traced program with each such call running one shared ``jax.jit(..., inline=True)``
function. jax linearises a jitted program once per program and pattern of nonzero tangents,
and inlines an inline jit back into the program it traces, so the VJP program is the one
that ``jax.vjp`` of the traced program gives, equation for equation, with its equations'
name stacks.

A shared program carries the name stacks of its first call's equations below that call,
with the calls inside it named relatively (``wrapkit-part-<k>``, the k-th call inside in
order of first appearance); ``replay`` also returns the table that resolves them for each
call the program runs for (``_name_stack.resolve``).

Only calls whose equations are contiguous in the program, have no effects and no marked
calls inside sub-jaxprs (an ``nn.scan`` body), share a program; every other equation is
evaluated as it was traced. Parameters are compared as jax gives them: a ``custom_jvp``
function called outside a jit (flax's ``nn.relu``) gets rule objects of its own at each
call, so calls containing one are not shared.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from .. import _name_stack as ns

# The call tree as the engine records it: calls with ``id`` and ``children``; ``visible``
# replaces each call that gets no row by its own visible callees (``engine._visible``).
Visible = Callable[[list[Any]], list[Any]]

# A repeated call is shared only if it has at least this many equations: below that, the
# jit call costs about what linearising the equations does.
_MIN_EQUATIONS = 8


@dataclasses.dataclass
class _Span:
    """The equations of one call: ``eqns[first:last + 1]`` of the traced program."""

    call: int
    first: int
    last: int
    depth: int  # entries of the name stack above and at the call's marker
    inputs: list[Any] = dataclasses.field(default_factory=list)  # in order of first use
    order: list[Any] = dataclasses.field(default_factory=list)  # every variable, numbered
    defined: list[int] = dataclasses.field(default_factory=list)  # numbers of the outputs
    parts: dict[int, int] = dataclasses.field(default_factory=dict)  # call id -> k


@dataclasses.dataclass
class _Piece:
    """A part of the program, in order: a run of equations evaluated as traced, or a call
    running its group's shared program under the name stack above the call (``prefix``)."""

    inputs: list[Any]
    outputs: list[Any]
    fn: Callable[..., Sequence[Any]]
    prefix: ns.NameStack | None = None  # a shared program's: the name stack it runs under


def replay(
    program: jex_core.ClosedJaxpr, roots: list[Any], visible: Visible
) -> tuple[Callable[..., list[Any]], dict[tuple[int, int], int]]:
    """A function computing ``program``'s outputs from its inputs (flat lists) with the
    repeated calls among ``roots``' call tree sharing programs, and the relative-call table."""
    jaxpr = program.jaxpr
    eqns = jaxpr.eqns
    spans = _spans(eqns)
    groups = _groups(eqns, spans, visible(roots), visible)
    chosen = sorted((span.first, span.last) for members in groups for span in members)
    # Calls of one level of the call tree have disjoint spans; if that ever failed, share
    # nothing rather than run an equation twice.
    if not groups or any(a[1] >= b[0] for a, b in itertools.pairwise(chosen)):
        return jex_core.jaxpr_as_fun(program), {}
    last_use = _last_uses(jaxpr)
    parts: dict[tuple[int, int], int] = {}
    # The first equation of each shared call -> its span, its outputs' numbers, the program.
    shared: dict[int, tuple[_Span, list[int], Callable[..., Any]]] = {}
    for members in groups:
        # Every output any member needs: the others compute it too, unused.
        positions = sorted(
            {
                index
                for span in members
                for index in span.defined
                if _needed(span.order[index], span.last, last_use)
            }
        )
        fn = _shared_program(eqns, members[0], positions)
        for span in members:
            shared[span.first] = (span, positions, fn)
            parts.update(((span.call, k), call) for call, k in span.parts.items())
    pieces = _pieces(eqns, shared, last_use)
    constvars, invars, outvars = jaxpr.constvars, jaxpr.invars, jaxpr.outvars
    consts = program.consts

    def run(*args: Any) -> list[Any]:
        env: dict[Any, Any] = dict(zip(constvars, consts, strict=True))
        env.update(zip(invars, args, strict=True))
        for piece in pieces:
            values = [env[var] for var in piece.inputs]
            if piece.prefix is None:
                outs = piece.fn(*values)
            else:
                with ns.set_name_stack(ns.current_name_stack() + piece.prefix):
                    outs = piece.fn(*values)
            env.update(zip(piece.outputs, outs, strict=True))
        return [var.val if isinstance(var, jex_core.Literal) else env[var] for var in outvars]

    return run, parts


def _spans(eqns: Sequence[jex_core.JaxprEqn]) -> dict[int, _Span]:
    """Each marked call's span of equations, for the calls whose equations are contiguous."""
    spans: dict[int, _Span] = {}
    counts: collections.Counter[int] = collections.Counter()
    for index, eqn in enumerate(eqns):
        for depth, entry in enumerate(ns.entries(eqn)):
            call = ns.call_of_entry(entry)
            if call is None:
                continue
            counts[call] += 1
            span = spans.get(call)
            if span is None:
                spans[call] = _Span(call, index, index, depth + 1)
            else:
                span.last = index
    return {
        call: span
        for call, span in spans.items()
        if counts[call] == span.last - span.first + 1 and counts[call] >= _MIN_EQUATIONS
    }


def _groups(
    eqns: Sequence[jex_core.JaxprEqn], spans: dict[int, _Span], level: list[Any], visible: Visible
) -> list[list[_Span]]:
    """The calls that share a program, grouped, outermost first (level by level of the call
    tree): a call inside a shared one is not looked at."""
    groups: list[list[_Span]] = []
    while level:
        # Only calls with as many equations as another call of the level can repeat.
        lengths = collections.Counter(
            span.last - span.first for call in level if (span := spans.get(call.id))
        )
        keys: dict[int, Hashable] = {}
        for call in level:
            span = spans.get(call.id)
            if span is None or lengths[span.last - span.first] < 2:
                continue
            key = _key(eqns, span)
            if key is not None:
                keys[call.id] = key
        by_key: dict[Hashable, list[_Span]] = collections.defaultdict(list)
        for call in level:
            if call.id in keys:
                by_key[keys[call.id]].append(spans[call.id])
        repeated = {key for key, members in by_key.items() if len(members) > 1}
        groups.extend(members for key, members in by_key.items() if key in repeated)
        level = [
            child
            for call in level
            if keys.get(call.id) not in repeated
            for child in visible(call.children)
        ]
    return groups


def _key(eqns: Sequence[jex_core.JaxprEqn], span: _Span) -> Hashable | None:
    """What makes two calls' equations one program: the equations with their variables
    numbered in order of appearance and name stacks below the call, relative; ``None`` if
    the call cannot share a program. Fills in ``span``'s inputs, numbering and parts."""
    number: dict[Any, int] = {}
    inputs: list[Any] = []
    defined: list[int] = []
    parts: dict[int, int] = {}
    prefix = ns.entries(eqns[span.first])[: span.depth]
    items = []
    for eqn in eqns[span.first : span.last + 1]:
        stack = ns.entries(eqn)
        if eqn.effects or stack[: span.depth] != prefix:
            return None
        params = _params_key(eqn)
        if params is None:
            return None
        refs: list[Hashable] = []
        for var in eqn.invars:
            if isinstance(var, jex_core.Literal):
                refs.append(_literal_key(var))
                continue
            index = number.get(var)
            if index is None:
                index = number[var] = len(number)
                inputs.append(var)
            refs.append(index)
        for var in eqn.outvars:
            defined.append(len(number))
            number[var] = len(number)
        below: list[Hashable] = []
        for entry in stack[span.depth :]:
            call = ns.call_of_entry(entry)
            if call is not None:
                below.append(("part", parts.setdefault(call, len(parts))))
            else:
                below.append(entry)
        items.append(
            (
                eqn.primitive,
                params,
                tuple(refs),
                tuple(var.aval for var in eqn.outvars),
                tuple(below),
                eqn.ctx,  # compute placement, PRNG partitioning, XLA metadata (interned)
            )
        )
    key = (tuple(var.aval for var in inputs), tuple(items))
    try:
        hash(key)
    except TypeError:
        return None
    span.inputs, span.parts, span.defined = inputs, parts, defined
    span.order = list(number)  # a dict keeps the order in which the numbers were given
    return key


def _params_key(eqn: jex_core.JaxprEqn) -> Hashable | None:
    """``eqn``'s parameters as a value to compare (``None`` when a sub-jaxpr marks calls:
    its name stacks would name the first call's callees)."""
    for sub in jex_core.jaxprs_in_params(eqn.params):
        if ns.marked_calls(sub):
            return None
    return tuple(sorted(eqn.params.items()))


def _literal_key(literal: jex_core.Literal) -> Hashable:
    value = np.asarray(literal.val)
    return ("literal", literal.aval, value.dtype.str, value.shape, value.tobytes())


def _last_uses(jaxpr: jex_core.Jaxpr) -> dict[Any, int]:
    """The index of the last equation that reads each variable (``len(eqns)``: an output)."""
    last: dict[Any, int] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, jex_core.Literal):
                last[var] = index
    for var in jaxpr.outvars:
        if not isinstance(var, jex_core.Literal):
            last[var] = len(jaxpr.eqns)
    return last


def _needed(var: Any, last: int, last_use: dict[Any, int]) -> bool:
    return last_use.get(var, -1) > last


def _shared_program(
    eqns: Sequence[jex_core.JaxprEqn], span: _Span, positions: list[int]
) -> Callable[..., Any]:
    """The inline jit that runs ``span``'s equations, name stacks below the call relative."""
    rewritten = []
    for eqn in eqns[span.first : span.last + 1]:
        below = [
            ns.part_entry(span.parts[call])
            if (call := ns.call_of_entry(entry)) is not None
            else entry
            for entry in ns.entries(eqn)[span.depth :]
        ]
        rewritten.append(ns.with_entries(eqn, below))
    program = _program(span.inputs, [span.order[i] for i in positions], rewritten)
    return jax.jit(jex_core.jaxpr_as_fun(program), inline=True)


def _program(
    inputs: list[Any], outputs: list[Any], eqns: list[jex_core.JaxprEqn]
) -> jex_core.ClosedJaxpr:
    effects = frozenset().union(*(eqn.effects for eqn in eqns))
    debug = jex_core.DebugInfo("wrapkit.summary", "a part of the traced program", None, None)
    jaxpr = jex_core.Jaxpr([], inputs, outputs, eqns, effects, debug)
    return jex_core.ClosedJaxpr(jaxpr, [])


def _pieces(
    eqns: Sequence[jex_core.JaxprEqn],
    shared: dict[int, tuple[_Span, list[int], Callable[..., Any]]],
    last_use: dict[Any, int],
) -> list[_Piece]:
    """The program as pieces in order: runs of equations evaluated as traced, and calls
    running their shared programs."""
    pieces: list[_Piece] = []
    index = 0
    while index < len(eqns):
        hit = shared.get(index)
        if hit is not None:
            span, positions, fn = hit
            prefix = ns.stack_of(ns.entries(eqns[span.first])[: span.depth])
            outputs = [span.order[i] for i in positions]
            pieces.append(_Piece(span.inputs, outputs, fn, prefix))
            index = span.last + 1
            continue
        end = index
        while end < len(eqns) and end not in shared:
            end += 1
        pieces.append(_run(eqns, index, end, last_use))
        index = end
    return pieces


def _run(
    eqns: Sequence[jex_core.JaxprEqn], start: int, end: int, last_use: dict[Any, int]
) -> _Piece:
    """``eqns[start:end]`` as a piece evaluated as traced (absolute name stacks)."""
    defined: set[Any] = set()
    inputs: list[Any] = []
    seen: set[Any] = set()
    outputs: list[Any] = []
    for eqn in eqns[start:end]:
        for var in eqn.invars:
            if isinstance(var, jex_core.Literal) or var in defined or var in seen:
                continue
            seen.add(var)
            inputs.append(var)
        for var in eqn.outvars:
            defined.add(var)
            if _needed(var, end - 1, last_use):
                outputs.append(var)
    program = _program(inputs, outputs, list(eqns[start:end]))
    return _Piece(inputs, outputs, jex_core.jaxpr_as_fun(program))
