"""LoRA's cost: the unmerged form wrapkit runs, against the materialised one and by hand.

Three figures, each a ratio or an equality measured in one run:

1. One 1024x1024 Dense over 512 tokens, rank 16, VJP with respect to the adapter: FLOPs of
   the materialised form ``x @ (W + s * A @ B)`` over the unmerged ``x @ W + s * (x @ A) @ B``,
   counted by ``wrapkit.flops`` and by XLA's lowered cost analysis.
2. A LoRA train step on GPT-2 small (LoRA on every Dense of the blocks, rank 8; loss and
   gradient with respect to the adapters): FLOPs of ``wrapkit.linen.LoRA`` against a
   hand-written unmerged layer and a hand-written materialised one (abstract: nothing runs).
3. A jitted train step of an MLP with LoRA on every layer against the same MLP with the
   unmerged form written by hand: XLA's FLOPs of the compiled steps, and the time ratio
   (median of interleaved rounds, after compilation).

Run:  python benchmarks/lora.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

import wrapkit
from wrapkit.linen import LoRA

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.gpt2 import gpt2  # noqa: E402

_B_INIT = nn.initializers.normal(0.02)  # a trained adapter: B is not zero


class HandWritten(nn.Module):
    """A Dense layer with a LoRA delta written out: unmerged, or materialised."""

    features: int
    rank: int
    scale: float
    merged: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        kernel = jax.lax.stop_gradient(kernel)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.lecun_normal(), (x.shape[-1], self.rank))
        b = self.param("lora_b", _B_INIT, (self.rank, self.features))
        if self.merged:
            return x @ (kernel + self.scale * (a @ b)) + bias
        return x @ kernel + self.scale * ((x @ a) @ b) + bias


def split(params: Any) -> tuple[dict, dict]:
    """(adapters, the rest), as flat dicts keyed by path tuples."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if k[-1].endswith(("lora_a", "lora_b"))}
    return adapters, {k: v for k, v in flat.items() if k not in adapters}


def adapter_step(model: nn.Module, loss_of_output: Any) -> Any:
    """A loss-and-gradient step with respect to the adapters only."""

    def step(adapters: dict, frozen: dict, *inputs: Any) -> Any:
        def loss(adapters: dict) -> jax.Array:
            params = traverse_util.unflatten_dict({**frozen, **adapters})
            return loss_of_output(model.apply({"params": params}, *inputs))

        return jax.value_and_grad(loss)(adapters)

    return step


def flops_of(step: Any, *args: Any) -> tuple[int, float]:
    counted = wrapkit.flops.count(step, *args).flops
    xla = jax.jit(step).lower(*args).cost_analysis()["flops"]
    return counted, xla


def dense_figure() -> dict[str, tuple[int, float]]:
    n, width, rank = 512, 1024, 16
    x = jax.ShapeDtypeStruct((n, width), jnp.float32)
    models = {
        "wrapkit LoRA (unmerged)": LoRA(nn.Dense(width), rank=rank, alpha=32.0, b_init=_B_INIT),
        "hand-written unmerged": HandWritten(width, rank, 2.0, merged=False),
        "hand-written materialised": HandWritten(width, rank, 2.0, merged=True),
    }
    print(f"1. Dense {width}x{width} over {n} tokens, rank {rank}: VJP w.r.t. the adapter")
    results = {}
    for name, model in models.items():
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        adapters, frozen = split(params)
        step = adapter_step(model, jnp.sum)
        results[name] = flops_of(step, adapters, frozen, x)
        print(
            f"   {name:28s} wrapkit.flops {results[name][0]:>14,}  XLA {results[name][1]:>16,.0f}"
        )
    merged, unmerged = results["hand-written materialised"], results["wrapkit LoRA (unmerged)"]
    print(
        f"   materialised / unmerged: {merged[0] / unmerged[0]:.2f}x (wrapkit.flops), "
        f"{merged[1] / unmerged[1]:.2f}x (XLA)"
    )
    return results


