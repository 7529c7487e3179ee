"""Wrapped models under JAX transforms and lifted Flax transforms.

Every test compares against a reference computed in the same test: the model without the
transform, flax's own ``WeightNorm`` / ``SpectralNorm`` on the same variables (the variable
trees are identical), or the hand-written forward pass ``reference_forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import wrapkit.linen as wl

FEATURES = 3  # input and output width of every Dense, so that layers can be scanned
BATCH = 2
LAYERS = 3

# Innermost transform first, as the wrappers apply them to the kernel.
ORDER = {
    "weight_norm": ("weight_norm",),  # WeightNorm(Dense)
    "spectral_norm": ("spectral_norm",),  # SpectralNorm(Dense)
    "stacked": ("spectral_norm", "weight_norm"),  # WeightNorm(SpectralNorm(Dense))
    "stacked_reversed": ("weight_norm", "spectral_norm"),  # SpectralNorm(WeightNorm(Dense))
}

# (kind, update_stats): WeightNorm has no statistics, the others run in eval and train mode.
CASES = [
    ("weight_norm", False),
    ("spectral_norm", False),
    ("spectral_norm", True),
    ("stacked", False),
    ("stacked", True),
]
CASE_IDS = [
    "weight_norm",
    "spectral_norm-eval",
    "spectral_norm-train",
    "stacked-eval",
    "stacked-train",
]
# The lifted-transform tests are slower; they take the train cases, which also write statistics.
TRAIN_CASES = [case for case in CASES if case[0] == "weight_norm" or case[1]]
TRAIN_IDS = [id_ for case, id_ in zip(CASES, CASE_IDS, strict=True) if case in TRAIN_CASES]


def _identity(cls: type) -> type:
    return cls


def _jit(cls: type) -> type:
    # SpectralNorm's update_stats is a Python bool the wrapper branches on.
    return nn.jit(cls, static_argnames="update_stats")


LIFTS: dict[str, Callable[[type], type]] = {"none": _identity, "remat": nn.remat, "jit": _jit}
LIBRARIES = {"wrapkit": wl, "flax": nn}


class Block(nn.Module):
    """One wrapped Dense; the wrapper classes may themselves be lifted (``LIFTS``).

    The modules are named explicitly, with flax's default names, so that the variable tree is
    the same whichever lift is applied: ``params['Dense_0']``, ``params['WeightNorm_0']`` and
    ``batch_stats['SpectralNorm_0']``.
    """

    kind: str
    update_stats: bool = False
    library: str = "wrapkit"
    lift_wrapper: str = "none"
    lift_inner: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lib = LIBRARIES[self.library]
        outer, inner = LIFTS[self.lift_wrapper], LIFTS[self.lift_inner]
        dense = nn.Dense(FEATURES, name="Dense_0")
        if self.kind == "weight_norm":
            return outer(lib.WeightNorm)(dense, name="WeightNorm_0")(x)
        if self.kind == "spectral_norm":
            layer = outer(lib.SpectralNorm)(dense, name="SpectralNorm_0")
        elif self.kind == "stacked":
            normed = inner(wl.SpectralNorm)(dense, name="SpectralNorm_0")
            layer = outer(wl.WeightNorm)(normed, name="WeightNorm_0")
        else:
            normed = inner(wl.WeightNorm)(dense, name="WeightNorm_0")
            layer = outer(wl.SpectralNorm)(normed, name="SpectralNorm_0")
        return layer(x, update_stats=self.update_stats)


class Parent(nn.Module):
    """A ``Block`` under a lifted transform applied to the block class."""

    kind: str
    update_stats: bool = False
    lift_block: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = LIFTS[self.lift_block](Block)
        return block(self.kind, self.update_stats, name="Block_0")(x)


class ScanStep(nn.Module):
    """A ``Block`` in the ``(carry, xs) -> (carry, ys)`` form ``nn.scan`` needs."""

    kind: str
    update_stats: bool = False

    @nn.compact
    def __call__(self, carry: jax.Array, _: None) -> tuple[jax.Array, None]:
        return Block(self.kind, self.update_stats, name="Block_0")(carry), None


# -- helpers --------------------------------------------------------------------------------


def _unit(a: jax.Array) -> jax.Array:
    return a / jnp.sqrt(jnp.sum(a * a))


def reference_forward(
    kind: str, variables: dict[str, Any], x: jax.Array, update_stats: bool
) -> tuple[jax.Array, dict[str, Any]]:
    """The output and the batch statistics after the call, written out by hand.

    WeightNorm: ``scale * kernel / ||kernel||`` (norm over the input axis). SpectralNorm: one
    step of power iteration from the stored ``u``, then ``kernel / sigma``.
    """
    params = variables["params"]
    kernel = params["Dense_0"]["kernel"]
    stats = variables.get("batch_stats", {})
    for step in ORDER[kind]:
        if step == "weight_norm":
            scale = params["WeightNorm_0"]["Dense_0/kernel/scale"]
            kernel = scale * kernel / jnp.sqrt(jnp.sum(kernel * kernel, axis=0, keepdims=True))
        else:
            u = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/u"]
            v = _unit(u @ kernel.T)
            u = _unit(v @ kernel)
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
            sigma = (v @ kernel @ u.T)[0, 0]
            kernel = kernel / sigma
            if update_stats:
                stats = {"SpectralNorm_0": {"Dense_0/kernel/u": u, "Dense_0/kernel/sigma": sigma}}
    return x @ kernel + params["Dense_0"]["bias"], stats


def run(
    model: nn.Module, variables: dict[str, Any], *args: Any, update_stats: bool
) -> tuple[Any, dict[str, Any]]:
    """``model.apply`` returning ``(output, batch_stats after the call)``."""
    if update_stats:
        out, updates = model.apply(variables, *args, mutable=["batch_stats"])
        return out, updates["batch_stats"]
    return model.apply(variables, *args), variables.get("batch_stats", {})


def redraw_params(variables: dict[str, Any], seed: int) -> dict[str, Any]:
    """``variables`` with every parameter redrawn from N(0, 1).

    The initial scales (ones) and biases (zeros) would hide a scale or bias that is ignored.
    """
    leaves, treedef = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    redrawn = [
        jax.random.normal(key, leaf.shape, leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return {**variables, "params": jax.tree.unflatten(treedef, redrawn)}


def make_variables(model: nn.Module, seed: int, *args: Any) -> dict[str, Any]:
    """``model.init`` followed by ``redraw_params``."""
    return redraw_params(model.init(jax.random.key(seed), *args), seed + 1000)


def layer(variables: dict[str, Any], i: int) -> dict[str, Any]:
    """The ``i``-th slice of variables stacked along axis 0."""
    return jax.tree.map(lambda leaf: leaf[i], variables)


def stack_trees(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def sum_of_squares_loss(
    model: nn.Module, variables: dict[str, Any], x: jax.Array, update_stats: bool
) -> Callable[[Any], tuple[jax.Array, dict[str, Any]]]:
    """``params -> (sum(y**2), batch_stats after the call)``."""

    def loss(params: Any) -> tuple[jax.Array, dict[str, Any]]:
        y, stats = run(model, {**variables, "params": params}, x, update_stats=update_stats)
        return jnp.sum(y * y), stats

    return loss


def assert_close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


@pytest.fixture
def x() -> jax.Array:
    return jax.random.normal(jax.random.key(42), (BATCH, FEATURES), jnp.float32)


# -- JAX transforms -------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "update_stats"), CASES, ids=CASE_IDS)
def test_jit_matches_eager(kind: str, update_stats: bool, x: jax.Array) -> None:
    model = Block(kind, update_stats)

    def step(variables: dict[str, Any], x: jax.Array) -> tuple[Any, dict[str, Any]]:
        return run(model, variables, x, update_stats=update_stats)

    jitted = jax.jit(step)
    # Two sets of variables through one compiled function: they are inputs, not constants.
    for seed in (0, 1):
        variables = make_variables(model, seed, x)
        eager = step(variables, x)
        assert_close(jitted(variables, x), eager, tol=1e-6)
        assert_close(eager, reference_forward(kind, variables, x, update_stats))
        if update_stats:
            u = eager[1]["SpectralNorm_0"]["Dense_0/kernel/u"]
            assert not jnp.allclose(
                u, variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/u"]
            )


@pytest.mark.parametrize(("kind", "update_stats"), CASES, ids=CASE_IDS)
def test_grad_matches_flax_and_reference(kind: str, update_stats: bool, x: jax.Array) -> None:
    model = Block(kind, update_stats)
    variables = make_variables(model, 0, x)
    params = variables["params"]

    grads, stats = jax.grad(sum_of_squares_loss(model, variables, x, update_stats), has_aux=True)(
        params
    )

    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))

    def reference_loss(params: Any) -> tuple[jax.Array, dict[str, Any]]:
        y, stats = reference_forward(kind, {**variables, "params": params}, x, update_stats)
        return jnp.sum(y * y), stats

    assert_close((grads, stats), jax.grad(reference_loss, has_aux=True)(params))
    if kind != "stacked":  # flax's wrappers do not stack
        flax_model = Block(kind, update_stats, library="flax")
        flax_loss = sum_of_squares_loss(flax_model, variables, x, update_stats)
        assert_close((grads, stats), jax.grad(flax_loss, has_aux=True)(params))
    if "weight_norm" in ORDER[kind]:
        assert bool(jnp.all(grads["WeightNorm_0"]["Dense_0/kernel/scale"] != 0))


@pytest.mark.parametrize(("kind", "update_stats"), TRAIN_CASES, ids=TRAIN_IDS)
def test_vmap_over_examples_matches_per_example(
    kind: str, update_stats: bool, x: jax.Array
) -> None:
    model = Block(kind, update_stats)
    variables = make_variables(model, 0, x)

    def per_example(xi: jax.Array) -> tuple[Any, dict[str, Any]]:
        return run(model, variables, xi, update_stats=update_stats)

    batched = jax.vmap(per_example)(x)

    assert_close(batched, stack_trees([per_example(xi) for xi in x]), tol=1e-6)


@pytest.mark.parametrize(("kind", "update_stats"), TRAIN_CASES, ids=TRAIN_IDS)
def test_vmap_over_variables_matches_per_member(
    kind: str, update_stats: bool, x: jax.Array
) -> None:
    model = Block(kind, update_stats)
    keys = jax.random.split(jax.random.key(0), 3)

    initial = jax.vmap(model.init, in_axes=(0, None))(keys, x)
    assert_close(initial, stack_trees([model.init(key, x) for key in keys]), tol=1e-6)
    ensemble = redraw_params(initial, 1)

    def apply(variables: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return run(model, variables, x, update_stats=update_stats)

    members = [layer(ensemble, i) for i in range(len(keys))]
    assert_close(jax.vmap(apply)(ensemble), stack_trees([apply(m) for m in members]), tol=1e-6)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "stacked"])
def test_eval_shape_of_init_allocates_nothing_and_matches_init(kind: str, x: jax.Array) -> None:
    model = Block(kind)
    x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)

    abstract = jax.eval_shape(model.init, jax.random.key(0), x_spec)

    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    concrete = model.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), concrete
    )
    if kind != "stacked":
        flax_abstract = jax.eval_shape(Block(kind, library="flax").init, jax.random.key(0), x_spec)
        assert abstract == flax_abstract


# -- lifted Flax transforms -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "update_stats"), TRAIN_CASES, ids=TRAIN_IDS)
def test_nn_scan_matches_python_loop(kind: str, update_stats: bool, x: jax.Array) -> None:
    scanned = nn.scan(
        ScanStep,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=LAYERS,
    )(kind, update_stats)
    initial = scanned.init(jax.random.key(0), x, None)
    variables = redraw_params(initial, 1)

    (y, _), stats = run(scanned, variables, x, None, update_stats=update_stats)

    carry, loop_stats = x, []
    for i in range(LAYERS):
        block = {collection: tree["Block_0"] for collection, tree in layer(variables, i).items()}
        expected = reference_forward(kind, block, carry, update_stats)
        (carry, _), layer_stats = run(
            ScanStep(kind, update_stats),
            layer(variables, i),
            carry,
            None,
            update_stats=update_stats,
        )
        assert_close((carry, layer_stats.get("Block_0", {})), expected)
        loop_stats.append(layer_stats)
    assert_close((y, stats), (carry, stack_trees(loop_stats)), tol=1e-6)

    # split_rngs={"params": True}: every layer starts from its own values.
    kernels = initial["params"]["Block_0"]["Dense_0"]["kernel"]
    assert all(not jnp.allclose(kernels[0], kernel) for kernel in kernels[1:])
    if "spectral_norm" in ORDER[kind]:
        before = variables["batch_stats"]["Block_0"]["SpectralNorm_0"]
        assert all(
            not jnp.allclose(before["Dense_0/kernel/u"][0], u)
            for u in before["Dense_0/kernel/u"][1:]
        )
        # update_stats=True writes every layer's u and sigma.
        after = stats["Block_0"]["SpectralNorm_0"]
        for name in ("Dense_0/kernel/u", "Dense_0/kernel/sigma"):
            assert after[name].shape == before[name].shape
            for i in range(LAYERS):
                assert not jnp.allclose(after[name][i], before[name][i]), (name, i)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "stacked"])
def test_nn_vmap_over_examples_matches_per_example(kind: str, x: jax.Array) -> None:
    vmapped = nn.vmap(
        Block,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
    )(kind)
    variables = make_variables(vmapped, 0, x)
    plain_shapes = jax.eval_shape(Block(kind).init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain_shapes)

    y = vmapped.apply(variables, x)

    assert_close(y, jnp.stack([Block(kind).apply(variables, xi) for xi in x]), tol=1e-6)


@pytest.mark.parametrize(("kind", "update_stats"), TRAIN_CASES, ids=TRAIN_IDS)
def test_nn_vmap_ensemble_matches_per_member(kind: str, update_stats: bool, x: jax.Array) -> None:
    members = 3
    ensemble = nn.vmap(
        Block,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=None,
        axis_size=members,
    )(kind, update_stats)
    variables = make_variables(ensemble, 0, x)

    result = run(ensemble, variables, x, update_stats=update_stats)

    expected = []
    for i in range(members):
        member = layer(variables, i)
        expected.append(run(Block(kind, update_stats), member, x, update_stats=update_stats))
        assert_close(expected[-1], reference_forward(kind, member, x, update_stats))
    assert_close(result, stack_trees(expected), tol=1e-6)


def _value_and_grad(
    model: nn.Module, variables: dict[str, Any], x: jax.Array, update_stats: bool
) -> tuple[tuple[jax.Array, dict[str, Any]], Any]:
    loss = sum_of_squares_loss(model, variables, x, update_stats)
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])


@pytest.mark.parametrize(("kind", "update_stats"), TRAIN_CASES, ids=TRAIN_IDS)
@pytest.mark.parametrize("lift", ["remat", "jit"])
def test_lifted_block_matches_plain_block(
    lift: str, kind: str, update_stats: bool, x: jax.Array
) -> None:
    lifted = Parent(kind, update_stats, lift_block=lift)
    plain = Parent(kind, update_stats)
    variables = make_variables(plain, 0, x)
    assert jax.tree.map(jnp.shape, lifted.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, plain.init(jax.random.key(0), x)
    )

    assert_close(
        _value_and_grad(lifted, variables, x, update_stats),
        _value_and_grad(plain, variables, x, update_stats),
        tol=1e-6,
    )


# nn.remat cannot lift SpectralNorm's class: its update_stats is keyword-only and nn.remat
# has no static_argnames, so the bool is traced; flax's class fails the same way, see
# test_remat_of_spectral_norm_class_traces_update_stats_like_flax.
LIFTED_WRAPPER_CASES = [
    ("remat", "weight_norm", False),
    ("jit", "weight_norm", False),
    ("jit", "spectral_norm", True),
    ("jit", "stacked", True),
]
LIFTED_WRAPPER_IDS = [
    "remat-weight_norm",
    "jit-weight_norm",
    "jit-spectral_norm-train",
    "jit-stacked-train",
]


@pytest.mark.parametrize(
    ("lift", "kind", "update_stats"), LIFTED_WRAPPER_CASES, ids=LIFTED_WRAPPER_IDS
)
def test_lifted_wrapper_class_matches_plain_and_flax(
    lift: str, kind: str, update_stats: bool, x: jax.Array
) -> None:
    lifted = Block(kind, update_stats, lift_wrapper=lift)
    plain = Block(kind, update_stats)
    variables = make_variables(plain, 0, x)
    assert jax.tree.map(jnp.shape, lifted.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )

    result = _value_and_grad(lifted, variables, x, update_stats)

    assert_close(result, _value_and_grad(plain, variables, x, update_stats), tol=1e-6)
    if kind != "stacked":
        flax_lifted = Block(kind, update_stats, library="flax", lift_wrapper=lift)
        assert_close(result, _value_and_grad(flax_lifted, variables, x, update_stats))


@pytest.mark.parametrize(
    ("lift", "kind"),
    [("jit", "stacked"), ("remat", "stacked_reversed")],
    ids=["WeightNorm(jit(SpectralNorm))", "SpectralNorm(remat(WeightNorm))"],
)
def test_lifted_inner_wrapper_in_a_stack_is_refused_when_built(
    lift: str, kind: str, x: jax.Array
) -> None:
    # The outer transform would have to run inside the inner wrapper's lifted trace, where
    # it cannot write its own variables; lifting a module around the stack works (above).
    with pytest.raises(
        TypeError,
        match=r"cannot wrap (Jit|Checkpoint)\w+, a wrapper lifted by a flax transform "
        r"\(nn\.remat, nn\.jit, \.\.\.\)[^.]*\. Lift a module around the whole stack",
    ):
        Block(kind, update_stats=True, lift_inner=lift).init(jax.random.key(0), x)


@pytest.mark.parametrize("library", ["wrapkit", "flax"])
def test_remat_of_spectral_norm_class_traces_update_stats_like_flax(
    library: str, x: jax.Array
) -> None:
    # A limitation shared with flax, pinned so that the two stay drop-ins for each other:
    # nn.remat traces keyword arguments and has no static_argnames.
    model = Block("spectral_norm", library=library, lift_wrapper="remat")
    with pytest.raises(jax.errors.TracerBoolConversionError, match="update_stats"):
        model.init(jax.random.key(0), x)
