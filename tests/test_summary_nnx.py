"""wrapkit.summary of flax.nnx modules: the NNX front end, its invariants, Linen twins."""

from __future__ import annotations

import ast
import inspect
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wrapkit
from wrapkit._summary import capture_nnx
from wrapkit._summary.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
X = jax.ShapeDtypeStruct((4, 3), jnp.float32)
IMAGES = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(5)(x.mean(axis=(1, 2)))


class Block(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(2, width, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + self.attn(x))


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(8, rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Twice(nnx.Module):
    """One Linear called twice and shared under a second name, and a Dropout."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.alias = self.lin
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.alias(self.lin(self.lin(x))))


def abstract(factory):
    return nnx.eval_shape(lambda: factory(nnx.Rngs(0)))


def call_flops(model, *args, **kwargs):
    """wrapkit.flops.count of the whole call, through nnx.split / nnx.merge: its output and
    the state it leaves (BatchNorm's statistics ...)."""
    graphdef, state = nnx.split(model)

    def call(state, args):
        merged = nnx.merge(graphdef, state)
        return merged(*args, **kwargs), nnx.state(merged)

    return wrapkit.flops.count(call, state, args)


def host_values(tree):
    """Every leaf as a numpy array, PRNG keys as their key data."""

    def value(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf)

    return jax.tree_util.tree_leaves(jax.tree_util.tree_map(value, tree))


def class_attributes(*classes):
    return {cls: dict(vars(cls)) for cls in classes}


# --- the engine is framework-neutral ----------------------------------------------------


def test_the_engine_imports_neither_linen_nor_nnx():
    tree = ast.parse((ROOT / "wrapkit" / "_summary" / "engine.py").read_text())
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.startswith("flax")]


# --- rows, paths, variables ---------------------------------------------------------------


def test_rows_have_nnx_attribute_paths():
    x = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    table = wrapkit.summary(abstract(Stack), x)
    names = [row.name for row in table]
    assert names[:3] == ["", "blocks/0", "blocks/0/attn"]
    assert "blocks/1/attn/query" in names
    assert table.find("blocks/0/attn/query")[0].module_type == "LinearGeneral"
    assert table.find("blocks/1/norm")[0].variables["Param"].count == 16


def test_repeated_calls_and_shared_modules_each_get_a_row():
    table = wrapkit.summary(Twice(nnx.Rngs(0)), X)
    lin = [row for row in table if row.module_type == "Linear"]
    # A shared module has one path, the first nnx.iter_modules gives; every call is a row.
    first = next(path for path, module in nnx.iter_modules(Twice(nnx.Rngs(0))) if path)
    assert first == ("alias",)
    assert [(row.name, row.repeated) for row in lin] == [
        ("alias", False),
        ("alias", True),
        ("alias", True),
    ]
    assert lin[0].variables["Param"].count == 12
    assert not lin[1].variables and not lin[2].variables
    assert all(row.flops == lin[0].flops for row in lin)


def test_variables_are_grouped_by_variable_type_with_counts_and_bytes():
    table = wrapkit.summary(Twice(nnx.Rngs(0)), X)
    assert table.collections == ("Param", "RngState")
    assert table.variables["Param"] == wrapkit.VariableStats(12, 48)
    # An RNG stream: its key (8 bytes) and its count (uint32), as nnx.tabulate counts them.
    assert table.variables["RngState"] == wrapkit.VariableStats(2, 12)
    assert table.find("drop")[0].variables["RngState"] == wrapkit.VariableStats(2, 12)
    cnn = wrapkit.summary(abstract(CNN), IMAGES)
    assert cnn.variables["BatchStat"] == wrapkit.VariableStats(8, 32)
    assert cnn.find("bn")[0].variables["BatchStat"].count == 8


def test_own_flops_add_up_to_the_root_which_is_the_whole_calls_count():
    model = abstract(CNN)
    table = wrapkit.summary(model, IMAGES, vjp=True)
    assert sum(row.own_flops for row in table) == table.root.flops == table.flops
    assert sum(row.own_vjp_flops for row in table) == table.root.vjp_flops
    assert table.flops == call_flops(model, IMAGES).flops
    for row in table:
        for child in row.children:
            assert table.rows[child].flops <= row.flops
            assert table.rows[child].vjp_flops <= row.vjp_flops


def test_method_and_keyword_arguments():
    class Coder(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(3, 2, rngs=rngs)
            self.dec = nnx.Linear(2, 3, rngs=rngs)

        def encode(self, x, *, scale=1.0):
            return self.enc(x) * scale

        def __call__(self, x):
            return self.dec(self.encode(x))

    model = abstract(Coder)
    table = wrapkit.summary(model, X, method="encode", scale=2.0)
    assert [(row.name, row.method) for row in table] == [("", "encode"), ("enc", "__call__")]
    assert table.root.inputs == ((X,), {"scale": 2.0})
    # A method the module calls on itself is part of its caller's row, unless helpers=True.
    assert [(row.name, row.method) for row in wrapkit.summary(model, X)] == [
        ("", "__call__"),
        ("enc", "__call__"),
        ("dec", "__call__"),
    ]
    assert "encode" in [row.method for row in wrapkit.summary(model, X, helpers=True)]
    with pytest.raises(TypeError, match=r"Coder has no method 'decode'\. Pass one of: "):
        wrapkit.summary(model, X, method="decode")


def test_linen_only_arguments_are_refused_for_an_nnx_module():
    with pytest.raises(TypeError, match=r"NNX module MLP: variables is Linen's"):
        wrapkit.summary(abstract(MLP), X, variables={})
    with pytest.raises(TypeError, match=r"variables and mutable are Linen's"):
        wrapkit.summary(abstract(MLP), X, variables={}, mutable=True)


# --- nothing runs, nothing changes ----------------------------------------------------------


def test_an_abstract_model_and_abstract_inputs_are_enough():
    model = abstract(CNN)
    assert isinstance(model.conv.kernel.get_value(), jax.ShapeDtypeStruct)
    table = wrapkit.summary(model, IMAGES, vjp=True)
    assert table.root.outputs == jax.ShapeDtypeStruct((2, 5), jnp.float32)


def test_a_concrete_model_is_not_run_and_not_changed():
    ran = []

    class Probe(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            jax.debug.callback(lambda: ran.append(True))
            return self.drop(self.bn(x))

    model = Probe(nnx.Rngs(0))
    before = host_values(nnx.state(model))
    mean = model.bn.mean
    wrapkit.summary(model, jnp.ones((4, 3)), vjp=True)
    assert not ran
    assert model.bn.mean is mean
    after = host_values(nnx.state(model))
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_every_class_is_restored_when_the_model_raises_mid_trace():
    class Broken(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)
            self.block = Block(4, rngs)

        def helper(self, x):
            return x

        def __call__(self, x):
            x = self.fc(x)
            raise RuntimeError("boom in the middle")

    classes = (
        Broken,
        Block,
        nnx.Linear,
        nnx.MultiHeadAttention,
        nnx.LinearGeneral,
        nnx.LayerNorm,
        nnx.Module,
    )
    before = class_attributes(*classes)
    with pytest.raises(
        ValueError,
        match=r"failed while applying Broken, in Broken at path '<root>' \(__call__\) .*"
        r"RuntimeError: boom in the middle",
    ):
        wrapkit.summary(Broken(nnx.Rngs(0)), X, vjp=True)
    assert class_attributes(*classes) == before
    # Inherited methods were put on the class for the trace, and taken off again.
    assert "__call__" not in vars(Block) or vars(Block)["__call__"] is before[Block]["__call__"]


def test_a_failure_inside_a_submodule_names_its_path():
    model = abstract(MLP)
    with pytest.raises(ValueError, match=r"in Linear at path 'fc1' \(__call__\)") as caught:
        wrapkit.summary(model, jax.ShapeDtypeStruct((4, 5), jnp.float32))
    assert "Check the input shapes and dtypes" in str(caught.value)


# --- wrappers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "inner"),
    [
        (
            lambda: nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)),
            "layer_instance",
        ),
        (
            lambda: nnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)),
            "layer_instance",
        ),
        (
            lambda: nnx.LoRA(
                3, 2, 4, base_module=nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)
            ),
            "base_module",
        ),
    ],
    ids=["WeightNorm", "SpectralNorm", "LoRA"],
)
def test_flax_nnx_wrappers_are_registered_and_their_rows_hold_the_transform(make, inner):
    wrapped = make()
    assert wrapkit.is_wrapper(wrapped)
    assert wrapkit.inner(wrapped) is getattr(wrapped, inner)
    assert wrapkit.delegated_methods(wrapped) == ("__call__",)
    table = wrapkit.summary(wrapped, jax.ShapeDtypeStruct((2, 3), jnp.float32), vjp=True)
    root, layer = table.rows
    assert root.wrapper and not layer.wrapper
    assert (layer.name, layer.module_type, layer.parent) == (inner, "Linear", 0)
    assert layer.flops == 56  # the layer's own matmul and bias: 2*2*3*4 + 2*4
    assert root.own_flops > 0  # the transform (normalisation, the low-rank product)


