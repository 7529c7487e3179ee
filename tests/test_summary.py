"""wrapkit.summary: rows per call, invariants, wrappers, lifted transforms, flax's failures."""

from __future__ import annotations

import gc
import importlib.util
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wrapkit
from wrapkit.linen import SpectralNorm, WeightNorm

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = jax.random.key(0)
X = jax.ShapeDtypeStruct((8, 16), jnp.float32)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


# --- models -------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.Conv(8, (3, 3), strides=2)(x)
        return nn.Dense(10)(nn.avg_pool(x, (2, 2)).reshape((x.shape[0], -1)))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1])(jax.nn.softmax(y))


class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = WeightNorm(nn.Dense(32))(x)
        x = nn.WeightNorm(nn.Dense(32))(x)
        return WeightNorm(SpectralNorm(nn.Dense(4)))(x, update_stats=False)


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(16)
        return dense(nn.tanh(dense(x)))


class Scanned(nn.Module):
    length: int = 10

    @nn.compact
    def __call__(self, x):
        body = nn.scan(
            lambda module, carry, _: (nn.tanh(module(carry)), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.length,
        )
        x, _ = body(nn.Dense(16), x, None)
        return x


class Unrolled(nn.Module):
    length: int = 10

    @nn.compact
    def __call__(self, x):
        for _ in range(self.length):
            x = nn.tanh(nn.Dense(16)(x))
        return x


MODELS = {
    "mlp": (MLP(), X),
    "cnn": (CNN(), jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)),
    "attention": (Attention(), jax.ShapeDtypeStruct((2, 5, 8), jnp.float32)),
    "wrapped": (Wrapped(), X),
    "shared": (Shared(), X),
    "scanned": (Scanned(), X),
}
LOOP_FREE = ["mlp", "cnn", "attention", "wrapped", "shared"]


def forward(model):
    return lambda variables, x: model.apply(variables, x)


def loss_vjp(model):
    def vjp(variables, x):
        out, pullback = jax.vjp(lambda v, x: model.apply(v, x), variables, x)
        return out, pullback(jnp.ones(out.shape, out.dtype))

    return vjp


# --- invariants ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(MODELS), ids=str)
def summarised(request):
    model, x = MODELS[request.param]
    variables = jax.eval_shape(model.init, KEY, x)
    return request.param, model, x, variables, wrapkit.summary(model, x, vjp=True)


def test_own_flops_add_up_to_the_root_total_which_is_the_counters(summarised):
    _, model, x, variables, table = summarised
    assert sum(row.own_flops for row in table.rows) == table.root.flops == table.flops
    assert sum(row.own_transcendentals for row in table.rows) == table.transcendentals
    assert table.flops == wrapkit.flops.count(forward(model), variables, x).flops
    assert sum(row.own_vjp_flops for row in table.rows) == table.root.vjp_flops
    assert table.vjp_flops == table.root.vjp_flops


def test_no_child_exceeds_its_parent(summarised):
    table = summarised[-1]
    for row in table.rows:
        for child in (table.rows[index] for index in row.children):
            assert child.parent == row.index and child.depth == row.depth + 1
            assert child.flops <= row.flops
            assert child.vjp_flops <= row.vjp_flops
            assert child.transcendentals <= row.transcendentals


def test_vjp_total_is_the_counters_on_the_models_own_vjp(summarised):
    _, model, x, variables, table = summarised
    cotangent = jax.eval_shape(forward(model), variables, x)
    program = vjp_with_cotangent(model)
    assert table.vjp_flops == wrapkit.flops.count(program, variables, x, cotangent).flops


@pytest.mark.parametrize("name", LOOP_FREE)
def test_loop_free_totals_match_xla_cost_analysis(name):
    model, x = MODELS[name]
    variables = jax.eval_shape(model.init, KEY, x)
    table = wrapkit.summary(model, x, variables=variables, vjp=True)
    assert table.flops == pytest.approx(xla_flops(forward(model), variables, x), rel=0.01)
    cotangent = jax.eval_shape(forward(model), variables, x)
    program = vjp_with_cotangent(model)
    assert table.vjp_flops == pytest.approx(xla_flops(program, variables, x, cotangent), rel=0.01)


