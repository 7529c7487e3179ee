"""The jaxpr name stack: read and set in this one place (``jax.extend.source_info_util``).

Linen records each module call in the name stack (``Top/mlp/fc1``); jaxpr equations carry the
stack they were traced under, relative to their enclosing jaxpr. A wrapper runs its
transform under the name stack of its own call, so that tools attribute the transform's
operations to the wrapper, wherever in the stack it runs.

The summary marks each recorded module call with a scope of its own,
``wrapkit-call-<id>`` (``mark_call``), whatever the framework: NNX puts nothing in the name
stack, and Linen's module names are not unique per call.

What this module relies on beyond ``jax.extend``'s names (pinned by
``tests/test_name_stack.py``): an equation's ``source_info.name_stack`` is a ``NameStack``
whose ``stack`` holds one entry per element, outermost first; the entries made by
``jax.named_scope`` (and by flax's module names) are of one class, with the scope's text in
``name``, and transforms (``jvp``, ``transpose``, ``vmap``) are of another.
"""

from __future__ import annotations

import contextlib

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


def marked_calls(jaxpr: _core.Jaxpr) -> set[int]:
    """The ids of every call marked on an equation of ``jaxpr`` or of its sub-jaxprs."""
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
        for entry in stack.stack
        if type(entry) is _SCOPE and (call := marked_call(entry.name)) is not None
    }