# --- twins ----------------------------------------------------------------------------------


def test_mlp_twins_agree():
    nnx_table = wrapkit.summary(abstract(MLP), X, vjp=True)
    linen_table = wrapkit.summary(LinenMLP(), X, vjp=True)
    assert (nnx_table.flops, nnx_table.vjp_flops) == (linen_table.flops, linen_table.vjp_flops)
    assert nnx_table.variables["Param"] == linen_table.variables["params"]
    assert [row.flops for row in nnx_table] == [row.flops for row in linen_table]


def test_cnn_with_batchnorm_twins_agree_in_training():
    nnx_table = wrapkit.summary(abstract(CNN), IMAGES, vjp=True)
    linen_table = wrapkit.summary(LinenCNN(), IMAGES, train=True, mutable=["batch_stats"], vjp=True)
    assert (nnx_table.flops, nnx_table.vjp_flops) == (linen_table.flops, linen_table.vjp_flops)
    assert nnx_table.variables["Param"] == linen_table.variables["params"]
    assert nnx_table.variables["BatchStat"] == linen_table.variables["batch_stats"]
    # In evaluation the forward passes agree; the VJPs do not, on purpose: Linen's is taken
    # with respect to every floating-point variable (the running statistics too), NNX's
    # with respect to the Params.
    evaluating = abstract(CNN)
    evaluating.eval()
    assert (
        wrapkit.summary(evaluating, IMAGES).flops
        == wrapkit.summary(LinenCNN(), IMAGES, train=False).flops
    )