def test_variables_per_row_and_totals_match_the_variable_tree():
    model, x = MODELS["cnn"]
    variables = jax.eval_shape(model.init, KEY, x)
    table = wrapkit.summary(model, x)
    for collection, tree in variables.items():
        leaves = jax.tree_util.tree_leaves(tree)
        count = sum(int(np.prod(leaf.shape)) for leaf in leaves)
        assert table.variables[collection].count == count
        assert table.variables[collection].bytes == 4 * count
        assert (
            sum(
                row.variables[collection].count
                for row in table.rows
                if collection in row.variables and not row.repeated
            )
            == count
        )
    (batch_norm,) = table.find("BatchNorm_0")
    assert batch_norm.variables["batch_stats"].count == 16  # mean and var of 8 features
    assert batch_norm.variables["params"].count == 16  # scale and bias


def test_rows_record_paths_types_methods_and_shapes():
    table = wrapkit.summary(MLP(), X)
    assert [(row.name, row.module_type, row.method, row.depth) for row in table] == [
        ("", "MLP", "__call__", 0),
        ("Dense_0", "Dense", "__call__", 1),
        ("LayerNorm_0", "LayerNorm", "__call__", 1),
        ("Dense_1", "Dense", "__call__", 1),
    ]
    dense = table.rows[1]
    assert dense.inputs == ((X,), {})
    assert dense.outputs == jax.ShapeDtypeStruct((8, 32), jnp.float32)
    # Dense(32) on 8x16: 2*8*16*32 multiply-add FLOPs, 8*32 bias additions.
    assert dense.own_flops == 2 * 8 * 16 * 32 + 8 * 32


# --- wrappers -----------------------------------------------------------------------------


def test_wrapper_rows_hold_the_transform_and_the_inner_call_is_their_child():
    table = wrapkit.summary(Wrapped(), X, vjp=True)
    wrapkit_wn, flax_wn, outer, spectral = (
        table.find("WeightNorm_0")[0],
        table.find("WeightNorm_1")[0],
        table.find("WeightNorm_2")[0],
        table.find("SpectralNorm_0")[0],
    )
    for wrapper, inner_path, fan_in in [(wrapkit_wn, "Dense_0", 16), (flax_wn, "Dense_1", 32)]:
        assert wrapper.wrapper and wrapper.own_flops > 0
        (child,) = (table.rows[index] for index in wrapper.children)
        assert (child.name, child.module_type, child.method) == (inner_path, "Dense", "__call__")
        assert child.own_flops == 2 * 8 * fan_in * 32 + 8 * 32
    assert "layer_forward" not in {row.method for row in table}
    # A stack: each transform on its own wrapper's row, the matmul on the Dense row.
    assert [table.rows[index].name for index in outer.children] == ["SpectralNorm_0"]
    assert [table.rows[index].name for index in spectral.children] == ["Dense_2"]
    assert outer.own_flops > 0 and spectral.own_flops > outer.own_flops  # power iteration


def test_weight_norm_row_costs_the_normalisation_of_its_kernel():
    table = wrapkit.summary(WeightNorm(nn.Dense(32)), X)
    kernel = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    scale = jax.ShapeDtypeStruct((32,), jnp.float32)

    def normalise(kernel, scale):
        return kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0) + 1e-12) * scale

    expected = wrapkit.flops.count(normalise, kernel, scale)
    assert table.root.own_flops == expected.flops
    assert table.root.own_transcendentals == expected.transcendentals == 32


