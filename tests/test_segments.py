"""The VJP linearised once per repeated call (``wrapkit/_summary/segments.py``).

Sharing a program between repeated calls must change nothing but the time: every row's
costs, with and without sharing, are equal, and the totals are still the counter's count of
the model's own ``jax.vjp`` and XLA's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.experimental.xla_metadata import set_xla_metadata

import wrapkit
import wrapkit.nnx
from wrapkit._summary import segments
from wrapkit.linen import SpectralNorm, WeightNorm

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = jax.random.key(0)
X = jax.ShapeDtypeStruct((4, 16), jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(32)(x)))


class Block(nn.Module):
    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        dense = WeightNorm(nn.Dense(16)) if self.wrapped else nn.Dense(16)
        y = nn.LayerNorm()(x)
        return x + MLP()(y) + dense(y), jnp.tanh(y).sum()


class Tower(nn.Module):
    """Identical blocks; only the last block's second output is used."""

    depth: int = 4
    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x, aux = Block(self.wrapped)(x)
        return x * aux


class Widths(nn.Module):
    """Blocks that differ in width: nothing to share."""

    @nn.compact
    def __call__(self, x):
        for width in (16, 24, 32):
            y = nn.LayerNorm()(nn.Dense(width)(x))
            x = nn.Dense(width)(nn.relu(y)) + y
        return x


class Pairs(nn.Module):
    """The same block on one argument twice and on two different ones."""

    @nn.compact
    def __call__(self, x):
        y = jnp.tanh(x)
        a = Mix()(x, x)
        b = Mix()(x, y)
        c = Mix()(y, x)
        return a + b + c


class Mix(nn.Module):
    @nn.compact
    def __call__(self, x, y):
        return nn.Dense(16)(x) * nn.Dense(16)(jnp.sin(y)) + nn.LayerNorm()(x + y)


class Noisy(nn.Module):
    """Dropout in each block: each block's random stream is its own."""

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.Dropout(0.1, deterministic=False)(nn.gelu(nn.Dense(16)(x))) + x
        return x


class Normed(nn.Module):
    """BatchNorm updating its statistics in every block: the state is an output too."""

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            y = nn.BatchNorm(use_running_average=False)(nn.Dense(16)(x))
            x = x + nn.Dense(16)(nn.relu(y))
        return x


class Reused(nn.Module):
    """One block instance called three times: the same parameters in each call."""

    @nn.compact
    def __call__(self, x):
        block = MLP()
        for _ in range(3):
            x = nn.LayerNorm()(block(x)) + x
        return x


class Tagged(nn.Module):
    """Two identical blocks, the second traced under XLA metadata if ``tag``."""

    tag: bool = True

    @nn.compact
    def __call__(self, x):
        x = Block()(x)[0]
        with set_xla_metadata(placement="tagged") if self.tag else contextlib.nullcontext():
            return Block()(x)[0]


class Spectral(nn.Module):
    """SpectralNorm'd blocks updating their power-iteration statistics."""

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = x + SpectralNorm(nn.Dense(16))(nn.LayerNorm()(x), update_stats=True)
        return x