# --- what nnx.tabulate gets wrong (flax 0.12.8), each a regression test ------------------


def test_multi_head_attention_with_keyword_arguments_and_vjp():
    """nnx.tabulate(compute_vjp_flops=True) passes the call's kwargs to jax.vjp: crash."""
    x = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    table = wrapkit.summary(mha, x, inputs_k=x, vjp=True)
    assert [row.name for row in table] == ["", "query", "key", "value", "out"]
    assert table.vjp_flops > table.flops > 0


def test_concrete_weight_norm_is_summarised():
    """nnx.tabulate raises a KeyError on WeightNorm's array attribute (its scales)."""
    wrapped = nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    table = wrapkit.summary(wrapped, jnp.ones((2, 3)))
    # flax keeps the scales as a plain array, not a Variable: a group of its own.
    assert table.root.variables[capture_nnx.ARRAY_GROUP] == wrapkit.VariableStats(4, 16)


def test_a_model_from_eval_shape_is_summarised():
    """nnx.tabulate needs a concrete model: it runs the model for real."""
    table = wrapkit.summary(abstract(MLP), X, vjp=True)
    assert table.flops == 392


def test_scan_bodies_and_repeated_calls_count_in_full():
    """nnx.tabulate hides a second call's FLOPs; jax.lax.scan bodies count length times."""

    class Scanned(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            def body(x, _):
                return self.lin(x), None

            return jax.lax.scan(body, x, length=5)[0]

    model = abstract(Scanned)
    table = wrapkit.summary(model, X)
    assert table.flops == 5 * (2 * 4 * 3 * 3 + 4 * 3) == call_flops(model, X).flops
    assert table.find("lin")[0].flops == table.flops


# --- wrapkit.nnx.tabulate and the command line ------------------------------------------


def nnx_mlp():
    """A factory for the command line."""
    return MLP(nnx.Rngs(0))


def test_tabulate_has_nnx_tabulates_signature():
    ours = inspect.signature(wrapkit.nnx.tabulate).parameters
    flax = inspect.signature(nnx.tabulate).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in flax.values()
    ]