def test_delegated_method_names_the_inner_row():
    class AutoEncoder(nn.Module):
        def setup(self):
            self.enc = nn.Dense(4)
            self.dec = nn.Dense(16)

        def encode(self, x):
            return self.enc(x)

        def __call__(self, x):
            return self.dec(self.encode(x))

    wrapped = WeightNorm(AutoEncoder(), delegates=("encode",))
    table = wrapkit.summary(wrapped, X, method="encode")
    assert [(row.module_type, row.method, row.depth) for row in table] == [
        ("WeightNorm", "encode", 0),
        ("AutoEncoder", "encode", 1),
        ("Dense", "__call__", 2),
    ]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            autoencoder = WeightNorm(AutoEncoder(), delegates=("encode", "__call__"))
            return autoencoder(x) + autoencoder.encode(x).sum()

    table = wrapkit.summary(Model(), X)
    # AutoEncoder.__call__ calls self.encode: a helper, part of its caller's row. Delegated
    # calls (the wrapper's encode, and through it the inner module's) keep theirs.
    assert [(row.name, row.method, row.depth, row.repeated) for row in table] == [
        ("", "__call__", 0, False),
        ("WeightNorm_0", "__call__", 1, False),
        ("AutoEncoder_0", "__call__", 2, False),
        ("AutoEncoder_0/enc", "__call__", 3, False),
        ("AutoEncoder_0/dec", "__call__", 3, False),
        ("WeightNorm_0", "encode", 1, True),
        ("AutoEncoder_0", "encode", 2, True),
        ("AutoEncoder_0/enc", "__call__", 3, True),
    ]
    table = wrapkit.summary(Model(), X, helpers=True)
    assert [(row.name, row.method, row.depth, row.repeated) for row in table] == [
        ("", "__call__", 0, False),
        ("WeightNorm_0", "__call__", 1, False),
        ("AutoEncoder_0", "__call__", 2, False),
        ("AutoEncoder_0", "encode", 3, True),
        ("AutoEncoder_0/enc", "__call__", 4, False),
        ("AutoEncoder_0/dec", "__call__", 3, False),
        ("WeightNorm_0", "encode", 1, True),
        ("AutoEncoder_0", "encode", 2, True),
        ("AutoEncoder_0/enc", "__call__", 3, True),
    ]


class Pair(nn.Module):
    def setup(self):
        self.first = nn.Dense(16)
        self.second = nn.Dense(16)

    def __call__(self, x):
        return self.second(self.first(x))

    def half(self, x):
        return self.first(x) / 2


def test_setup_is_not_a_row_and_the_root_is_the_call():
    table = wrapkit.summary(Pair(), X)
    assert [(row.name, row.method, row.depth, row.repeated) for row in table] == [
        ("", "__call__", 0, False),
        ("first", "__call__", 1, False),
        ("second", "__call__", 1, False),
    ]


def test_a_method_function_calling_several_methods_gets_one_row_above_them():
    def both(module, x):
        return module(x) + module.half(x)

    table = wrapkit.summary(Pair(), X, method=both)
    assert [(row.name, row.method, row.depth, row.repeated) for row in table] == [
        ("", "both", 0, False),
        ("", "__call__", 1, False),
        ("first", "__call__", 2, False),
        ("second", "__call__", 2, False),
        ("", "half", 1, True),
        ("first", "__call__", 2, True),
    ]
    dense = 2 * 8 * 16 * 16 + 8 * 16
    assert table.root.own_flops == 8 * 16  # the addition in ``both``
    assert table.rows[4].own_flops == 8 * 16  # the division in ``half``
    assert table.flops == 3 * dense + 2 * 8 * 16
    assert table.root.variables == {} and table.subtree_variables(table.root)["params"].count == (
        2 * (16 * 16 + 16)
    )


# --- flax's failures, each a regression test ----------------------------------------------


def test_flax_layer_forward__wrapped_layers_summarise_with_flops_and_real_rows():
    """flax 3735: tabulate(compute_flops=True) crashed on WeightNorm, then hid the row."""
    model = nn.WeightNorm(nn.Conv(4, (3, 3)))
    table = wrapkit.summary(model, jax.ShapeDtypeStruct((1, 6, 6, 2), jnp.float32), vjp=True)
    assert [(row.name, row.module_type, row.method) for row in table] == [
        ("", "WeightNorm", "__call__"),
        ("layer_instance", "Conv", "__call__"),  # the field holding it: its real path
    ]
    assert table.rows[1].flops > 0 and table.rows[1].vjp_flops > 0


def test_flax_counts_a_scan_body_once__summary_counts_body_times_length():
    scanned = wrapkit.summary(Scanned(length=10), X)
    unrolled = wrapkit.summary(Unrolled(length=10), X)
    assert scanned.flops == unrolled.flops
    (body,) = scanned.find("Dense_0")
    step = 2 * 8 * 16 * 16 + 8 * 16  # one Dense(16) on 8x16
    assert body.flops == 10 * step
    # XLA's cost analysis (flax's source) counts the body once.
    variables = jax.eval_shape(Scanned(length=10).init, KEY, X)
    assert xla_flops(forward(Scanned(length=10)), variables, X) < scanned.flops / 5


