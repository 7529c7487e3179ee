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
