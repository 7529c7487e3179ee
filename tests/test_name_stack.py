"""What wrapkit reads of jax's name stacks (``wrapkit/_name_stack.py``), pinned."""

import jax
import jax.numpy as jnp

from wrapkit import _name_stack


def _eqns(fn, *args):
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns


def test_scopes_are_the_named_scopes_outermost_first_without_transforms():
    def f(x):
        with jax.named_scope("outer"), jax.named_scope("inner"):
            return jnp.sin(x)

    (eqn,) = _eqns(f, 1.0)
    assert _name_stack.scopes(eqn) == ("outer", "inner")
    # Differentiated equations carry jvp / transpose entries, which are not scopes.
    stacks = {_name_stack.scopes(eqn) for eqn in _eqns(jax.grad(f), 1.0)}
    assert stacks == {("outer", "inner")}
    assert any("jvp" in str(eqn.source_info.name_stack) for eqn in _eqns(jax.grad(f), 1.0))


def test_marks_are_found_in_sub_jaxprs_and_other_scopes_are_not_marks():
    def f(x):
        with _name_stack.mark_call(7), jax.named_scope("wrapkit-call"):
            y = jnp.sin(x)

        def body(carry, _):
            with _name_stack.mark_call(8):
                return carry * 2.0, None

        return jax.lax.scan(body, y, length=3)[0]

    jaxpr = jax.make_jaxpr(f)(1.0).jaxpr
    assert _name_stack.marked_calls(jaxpr) == {7, 8}
    assert _name_stack.marked_call("wrapkit-call-12") == 12
    assert _name_stack.marked_call("wrapkit-call") is None
    assert _name_stack.marked_call("Dense_0") is None


def test_relative_marks_resolve_against_the_nearest_call_mark_above_them():
    parts = {(3, 0): 10, (3, 1): 11, (4, 0): 20}
    scopes = ("Top", "wrapkit-call-3", "attn", "wrapkit-part-0", "wrapkit-part-1")
    # Both parts are calls inside call 3, not part 1 inside part 0.
    assert _name_stack.resolve(scopes, parts) == [3, 10, 11]
    assert _name_stack.resolve(("wrapkit-call-4", "wrapkit-part-0"), parts) == [4, 20]
    # A part with no call mark above it, or unknown to the table, names no call.
    assert _name_stack.resolve(("wrapkit-part-0", "wrapkit-call-5", "wrapkit-part-0"), parts) == [5]


def test_name_stacks_are_built_from_entries_and_add_up():
    def f(x):
        with _name_stack.mark_call(3), jax.named_scope("inner"):
            return jnp.sin(x)

    (eqn,) = _eqns(f, 1.0)
    entries = _name_stack.entries(eqn)
    assert [_name_stack.call_of_entry(entry) for entry in entries] == [3, None]
    moved = _name_stack.with_entries(eqn, [_name_stack.part_entry(2), *entries[1:]])
    assert _name_stack.scopes(moved) == ("wrapkit-part-2", "inner")
    whole = _name_stack.stack_of(entries[:1]) + moved.source_info.name_stack
    assert tuple(entry.name for entry in whole.stack) == (
        "wrapkit-call-3",
        "wrapkit-part-2",
        "inner",
    )

    # Under a set stack, an inline jit's equations are the stack plus their own.
    inner = jax.jit(lambda x: jnp.cos(x), inline=True)

    def g(x):
        with _name_stack.set_name_stack(_name_stack.current_name_stack() + whole):
            return inner(x)

    (eqn,) = _eqns(g, 1.0)
    assert _name_stack.scopes(eqn) == ("wrapkit-call-3", "wrapkit-part-2", "inner")