def test_flax_shows_one_slice_of_vmap__summary_counts_the_batch():
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(
                nn.Dense,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                axis_size=5,
            )
            return dense(4)(x)

    table = wrapkit.summary(Ensemble(), X)
    (member,) = [row for row in table if row.module_type == "Dense"]
    assert member.flops == 5 * (2 * 8 * 16 * 4 + 8 * 4)


def test_flax_hides_repeated_calls__gpt2_tied_attend_has_its_row_and_flops():
    gpt2 = load_example("gpt2.py")
    model = gpt2.gpt2_tiny()
    config = model.config
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    table = wrapkit.summary(model, tokens, vjp=True)
    (attend,) = table.find("wte", "attend")
    assert attend.repeated and attend.parent == 0
    assert attend.flops == 2 * 2 * 16 * config.d_model * config.vocab_size
    variables = jax.eval_shape(model.init, KEY, tokens)
    assert table.flops == wrapkit.flops.count(forward(model), variables, tokens).flops
    assert table.flops == pytest.approx(xla_flops(forward(model), variables, tokens), rel=0.01)


def test_flax_child_backward_above_parent__vjp_shares_nest():
    """flax differentiates each call on its own: here Mix's VJP (1.6M) above its parent's (0).

    The parent's output does not depend on any variable (stop_gradient), so its VJP needs
    no backward pass at all; wrapkit's shares of the one VJP show exactly that.
    """

    class Mix(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(x @ x.T).sum()

    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Mix()(jax.lax.stop_gradient(nn.Dense(64)(x)))

    table = wrapkit.summary(Parent(), jax.ShapeDtypeStruct((64, 8), jnp.float32), vjp=True)
    assert table.vjp_flops == table.flops  # the forward pass, and no backward
    for row in table:
        assert row.own_vjp_flops == row.own_flops
        for index in row.children:
            assert table.rows[index].vjp_flops <= row.vjp_flops
    gpt2 = load_example("gpt2.py")
    table = wrapkit.summary(gpt2.gpt2_tiny(), jax.ShapeDtypeStruct((2, 16), jnp.int32), vjp=True)
    for row in table:
        for index in row.children:
            assert table.rows[index].vjp_flops <= row.vjp_flops


def test_flax_rejects_abstract_inputs__summary_takes_shape_dtype_structs():
    model = CNN()
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(KEY, x)
    concrete = wrapkit.summary(model, x, variables=variables, rngs=KEY, vjp=True)
    abstract = wrapkit.summary(
        model,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        variables=jax.eval_shape(lambda: variables),
        vjp=True,
    )
    assert concrete.to_dict() == abstract.to_dict()


# --- lifted transforms --------------------------------------------------------------------


def test_remat_recomputation_shows_in_the_vjp_only():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(jnp.tanh(nn.Dense(16)(x)))

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Block()(x)

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(Block)()(x)

    plain = wrapkit.summary(Plain(), X, vjp=True)
    remat = wrapkit.summary(Remat(), X, vjp=True)
    assert remat.flops == plain.flops
    # The backward pass recomputes the first Dense and the tanh (not the last Dense).
    recomputed = 2 * 8 * 16 * 16 + 8 * 16
    assert remat.vjp_flops == plain.vjp_flops + recomputed


def test_jit_inside_the_model_is_traced_through():
    class Jitted(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.jit(nn.Dense)(16)(x)
            return jax.jit(lambda y: y @ y.T)(x)

    table = wrapkit.summary(Jitted(), X)
    (dense,) = [row for row in table if row.module_type == "Dense"]
    assert dense.own_flops == 2 * 8 * 16 * 16 + 8 * 16
    assert table.root.own_flops == 2 * 8 * 8 * 16


# --- options ------------------------------------------------------------------------------


def test_rngs_are_optional_and_values_do_not_matter():
    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(nn.Dense(16)(x))

    default = wrapkit.summary(Noisy(), X)
    given = wrapkit.summary(Noisy(), X, rngs={"params": KEY, "dropout": jax.random.key(1)})
    assert default.flops == given.flops > 0


def test_method_kwargs_and_mutable_reach_the_module():
    model, x = MODELS["cnn"]
    evaluating = wrapkit.summary(model, x, train=False)
    training = wrapkit.summary(model, x, train=True, mutable=["batch_stats"])
    assert training.flops > evaluating.flops  # batch statistics are computed
    with pytest.raises(ValueError, match=r"BatchNorm at path 'BatchNorm_0'"):
        wrapkit.summary(model, x, train=True)  # batch_stats is not mutable


def test_queries_by_module_and_primitive():
    table = wrapkit.summary(Shared(), X, vjp=True)
    assert len(table.find("Dense_0")) == 2
    assert table.find("Dense_0")[1].repeated and not table.find("Dense_0")[0].repeated
    assert table.by_module()["Dense_0"] == 2 * (2 * 8 * 16 * 16 + 8 * 16)
    assert sum(table.by_module(vjp=True).values()) == table.vjp_flops
    assert table.by_primitive()["dot_general"].flops == 2 * (2 * 8 * 16 * 16)
    assert json.loads(table.to_json())["rows"][1]["inputs"] == [["float32[8, 16]"], {}]
    with pytest.raises(ValueError, match=r"no VJP FLOPs\. Make it with"):
        wrapkit.summary(Shared(), X).by_module(vjp=True)


def test_abstract_summary_of_a_model_far_larger_than_memory():
    class Huge(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(200_000)(nn.Dense(200_000)(x))  # 40e9 params: 160 GB

    table = wrapkit.summary(Huge(), jax.ShapeDtypeStruct((1, 200_000), jnp.float32), vjp=True)
    assert table.variables["params"].count == 2 * (200_000 * 200_000 + 200_000)
    assert table.flops == 2 * (2 * 200_000 * 200_000 + 200_000)


# --- errors -------------------------------------------------------------------------------


def test_wrong_input_shape_names_the_module_where_the_trace_failed():
    variables = jax.eval_shape(MLP().init, KEY, X)
    with pytest.raises(ValueError, match=r"in Dense at path 'Dense_0' \(__call__\)"):
        wrapkit.summary(MLP(), jax.ShapeDtypeStruct((8, 5), jnp.float32), variables=variables)


def test_wrong_input_dtype_names_the_module_too():
    gpt2 = load_example("gpt2.py")
    with pytest.raises(
        ValueError,
        match=r"in Embed at path 'wte' \(__call__\) with inputs \[\['float32\[2, 16\]'\], "
        r"\{\}\]: ValueError: Input type must be an integer",
    ):
        wrapkit.summary(gpt2.gpt2_tiny(), jax.ShapeDtypeStruct((2, 16), jnp.float32))


def test_a_failure_while_initialising_names_the_module_too():
    class Fold(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x.reshape((7, -1)))  # 8 rows do not fold into 7

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Fold()(nn.Dense(16)(x))

    with pytest.raises(
        ValueError,
        match=r"failed while initialising Model, in Fold at path 'Fold_0' \(__call__\) with "
        r"inputs \[\['float32\[8, 16\]'\], \{\}\]: TypeError",
    ):
        wrapkit.summary(Model(), X)


class Loops(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        q, _ = jnp.linalg.qr(x)  # no FLOP rule for qr
        steps = 2 + jnp.int32(x[0, 0] > 0)  # known only at run time: a while loop
        x = jax.lax.fori_loop(0, steps, lambda i, y: jnp.tanh(y), q)
        return jax.lax.cond(x.sum() > 0, lambda: x * 2, lambda: jnp.exp(x))


def test_unsupported_primitives_while_loops_and_branches_are_reported():
    with pytest.warns(
        wrapkit.flops.UnsupportedPrimitiveWarning,
        match=r"No FLOP rule for primitive\(s\) qr; wrapkit\.summary counted them as 0 and "
        r"lists them in Summary\.unsupported\. Add a rule with "
        r"@wrapkit\.flops\.register_rule\('qr'\)",
    ) as caught:
        table = wrapkit.summary(Loops(), jax.ShapeDtypeStruct((8, 8), jnp.float32))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert table.unsupported == ("qr",)
    assert table.lower_bound and table.branches == 1
    notes = table.to_markdown()
    assert "not counted: qr" in notes and "a while loop was counted once" in notes


def test_one_warning_for_the_forward_pass_and_the_vjp_together():
    class Solve(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.linalg.qr(nn.Dense(8)(x))[0]

    with pytest.warns(wrapkit.flops.UnsupportedPrimitiveWarning) as caught:
        table = wrapkit.summary(Solve(), jax.ShapeDtypeStruct((8, 8), jnp.float32), vjp=True)
    assert len(caught) == 1 and "qr" in table.unsupported


def test_a_model_that_cannot_be_differentiated_says_so():
    with pytest.raises(
        ValueError,
        match=r"traced Loops, but not its VJP: .*\nSummarise without vjp=True to count the "
        r"forward pass only\.",
    ):
        wrapkit.summary(Loops(), jax.ShapeDtypeStruct((8, 8), jnp.float32), vjp=True)


def test_not_a_linen_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"expects a flax\.linen\.Module, got function"):
        wrapkit.summary(lambda x: x, X)


def test_scanned_layers_count_like_the_loop_and_earlier_traces_get_no_rows():
    gpt2 = load_example("gpt2.py")
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    config = dict(n_layer=3, d_model=64, n_head=4, vocab_size=256)
    looped = wrapkit.summary(gpt2.gpt2(**config), tokens)
    scanned = wrapkit.summary(gpt2.gpt2(scan_layers=True, **config), tokens)
    assert scanned.flops == looped.flops
    (layers,) = scanned.find("h")  # nn.scan traces its body twice; one row
    assert layers.flops == sum(looped.find(f"h_{i}")[0].flops for i in range(3))
    assert not any(row.repeated for row in scanned if row.name.startswith("h"))


def test_vjp_differentiates_the_output_not_the_returned_variables():
    model, x = MODELS["mlp"]
    plain = wrapkit.summary(model, x, vjp=True)
    mutable = wrapkit.summary(model, x, vjp=True, mutable=nn.DenyList("intermediates"))
    assert mutable.vjp_flops == plain.vjp_flops


@pytest.mark.parametrize("enabled", [True, False], ids=["gc-on", "gc-off"])
def test_the_garbage_collector_is_restored_even_after_an_error(enabled):
    variables = jax.eval_shape(MLP().init, KEY, X)
    (gc.enable if enabled else gc.disable)()
    try:
        wrapkit.summary(MLP(), X)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            wrapkit.summary(MLP(), jax.ShapeDtypeStruct((8, 5), jnp.float32), variables=variables)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


# --- engine failures, each a regression test ----------------------------------------------


def vjp_with_cotangent(model):
    """The model's forward outputs and its VJP, the cotangent an argument of the program."""

    def program(variables, x, cotangent):
        out, pullback = jax.vjp(lambda v, x: model.apply(v, x), variables, x)
        return out, pullback(cotangent)

    return program


class SoftCap(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(512)(x) / 30) * 30  # a logit soft-cap


def test_vjp_counts_cotangents_as_inputs__a_soft_cap_keeps_its_backward():
    """With the pullback applied to constant ones, ``ct * 30`` and ``/ 30`` were folded away."""
    model, x = SoftCap(), X
    variables = jax.eval_shape(model.init, KEY, x)
    cotangent = jax.ShapeDtypeStruct((8, 512), jnp.float32)
    table = wrapkit.summary(model, x, vjp=True)
    program = vjp_with_cotangent(model)
    assert table.vjp_flops == wrapkit.flops.count(program, variables, x, cotangent).flops
    assert table.vjp_flops == pytest.approx(xla_flops(program, variables, x, cotangent), rel=0.01)
    assert sum(row.own_vjp_flops for row in table) == table.vjp_flops
    # The soft-cap's backward is the root's own: ct * 30, jax's tanh' = (1 + t)(1 - t) as
    # ct + ct * t times 1 - t (a subtraction, a product, a sum, a product), then / 30.
    assert table.root.own_vjp_flops - table.root.own_flops == 6 * 8 * 512
    # Ones as the cotangent fold most of that away.
    assert wrapkit.flops.count(loss_vjp(model), variables, x).flops < table.vjp_flops


class Forwarding(nn.Module):
    """Forwards unknown attributes to a config it does not have, as model libraries do."""

    @nn.compact
    def __call__(self, x):
        return self.project(x)

    def project(self, x):
        return nn.Dense(4)(x)

    def __getattr__(self, name):
        return getattr(self.config, name)  # no ``config``: would recurse without end


def test_a_module_with_getattr_is_never_probed_through_it():
    """is_wrapper's isinstance check and getattr probes re-entered __getattr__: RecursionError."""
    table = wrapkit.summary(WeightNorm(Forwarding(), delegates=("__call__",)), X, vjp=True)
    assert [(row.name, row.module_type, row.method) for row in table] == [
        ("", "WeightNorm", "__call__"),
        ("layer_instance", "Forwarding", "__call__"),
        ("layer_instance/Dense_0", "Dense", "__call__"),
    ]
    assert table.flops == table.rows[1].flops + table.root.own_flops


def test_a_forward_failure_with_vjp_is_not_blamed_on_the_vjp():
    def fold(module, x):
        return module(x).reshape((7, -1))  # outside any module call

    variables = jax.eval_shape(MLP().init, KEY, X)
    with pytest.raises(
        ValueError, match=r"failed while applying MLP, in MLP: TypeError: cannot reshape"
    ):
        wrapkit.summary(MLP(), X, method=fold, vjp=True, variables=variables)
    with pytest.raises(ValueError, match=r"failed while applying MLP, in Dense at path 'Dense_0'"):
        wrapkit.summary(
            MLP(),
            jax.ShapeDtypeStruct((8, 5), jnp.float32),
            vjp=True,
            variables=jax.eval_shape(MLP().init, KEY, X),
        )


def test_a_failure_in_wrapkits_own_recording_says_so(monkeypatch):
    from wrapkit._summary import capture_linen

    def broken(cls, name):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(capture_linen, "_is_method", broken)
    with pytest.raises(
        ValueError,
        match=r"failed while recording the call MLP\.__call__ of MLP, before the call ran: "
        r"RuntimeError: probe failed\nThis is an error in wrapkit, not in the model",
    ):
        wrapkit.summary(MLP(), X, vjp=True, variables=jax.eval_shape(MLP().init, KEY, X))


def test_errors_that_are_not_about_shapes_do_not_blame_the_shapes():
    model, x = MODELS["cnn"]
    with pytest.raises(ValueError, match=r"BatchNorm at path 'BatchNorm_0'") as caught:
        wrapkit.summary(model, x, train=True)  # batch_stats is not mutable
    assert "Check the input shapes" not in str(caught.value)


def test_rngs_without_params_still_initialise():
    """rngs={"dropout": key} failed with "needs PRNG for params", blamed on input shapes."""

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(nn.Dense(16)(x))

    given = wrapkit.summary(Noisy(), X, rngs={"dropout": jax.random.key(1)})
    assert given.flops == wrapkit.summary(Noisy(), X).flops
    assert given.variables["params"].count == 16 * 16 + 16


class Tied(nn.Module):
    def setup(self):
        self.wte = nn.Embed(10, 4)
        self.lm_head = nn.Dense(10, use_bias=False)

    def __call__(self, ids):
        hidden = self.wte(ids)
        kernel = self.wte.variables["params"]["embedding"].T
        return self.lm_head.apply({"params": {"kernel": kernel}}, hidden)


class TiedInside(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return Tied(name="lm")(ids)


def test_a_nested_apply_has_the_callers_path_and_its_own_variables():
    """A tied LM head's ``lm_head.apply(...)`` got the root's path "" and the root's variables."""
    ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    for model, prefix in [(Tied(), ()), (TiedInside(), ("lm",))]:
        table = wrapkit.summary(model, ids, vjp=True)
        (head,) = table.find((*prefix, "lm_head"))
        assert head.nested and not head.repeated and head.module_type == "Dense"
        assert head.variables["params"] == wrapkit.VariableStats(10 * 4, 4 * 10 * 4)
        assert head.own_flops == head.flops == 2 * 2 * 3 * 4 * 10
        assert not any(row.nested for row in table if row is not head)
        variables = jax.eval_shape(model.init, KEY, ids)
        assert table.flops == wrapkit.flops.count(forward(model), variables, ids).flops
        assert sum(row.own_vjp_flops for row in table) == table.vjp_flops


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return self.merge_heads(nn.Dense(16)(self.split_heads(x)))

    def split_heads(self, x):
        return x.reshape((*x.shape[:-1], 4, -1)) * 2

    def merge_heads(self, x):
        return x.reshape((*x.shape[:-2], -1))


def test_helper_methods_a_module_calls_on_itself_fold_into_its_row():
    table = wrapkit.summary(Heads(), X)
    assert [(row.name, row.method) for row in table] == [("", "__call__"), ("Dense_0", "__call__")]
    assert table.root.own_flops == 8 * 16  # the * 2 in split_heads
    shown = wrapkit.summary(Heads(), X, helpers=True)
    assert [(row.name, row.method, row.depth) for row in shown] == [
        ("", "__call__", 0),
        ("", "split_heads", 1),
        ("Dense_0", "__call__", 1),
        ("", "merge_heads", 1),
    ]
    assert shown.rows[1].own_flops == 8 * 16 and shown.flops == table.flops


class E(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


class JitDecorated(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


LIFTED = {
    "jit-class": lambda: nn.jit(E)(),
    "remat-class": lambda: nn.remat(E)(),
    "checkpoint-class": lambda: nn.checkpoint(E)(),
    "jit-decorator": lambda: JitDecorated(),
}


@pytest.mark.parametrize("make", LIFTED.values(), ids=LIFTED.keys())
def test_a_lifted_call_is_one_row(make):
    table = wrapkit.summary(make(), X, vjp=True)
    assert [(row.name, row.method, row.depth) for row in table] == [
        ("", "__call__", 0),
        ("Dense_0", "__call__", 1),
    ]
    assert table.rows[1].own_flops == 2 * 8 * 16 * 4 + 8 * 4


class JitMethodBlock(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.Dense(4)(x))


class JitMethodTop(nn.Module):
    @nn.compact
    def __call__(self, x):
        return JitMethodBlock()(x)


@pytest.mark.parametrize("vjp", [False, True])
def test_a_repeated_summary_of_an_nn_jit_method_has_the_same_rows(vjp):
    """nn.jit keeps the body it traced; a second summary used to get it from the cache, with
    no calls recorded inside (only the root row) and the markers of the first summary."""
    first, second = (wrapkit.summary(JitMethodTop(), X, vjp=vjp) for _ in range(2))
    rows = [(row.name, row.own_flops, row.own_vjp_flops) for row in first]
    assert [name for name, _, _ in rows] == [
        "",
        "JitMethodBlock_0",
        "JitMethodBlock_0/Dense_1",
        "JitMethodBlock_0/Dense_0",
    ]
    assert [(row.name, row.own_flops, row.own_vjp_flops) for row in second] == rows


class TrainDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=False)(nn.Dense(16)(x))


class FixedMask(nn.Module):
    @nn.compact
    def __call__(self, x, keep):
        y = nn.Dense(16)(x)
        return jax.lax.select(keep, y / 0.5, jnp.zeros_like(y))


def test_dropout_bits_are_rng_bits_not_flops():
    """Dropout's threefry hash counted as FLOPs: 117 per 32-bit word, as much as the model."""
    table = wrapkit.summary(TrainDropout(), X)
    keep = jax.ShapeDtypeStruct((8, 16), jnp.bool_)
    fixed = wrapkit.summary(FixedMask(), X, keep)
    n = 8 * 16
    # The mask from the bits: jax.random.uniform's shift, or, bitcast, subtraction, scaling,
    # offset and clamp (7 per element, and one scalar subtraction for the range), then the
    # comparison with the keep rate.
    assert table.flops == fixed.flops + 7 * n + 1 + n
    # 32 random bits per mask element, and the 64 bits of the key flax folds the stream into.
    assert table.rng_bits == table.root.rng_bits == 32 * n + 64
    (dropout,) = table.find("Dropout_0")
    assert dropout.own_rng_bits == 32 * n + 64 and table.rows[1].rng_bits == 0
    assert table.by_primitive()["random_bits"] == wrapkit.flops.Cost(rng_bits=32 * n)
    assert "threefry2x32" not in table.primitives


def test_own_init_skips_flaxs_repeated_initialiser_trace_and_leaves_flax_unchanged():
    """flax's Scope.param re-traces each existing parameter's initialiser to check its shape;
    with variables wrapkit made itself from the same call, the shapes are known to match."""
    from flax.core.scope import Scope

    calls = []

    def counting_init(key, shape, dtype=jnp.float32):
        calls.append(shape)
        return jnp.zeros(shape, dtype)

    param = Scope.param
    wrapkit.summary(nn.Dense(4, kernel_init=counting_init), X, vjp=True)
    assert calls == [(16, 4)]  # once, by the abstract init; flax's check would add one
    assert Scope.param is param  # the class is never changed

    # Variables given by the user keep flax's check, and its error.
    wrong = {"params": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}
    with pytest.raises(ValueError, match=r"ScopeParamShapeError"):
        wrapkit.summary(nn.Dense(4), X, variables=wrong)
