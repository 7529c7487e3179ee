"""The jaxpr name stack: read and set in this one place (``jax.extend.source_info_util``).

Linen records each module call in the name stack (``Top/mlp/fc1``); jaxpr equations carry the
stack they were traced under, relative to their enclosing jaxpr. A wrapper runs its
transform under the name stack of its own call, so that tools attribute the transform's
operations to the wrapper, wherever in the stack it runs.

The summary marks each recorded module call with a scope of its own,
``wrapkit-call-<id>`` (``mark_call``), whatever the framework: NNX puts nothing in the name
stack, and Linen's module names are not unique per call. A program that the summary shares
between repeated calls (``_summary/segments.py``) names the calls inside it relatively,
``wrapkit-part-<k>``: the k-th call inside the nearest ``wrapkit-call-<id>`` above it, which
a ``Parts`` table resolves (``resolve``).

What this module relies on beyond ``jax.extend``'s names (pinned by
``tests/test_name_stack.py``): an equation's ``source_info.name_stack`` is a ``NameStack``
whose ``stack`` holds one entry per element, outermost first; the entries made by
``jax.named_scope`` (and by flax's module names) are of one class, with the scope's text in
``name``, and transforms (``jvp``, ``transpose``, ``vmap``) are of another; a ``NameStack``
is made from a tuple of entries, and two add up to the concatenation of their entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import jax
from jax.extend import core as _core
from jax.extend.source_info_util import NameStack as NameStack
from jax.extend.source_info_util import current_name_stack as current_name_stack
from jax.extend.source_info_util import extend_name_stack as extend_name_stack
from jax.extend.source_info_util import new_name_stack as _new_name_stack
from jax.extend.source_info_util import set_name_stack as set_name_stack

# The class of the entries made by `jax.named_scope` and module names, as opposed to
# transform entries (jvp, transpose, vmap).
_SCOPE = type(_new_name_stack("scope").stack[0])
MARKER = "wrapkit-call-"
PART = "wrapkit-part-"

Parts = Mapping[tuple[int, int], int]
"""(id of the call a shared program runs for, k) -> the id of the k-th call inside it."""


def scopes(eqn: _core.JaxprEqn) -> tuple[str, ...]:
    """The scope names on ``eqn``'s own name stack, outermost first, transforms left out.

    Inside a ``scan``/``remat``/``jit`` body the stack is relative to the enclosing equation:
    prepend that equation's scopes for the full stack.
    """
    return tuple(entry.name for entry in eqn.source_info.name_stack.stack if type(entry) is _SCOPE)


def mark_call(call_id: int) -> contextlib.AbstractContextManager[None]:
    """A scope naming call ``call_id``: every equation traced inside it carries the mark."""
    return jax.named_scope(f"{MARKER}{call_id}")


def marked_call(scope: str) -> int | None:
    """The call id of a ``mark_call`` scope name, ``None`` for any other scope."""
    if scope.startswith(MARKER):
        return int(scope[len(MARKER) :])
    return None


def entries(eqn: _core.JaxprEqn) -> tuple[object, ...]:
    """The entries of ``eqn``'s name stack, outermost first, scopes and transforms."""
    return eqn.source_info.name_stack.stack


def call_of_entry(entry: object) -> int | None:
    """The call id of a ``mark_call`` entry, ``None`` for any other entry."""
    return marked_call(entry.name) if type(entry) is _SCOPE else None  # type: ignore[attr-defined]


def part_entry(k: int) -> object:
    """The entry naming the k-th call inside a shared program (see ``resolve``)."""
    return _SCOPE(f"{PART}{k}")


def with_entries(eqn: _core.JaxprEqn, stack: Iterable[object]) -> _core.JaxprEqn:
    """``eqn`` with the name stack made of ``stack``'s entries."""
    return eqn.replace(source_info=eqn.source_info.replace(name_stack=stack_of(stack)))


def stack_of(stack: Iterable[object]) -> NameStack:
    """The name stack made of ``stack``'s entries."""
    return NameStack(tuple(stack))  # type: ignore[arg-type]


def resolve(scopes: Iterable[str], parts: Parts) -> list[int]:
    """The ids of the calls that ``scopes`` (outermost first) name, in order.

    A ``wrapkit-part-<k>`` scope is the k-th call inside the nearest ``wrapkit-call-<id>``
    scope above it, looked up in ``parts``; other scopes name no call.
    """
    calls: list[int] = []
    anchor: int | None = None
    for scope in scopes:
        call = marked_call(scope)
        if call is not None:
            anchor = call
        elif anchor is not None and scope.startswith(PART):
            call = parts.get((anchor, int(scope[len(PART) :])))
        if call is not None:
            calls.append(call)
    return calls


def marked_calls(jaxpr: _core.Jaxpr, parts: Parts | None = None) -> set[int]:
    """The ids of every call marked on an equation of ``jaxpr`` or of its sub-jaxprs
    (relative marks resolved with ``parts``)."""
    stacks: set[NameStack] = set()

    def visit(jaxpr: _core.Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            stacks.add(eqn.source_info.name_stack)
            for sub in _core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr)
    return {
        call
        for stack in stacks
        for call in resolve(
            (entry.name for entry in stack.stack if type(entry) is _SCOPE),  # type: ignore[attr-defined]
            parts or {},
        )
    }