def gpt2_figure(quick: bool) -> dict[str, tuple[int, float]]:
    rank = 8
    overrides: dict[str, Any] = {"n_layer": 2} if quick else {}
    forms = {
        "wrapkit LoRA": lambda features, name: LoRA(
            nn.Dense(features, parent=None), rank=rank, alpha=16.0, b_init=_B_INIT, name=name
        ),
        "hand-written unmerged": lambda features, name: HandWritten(
            features, rank, 2.0, merged=False, name=name
        ),
        "hand-written materialised": lambda features, name: HandWritten(
            features, rank, 2.0, merged=True, name=name
        ),
    }
    tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    layers = overrides.get("n_layer", 12)
    print(f"2. GPT-2 small ({layers} layers), LoRA rank {rank} on every Dense of the blocks")
    results = {}
    for name, dense in forms.items():
        model = gpt2(**overrides, dense=dense)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        adapters, frozen = split(params)

        def loss(logits: jax.Array) -> jax.Array:
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

        results[name] = flops_of(adapter_step(model, loss), adapters, frozen, tokens)
        print(
            f"   {name:28s} wrapkit.flops {results[name][0]:>18,}  XLA {results[name][1]:>20,.0f}"
        )
    ours, hand = results["wrapkit LoRA"], results["hand-written unmerged"]
    merged = results["hand-written materialised"]
    print(
        f"   wrapkit / hand-written unmerged: {ours[0] / hand[0]:.6f} (wrapkit.flops), "
        f"{ours[1] / hand[1]:.6f} (XLA); materialised / wrapkit: {merged[1] / ours[1]:.3f}x"
    )
    return results


def train_step_figure(rounds: int, quick: bool) -> None:
    width, depth, batch, rank = (256, 2, 64, 8) if quick else (1024, 4, 512, 16)

    def mlp(dense: Any) -> nn.Module:
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x: jax.Array) -> jax.Array:
                for i in range(depth):
                    x = nn.tanh(dense(width, f"layer_{i}")(x))
                return x

        return MLP()

    models = {
        "wrapkit": mlp(
            lambda f, name: LoRA(
                nn.Dense(f, parent=None), rank=rank, alpha=2.0 * rank, b_init=_B_INIT, name=name
            )
        ),
        "hand": mlp(lambda f, name: HandWritten(f, rank, 2.0, merged=False, name=name)),
    }
    x = jax.random.normal(jax.random.key(1), (batch, width))
    steps, args = {}, {}
    for name, model in models.items():
        params = model.init(jax.random.key(0), x)["params"]
        adapters, frozen = split(params)
        steps[name] = jax.jit(adapter_step(model, lambda y: jnp.mean(y**2)))
        args[name] = (adapters, frozen, x)
        jax.block_until_ready(steps[name](*args[name]))
    hlo = {
        name: steps[name].lower(*args[name]).compile().cost_analysis()["flops"] for name in models
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            start = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(steps[name](*args[name]))
            times[name].append((time.perf_counter() - start) / 5)
    ratio = statistics.median(a / b for a, b in zip(times["wrapkit"], times["hand"], strict=True))
    print(f"3. MLP {depth}x{width}, batch {batch}, rank {rank}: jitted adapter train step")
    print(f"   compiled HLO FLOPs: wrapkit {hlo['wrapkit']:,.0f}, hand-written {hlo['hand']:,.0f}")
    print(
        f"   time wrapkit / hand-written: {ratio:.3f} (median of {rounds} interleaved rounds; "
        f"medians {statistics.median(times['wrapkit']) * 1e3:.2f} ms / "
        f"{statistics.median(times['hand']) * 1e3:.2f} ms)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    dense_figure()
    gpt2_figure(args.quick)
    train_step_figure(args.rounds, args.quick)


if __name__ == "__main__":
    main()