def gpt2_tiny():
    spec = importlib.util.spec_from_file_location(
        "example_gpt2_segments", ROOT / "examples" / "gpt2.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.gpt2_tiny()


def rows(table):
    return [
        (
            row.path,
            row.module_type,
            row.method,
            row.own_flops,
            row.own_vjp_flops,
            row.own_transcendentals,
            row.own_rng_bits,
        )
        for row in table
    ]


def summarise(monkeypatch, model, *args, share=True, **kwargs):
    """The summary, and what was shared: how many calls ran a shared program ("calls"), and
    the table of the calls inside them, named relatively ("parts")."""
    found = {"calls": 0}
    replay, groups = segments.replay, segments._groups

    def spy_replay(*replay_args):
        run, parts = replay(*replay_args)
        found["parts"] = parts
        return run, parts

    def spy_groups(*group_args):
        shared = groups(*group_args)
        found["calls"] = sum(len(members) for members in shared)
        return shared

    with monkeypatch.context() as patch:
        patch.setattr(segments, "replay", spy_replay)
        patch.setattr(segments, "_groups", spy_groups)
        if not share:
            patch.setattr(segments, "_MIN_EQUATIONS", 10**9)
        table = wrapkit.summary(model, *args, vjp=True, **kwargs)
    return table, found


def vjp_program(model):
    def program(variables, x, cotangent):
        out, pullback = jax.vjp(lambda v, x: model.apply(v, x), variables, x)
        return out, pullback(cotangent)

    return program


def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


CASES = {
    "tower": (Tower(), X),
    "wrapped tower": (Tower(wrapped=True), X),
    "pairs": (Pairs(), X),
    "reused": (Reused(), X),
    "widths": (Widths(), X),
    "gpt2": (gpt2_tiny(), jax.ShapeDtypeStruct((1, 16), jnp.int32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharing_changes_no_row(monkeypatch, name):
    model, x = CASES[name]
    shared, _ = summarise(monkeypatch, model, x)
    flat, found = summarise(monkeypatch, model, x, share=False)
    assert not found["calls"] and not found["parts"]
    assert rows(shared) == rows(flat)
    assert shared.vjp_flops == flat.vjp_flops and shared.flops == flat.flops


@pytest.mark.parametrize("name", ["tower", "wrapped tower", "gpt2"])
def test_repeated_blocks_share_one_program_and_their_callees_keep_their_rows(monkeypatch, name):
    # A Tower uses its last block's second output, so that block's backward differs.
    same = slice(None, -1) if "tower" in name else slice(None)
    model, x = CASES[name]
    table, found = summarise(monkeypatch, model, x)
    parts = found["parts"]
    blocks = [row for row in table if row.depth == 1 and row.module_type in ("Block",)]
    assert len(blocks) >= 2
    # Every call inside the blocks after the first is named relatively, and resolves.
    named = {call for call in parts.values()}
    assert len(named) == len(parts) > 0
    # The blocks are one program: their callees cost the same, callee by callee.
    costs = [
        [(table.rows[c].own_flops, table.rows[c].own_vjp_flops) for c in block.children]
        for block in blocks[same]
    ]
    assert len(costs) >= 2
    assert costs[0] and any(flops for flops, _ in costs[0])
    assert all(cost == costs[0] for cost in costs)


def test_the_totals_are_still_those_of_the_models_own_vjp(monkeypatch):
    model, x = CASES["wrapped tower"]
    table, found = summarise(monkeypatch, model, x)
    assert found["calls"] == 4
    variables = jax.eval_shape(model.init, KEY, x)
    cotangent = jax.eval_shape(model.apply, variables, x)
    program = vjp_program(model)
    assert table.vjp_flops == wrapkit.flops.count(program, variables, x, cotangent).flops
    assert table.vjp_flops == pytest.approx(xla_flops(program, variables, x, cotangent), rel=0.01)


def test_blocks_that_differ_share_nothing(monkeypatch):
    _, found = summarise(monkeypatch, Widths(), X)
    assert not found["calls"]


def test_calls_traced_under_different_contexts_share_nothing(monkeypatch):
    _, found = summarise(monkeypatch, Tagged(), X)
    assert not found["calls"]
    # Without the metadata the two blocks are one program.
    _, found = summarise(monkeypatch, Tagged(tag=False), X)
    assert found["calls"] == 2


def test_random_streams_differ_per_block_and_are_counted_apart(monkeypatch):
    shared, _ = summarise(monkeypatch, Noisy(), X, rngs={"dropout": KEY})
    flat, _ = summarise(monkeypatch, Noisy(), X, share=False, rngs={"dropout": KEY})
    assert rows(shared) == rows(flat)
    assert shared.rng_bits > 0


def test_spectral_norm_statistics_updated_in_repeated_calls(monkeypatch):
    kwargs = dict(mutable=["batch_stats"])
    shared, found = summarise(monkeypatch, Spectral(), X, **kwargs)
    flat, _ = summarise(monkeypatch, Spectral(), X, share=False, **kwargs)
    assert found["calls"] == 3 and rows(shared) == rows(flat)


def test_updated_statistics_are_outputs_of_the_shared_programs(monkeypatch):
    kwargs = dict(mutable=["batch_stats"])
    shared, found = summarise(monkeypatch, Normed(), X, **kwargs)
    flat, _ = summarise(monkeypatch, Normed(), X, share=False, **kwargs)
    # The three BatchNorm calls share one program; nothing is inside them to name.
    assert found["calls"] == 3 and not found["parts"]
    assert rows(shared) == rows(flat)
    norms = [row for row in shared if row.module_type == "BatchNorm"]
    assert len(norms) == 3 and len({row.own_flops for row in norms}) == 1
    assert all(row.own_flops for row in norms)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_towers(monkeypatch, dtype):
    x = jax.ShapeDtypeStruct((4, 16), dtype)
    model = Tower(wrapped=True)
    shared, found = summarise(monkeypatch, model, x)
    flat, _ = summarise(monkeypatch, model, x, share=False)
    # The first block takes the low-precision input; the float32 Dense layers make the
    # others' float32: three blocks are one program.
    assert found["calls"] == 3 and rows(shared) == rows(flat)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NNXTower(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(3)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_nnx_blocks_share_too(monkeypatch):
    model = nnx.eval_shape(lambda: NNXTower(nnx.Rngs(0)))
    shared, found = summarise(monkeypatch, model, X)
    flat, _ = summarise(monkeypatch, model, X, share=False)
    assert found["calls"] == 3 and found["parts"] and rows(shared) == rows(flat)


def test_jax_inlines_an_inline_jit_in_the_vjp_it_traces():
    """What sharing relies on: the VJP of a program calling an inline jit is the VJP of the
    program with the jit's equations in its place (no jit call left in it)."""
    block = jax.jit(lambda w, x: jnp.tanh(x @ w), inline=True)

    def inlined(w, x):
        return block(w, block(w, x)).sum()

    def written(w, x):
        return jnp.tanh(jnp.tanh(x @ w) @ w).sum()

    def vjp(fn):
        def program(w, x):
            out, pullback = jax.vjp(fn, w, x)
            return pullback(jnp.ones_like(out))

        return jax.make_jaxpr(program)(jnp.ones((3, 3)), jnp.ones((2, 3))).jaxpr

    names = [eqn.primitive.name for eqn in vjp(inlined).eqns]
    assert "jit" not in names and "pjit" not in names
    assert names == [eqn.primitive.name for eqn in vjp(written).eqns]


class NNXWrappedTower(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List(
            [wrapkit.nnx.SpectralNorm(nnx.Linear(16, 16, rngs=rngs), rngs=rngs) for _ in range(3)]
        )
        self.norms = nnx.List([nnx.LayerNorm(16, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return x


def test_nnx_wrapped_blocks_with_statistics(monkeypatch):
    model = NNXWrappedTower(nnx.Rngs(0))
    shared, found = summarise(monkeypatch, model, X)
    flat, _ = summarise(monkeypatch, model, X, share=False)
    assert found["calls"] == 3 and rows(shared) == rows(flat)