def test_tabulate_renders_the_summary():
    x = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    console = {"width": 200, "force_terminal": False}
    text = wrapkit.nnx.tabulate(
        abstract(Stack), x, compute_flops=True, compute_vjp_flops=True, console_kwargs=console
    )
    summary = wrapkit.summary(abstract(Stack), x, vjp=True)
    assert "Stack Summary" in text and "blocks/1/attn/query" in text
    assert f"{summary.flops:,}" in text and f"{summary.vjp_flops:,}" in text
    shallow = wrapkit.nnx.tabulate(abstract(Stack), x, depth=1, console_kwargs=console)
    assert "blocks/0 " in shallow and "blocks/0/attn" not in shallow
    # A filtered-out row hides only itself: its callees hang from the nearest kept row.
    no_attention = wrapkit.nnx.tabulate(
        abstract(Stack),
        x,
        row_filter=lambda row: row.module_type != "MultiHeadAttention",
        console_kwargs=console,
    )
    assert "blocks/0/attn/query" in no_attention and "blocks/0/attn " not in no_attention
    with pytest.raises(TypeError, match=r"expects a flax.nnx.Module, got Dense\. For a Linen"):
        wrapkit.nnx.tabulate(nn.Dense(3), x)


def test_the_command_line_takes_a_factory_of_an_nnx_module(capsys):
    code = main(
        ["summary", "test_summary_nnx:nnx_mlp", "--input", "4x3", "--vjp", "--format", "json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["flops"], printed["vjp_flops"]) == (392, 1126)
    assert [row["path"] for row in printed["rows"]] == ["", "fc1", "fc2"]


def test_importing_wrapkit_does_not_import_flax_nnx():
    script = "import sys, wrapkit; print('flax.nnx' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "False"


def test_nnx_own_methods_are_not_recorded_and_a_models_are():
    class Cache(nnx.Module):
        def update(self, x):
            return x

        def __call__(self, x):
            return x

    assert capture_nnx._recorded_methods(Cache) == ["__call__", "update"]
    assert capture_nnx._recorded_methods(nnx.List) == []
    assert "train" not in capture_nnx._recorded_methods(nnx.Linear)


def test_the_nnx_summary_benchmark_runs_quick():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summary_nnx.py"), "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "| nnx.tabulate / wrapkit |" in done.stdout and "llama peak MB" in done.stdout


class NnxGPT2(nnx.Module):
    """examples/gpt2.py's GPT-2 written in NNX, layer for layer (dropout left out: the Linen
    model applies none when deterministic)."""

    def __init__(self, config, rngs: nnx.Rngs):
        self.config = config
        width = config.d_model
        self.wte = nnx.Embed(config.vocab_size, width, rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, width, rngs=rngs)
        self.h = nnx.List([NnxBlock(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))
        for block in self.h:
            x = block(x)
        return self.wte.attend(self.ln_f(x))


class NnxBlock(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        width = config.d_model
        self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = NnxAttention(config, rngs)
        self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.c_fc = nnx.Linear(width, 4 * width, rngs=rngs)
        self.c_proj = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(nnx.gelu(self.c_fc(self.ln_2(x)), approximate=True))


class NnxAttention(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        self.heads = config.n_head
        self.c_attn = nnx.Linear(config.d_model, 3 * config.d_model, rngs=rngs)
        self.c_proj = nnx.Linear(config.d_model, config.d_model, rngs=rngs)

    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.heads
        qkv = self.c_attn(x).reshape(batch, length, 3 * self.heads, head_dim)
        q, k, v = jnp.split(qkv, 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.c_proj(y)


def test_gpt2_twins_with_the_tied_embedding_agree():
    sys.path.insert(0, str(ROOT))
    try:
        from examples import gpt2
    finally:
        sys.path.remove(str(ROOT))
    linen_model = gpt2.gpt2_tiny()
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    linen_table = wrapkit.summary(linen_model, tokens, vjp=True)
    nnx_model = nnx.eval_shape(lambda: NnxGPT2(linen_model.config, nnx.Rngs(0)))
    nnx_table = wrapkit.summary(nnx_model, tokens, vjp=True)
    assert (nnx_table.flops, nnx_table.vjp_flops) == (linen_table.flops, linen_table.vjp_flops)
    assert nnx_table.variables["Param"] == linen_table.variables["params"]
    # The tied head: a second call of wte, with its FLOPs, in both.
    (linen_attend,) = linen_table.find("wte", "attend")
    (nnx_attend,) = nnx_table.find("wte", "attend")
    assert nnx_attend.repeated and nnx_attend.flops == linen_attend.flops > 0


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class Remat(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layer = Layer(rngs)

    def __call__(self, x):
        return nnx.remat(lambda layer, x: layer(x))(self.layer, x)


class Scanned(nnx.Module):
    """Three Layers made with nnx.vmap (parameters stacked) and run with nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Layer(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, layer):
            return layer(x)

        return step(x, self.layers)


class LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return nn.relu(nn.Dense(4, name="lin")(x)), None


class LinenRemat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(LinenLayer)(name="layer")(x)[0]


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return layers(name="layers")(x, None)[0]


@pytest.mark.parametrize(
    ("nnx_model", "linen_model"),
    [(Remat, LinenRemat), (Scanned, LinenScanned)],
    ids=["nnx.remat", "nnx.scan-of-nnx.vmap"],
)
def test_transformed_twins_agree_and_find_their_modules(nnx_model, linen_model):
    x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    nnx_table = wrapkit.summary(abstract(nnx_model), x, vjp=True)
    linen_table = wrapkit.summary(linen_model(), x, vjp=True)
    assert (nnx_table.flops, nnx_table.vjp_flops) == (linen_table.flops, linen_table.vjp_flops)
    assert nnx_table.variables["Param"] == linen_table.variables["params"]
    # Inside a transform NNX calls a copy of the module: the row still has the model's path,
    # and the variables.
    (lin,) = [row for row in nnx_table if row.module_type == "Linear"]
    assert lin.name.endswith("/lin") and lin.variables["Param"] == nnx_table.variables["Param"]


def test_rngs_go_to_the_method_and_are_not_advanced():
    rngs = nnx.Rngs(0)
    count = int(rngs.default.count[...])
    table = wrapkit.summary(nnx.Dropout(0.5), jnp.ones((4, 3)), rngs=rngs)
    assert table.root.inputs[1]["rngs"] is not None and table.rng_bits > 0
    assert int(rngs.default.count[...]) == count


def test_the_command_line_lists_an_nnx_modules_own_methods(capsys):
    code = main(["summary", "test_summary_nnx:nnx_mlp", "--input", "4x3", "--method", "nope"])
    assert code != 0
    assert "MLP has no method 'nope'; pass one of its methods, or leave" in (
        capsys.readouterr().err
    )


# --- wrapkit.nnx wrappers: a view's calls are the wrapped module's rows -------------------


class _Doubled(wrapkit.nnx.Wrapper):
    default_filter = ("kernel",)

    def transform(self, leaf):
        return 2 * leaf.value


def xla_call_flops(model, *args, vjp=False):
    """XLA's cost analysis of the model's call through nnx.split / nnx.merge (the state it
    leaves an output), or with ``vjp`` of that call and its pullback with respect to the
    Params and the inputs, what ``wrapkit.summary(vjp=True)`` counts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def call(params, rest, args):
        # New Variables, of this trace: the call may write to them (statistics).
        merged = nnx.merge(graphdef, params, rest, copy=True)
        return merged(*args), nnx.state(merged)

    def with_pullback(params, rest, args, cotangent):
        output, pullback = jax.vjp(lambda p, a: call(p, rest, a)[0], params, args)
        return output, pullback(cotangent)

    if not vjp:
        return jax.jit(call).lower(params, rest, args).cost_analysis()["flops"]
    cotangent = jax.eval_shape(lambda p, r, a: call(p, r, a)[0], params, rest, args)
    lowered = jax.jit(with_pullback).lower(params, rest, args, cotangent)
    return lowered.cost_analysis()["flops"]


def weight_normalisation(kernel, scale):
    return kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0) + 1e-12) * scale


WRAPKIT_NNX_WRAPPERS = {
    "WeightNorm": wrapkit.nnx.WeightNorm,
    "SpectralNorm": lambda layer: wrapkit.nnx.SpectralNorm(layer, rngs=nnx.Rngs(1)),
    "WeightStandardization": wrapkit.nnx.WeightStandardization,
    "FakeQuant": wrapkit.nnx.FakeQuant,
    "LoRA": lambda layer: wrapkit.nnx.LoRA(layer, rank=2, rngs=nnx.Rngs(1)),
}


@pytest.mark.parametrize("wrapper", list(WRAPKIT_NNX_WRAPPERS))
def test_a_wrapkit_nnx_wrappers_row_holds_its_transform_and_the_inner_module_is_its_child(
    wrapper,
):
    make = WRAPKIT_NNX_WRAPPERS[wrapper]
    model = nnx.eval_shape(lambda: make(nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    table = wrapkit.summary(model, x, vjp=True)
    root, layer = table.rows
    assert (root.module_type, root.wrapper, root.children) == (wrapper, True, (1,))
    assert (layer.name, layer.module_type, layer.parent) == ("layer_instance", "Linear", 0)
    assert layer.flops == 2 * 2 * 3 * 4 + 2 * 4  # the matmul and the bias, nothing else
    assert layer.variables["Param"] == wrapkit.VariableStats(16, 64)
    # The wrapper's own variables (scales, statistics, factors) are on its row.
    own = [
        variable.get_value().size
        for path, variable in nnx.to_flat_state(nnx.state(model))
        if path[0] != "layer_instance"
    ]
    assert sum(stats.count for stats in root.variables.values()) == sum(own)
    # Its transform (for LoRA the adapter's own products) is its own cost.
    assert root.own_flops == table.flops - layer.flops > 0
    assert table.flops == xla_call_flops(model, x)
    assert table.vjp_flops == xla_call_flops(model, x, vjp=True)


def test_a_weight_norm_row_costs_the_normalisation_of_its_kernel():
    table = wrapkit.summary(wrapkit.nnx.WeightNorm(nnx.Linear(3, 32, rngs=nnx.Rngs(0))), X)
    kernel = jax.ShapeDtypeStruct((3, 32), jnp.float32)
    scale = jax.ShapeDtypeStruct((32,), jnp.float32)
    expected = wrapkit.flops.count(weight_normalisation, kernel, scale)
    assert table.root.own_flops == expected.flops
    assert table.root.own_transcendentals == expected.transcendentals == 32
    assert table.root.variables["Param"] == wrapkit.VariableStats(32, 128)


class _WrappedMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = wrapkit.nnx.WeightNorm(nnx.Linear(3, 8, rngs=rngs))
        self.body = wrapkit.nnx.WeightNorm(
            nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 8, rngs=rngs))
        )
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.body(nnx.relu(self.fc1(x))))


def test_the_modules_of_a_view_get_the_wrapped_modules_paths_and_variables():
    model = abstract(_WrappedMLP)
    table = wrapkit.summary(model, X, vjp=True)
    assert [(row.name, row.module_type, row.parent) for row in table] == [
        ("", "_WrappedMLP", None),
        ("fc1", "WeightNorm", 0),
        ("fc1/layer_instance", "Linear", 1),
        ("body", "WeightNorm", 0),
        ("body/layer_instance", "Sequential", 3),
        ("body/layer_instance/layers/0", "Linear", 4),
        ("body/layer_instance/layers/2", "Linear", 4),
        ("fc2", "Linear", 0),
    ]
    assert table.find("body/layer_instance/layers/2")[0].variables["Param"].count == 72
    assert table.find("body")[0].variables["Param"].count == 16  # both scales
    assert sum(row.variables["Param"].count for row in table if "Param" in row.variables) == (
        table.variables["Param"].count
    )
    assert table.flops == xla_call_flops(model, X)
    assert table.vjp_flops == xla_call_flops(model, X, vjp=True)
    text = wrapkit.nnx.tabulate(
        model, X, compute_flops=True, console_kwargs={"width": 200, "force_terminal": False}
    )
    assert "body/layer_instance/layers/0" in text and "(wraps Sequential)" in text


def test_each_wrapper_of_a_stack_gets_its_row_and_its_own_transform():
    model = wrapkit.nnx.WeightNorm(_Doubled(nnx.Linear(3, 32, rngs=nnx.Rngs(0))))
    table = wrapkit.summary(model, X, vjp=True)
    assert [(row.name, row.module_type, row.parent, row.wrapper) for row in table] == [
        ("", "WeightNorm", None, True),
        ("layer_instance", "_Doubled", 0, True),
        ("layer_instance/layer_instance", "Linear", 1, False),
    ]
    kernel = jax.ShapeDtypeStruct((3, 32), jnp.float32)
    scale = jax.ShapeDtypeStruct((32,), jnp.float32)
    outer, doubled, linear = table.rows
    assert outer.own_flops == wrapkit.flops.count(weight_normalisation, kernel, scale).flops
    assert doubled.own_flops == 3 * 32  # one multiplication per weight
    assert linear.own_flops == 2 * 4 * 3 * 32 + 4 * 32
    assert outer.variables["Param"].count == 32 and not doubled.variables
    assert table.flops == xla_call_flops(model, X)
    assert table.vjp_flops == xla_call_flops(model, X, vjp=True)


class _Coder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(3, 2, rngs=rngs)
        self.dec = nnx.Linear(2, 3, rngs=rngs)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_a_delegated_method_other_than_call_is_the_wrappers_row():
    def make(rngs):
        return wrapkit.nnx.WeightNorm(_Coder(rngs), delegates=("__call__", "encode"))

    class Top(nnx.Module):
        def __init__(self, rngs):
            self.coder = make(rngs)

        def __call__(self, x):
            return self.coder.encode(x)

    table = wrapkit.summary(abstract(Top), X)
    assert [(row.name, row.module_type, row.method) for row in table] == [
        ("", "Top", "__call__"),
        ("coder", "WeightNorm", "encode"),
        ("coder/layer_instance", "_Coder", "encode"),
        ("coder/layer_instance/enc", "Linear", "__call__"),
    ]
    coder = table.find("coder")[0]
    assert coder.own_flops > 0 and coder.variables["Param"].count == 5  # both scales
    direct = wrapkit.summary(abstract(make), X, method="encode")
    assert [(row.name, row.method) for row in direct] == [
        ("", "encode"),
        ("layer_instance", "encode"),
        ("layer_instance/enc", "__call__"),
    ]
    assert direct.flops == table.flops
    with pytest.raises(
        TypeError, match=r"WeightNorm has no method 'decode'\. Pass one of: __call__, encode\.$"
    ):
        wrapkit.summary(abstract(make), X, method="decode")
    # The hooks are not module calls, not even with helpers=True.
    assert "transform" not in {
        row.method for row in wrapkit.summary(abstract(make), X, helpers=True)
    }


class _WrappedLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = wrapkit.nnx.WeightNorm(nnx.Linear(4, 4, rngs=rngs))

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class _WrappedScan(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _WrappedLayer(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, layer):
            return nnx.remat(lambda layer, x: layer(x))(layer, x)

        return step(x, self.layers)


def test_wrappers_inside_nnx_scan_and_remat_find_their_rows():
    model = abstract(_WrappedScan)
    x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    table = wrapkit.summary(model, x)
    assert [(row.name, row.module_type) for row in table] == [
        ("", "_WrappedScan"),
        ("layers", "_WrappedLayer"),
        ("layers/lin", "WeightNorm"),
        ("layers/lin/layer_instance", "Linear"),
    ]
    lin = table.find("layers/lin/layer_instance")[0]
    assert lin.variables["Param"].count == 3 * 20 and lin.flops == 3 * (2 * 2 * 4 * 4 + 2 * 4)
    assert table.find("layers/lin")[0].variables["Param"].count == 3 * 4
    # XLA counts a loop's body once; wrapkit.flops counts it length times.
    assert table.flops == call_flops(model, x).flops


def test_summarising_a_wrapped_model_changes_neither_it_nor_the_wrapper_classes():
    model = wrapkit.nnx.WeightNorm(_Doubled(nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
    classes = (wrapkit.nnx.WeightNorm, _Doubled, wrapkit.nnx.Wrapper, nnx.Linear)
    before, state = class_attributes(*classes), host_values(nnx.state(model))
    wrapkit.summary(model, jnp.ones((2, 3)), vjp=True)
    assert class_attributes(*classes) == before
    assert all(
        np.array_equal(a, b) for a, b in zip(host_values(nnx.state(model)), state, strict=True)
    )


def test_an_rnn_of_a_wrapped_cell_has_the_cells_rows_and_the_whole_calls_flops():
    rnn = nnx.eval_shape(
        lambda: nnx.RNN(wrapkit.nnx.WeightNorm(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))))
    )
    xs = jax.ShapeDtypeStruct((2, 5, 3), jnp.float32)
    table = wrapkit.summary(rnn, xs)
    # initialize_carry is not delegated: it runs on a view, as the cell's own row.
    assert [(row.name, row.module_type, row.method) for row in table][:4] == [
        ("", "RNN", "__call__"),
        ("cell/layer_instance", "LSTMCell", "initialize_carry"),
        ("cell", "WeightNorm", "__call__"),
        ("cell/layer_instance", "LSTMCell", "__call__"),
    ]
    assert table.find("cell/layer_instance/hi")[0].variables["Param"].count == 20
    assert table.find("cell")[0].variables["Param"].count == 32  # the eight kernels' scales
    assert table.flops == call_flops(rnn, xs).flops


def test_a_lora_stack_puts_the_adapter_on_the_lora_row_and_the_norm_on_its_own():
    x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    layer = nnx.Linear(3, 4, use_bias=False, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(
        lambda: wrapkit.nnx.LoRA(wrapkit.nnx.WeightNorm(layer), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    )
    table = wrapkit.summary(model, x, vjp=True)
    lora, norm, linear = table.rows
    assert [(row.name, row.module_type, row.parent) for row in table] == [
        ("", "LoRA", None),
        ("layer_instance", "WeightNorm", 0),
        ("layer_instance/layer_instance", "Linear", 1),
    ]
    assert linear.own_flops == 2 * 2 * 3 * 4  # x @ W, W normalised: the base product only
    # The unmerged delta s * (x A) B, s = 2: (2x3)(3x2), (2x2)(2x4), the scale, the sum.
    assert lora.own_flops == 2 * 2 * 3 * 2 + 2 * 2 * 2 * 4 + 2 * 4 + 2 * 4
    kernel, scale = (
        jax.ShapeDtypeStruct((3, 4), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.float32),
    )
    assert norm.own_flops == wrapkit.flops.count(weight_normalisation, kernel, scale).flops
    assert lora.variables["LoRAParam"].count == 3 * 2 + 2 * 4
    assert table.flops == xla_call_flops(model, x)
    assert table.vjp_flops == xla_call_flops(model, x, vjp=True)
