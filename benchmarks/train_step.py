"""A wrapped model's jitted train step against the same model with the weight written by hand.

For each wrapper (WeightNorm, WeightStandardization, FakeQuant, LoRA) an MLP whose every
Dense is wrapped is compared with the same MLP written out: a module that holds the same
parameters and computes the effective weight itself (``scale * v / ||v||``, the standardised
kernel, the fake-quantised kernel with its straight-through gradient, ``x @ W + s * (x A) B``)
with the same functions of ``wrapkit._numerics``. Reported per wrapper:

* XLA's FLOPs of the two compiled train steps (loss, gradient, SGD update): equal when the
  wrapper adds nothing to the program;
* the time ratio wrapkit / hand-written, the median over interleaved rounds after
  compilation (the machine's noise cancels in the ratio).

Run:  python benchmarks/train_step.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wrapkit import _numerics
from wrapkit.linen import FakeQuant, LoRA, WeightNorm, WeightStandardization

_INIT = nn.initializers.lecun_normal()


class _Written(nn.Module):
    """A Dense layer whose effective kernel is computed in the module's own code."""

    features: int
    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel", _INIT, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.kind == "weight_norm":
            scale = self.param("scale", nn.initializers.ones, (self.features,))
            kernel = _numerics.l2_normalize(v, axis=(0,), eps=1e-12) * scale
        elif self.kind == "weight_standardization":
            kernel = _numerics.standardize(v, axis=(0,), eps=1e-10)
        elif self.kind == "fake_quant":
            kernel = _numerics.fake_quantize(v, 8, symmetric=True, axis=(0,))
        else:
            a = self.param("lora_a", _INIT, (x.shape[-1], 8))
            b = self.param("lora_b", nn.initializers.zeros, (8, self.features))
            w = jax.lax.stop_gradient(v)
            return x @ w + 2.0 * ((x @ a) @ b) + bias
        return x @ kernel + bias


WRAPPED: dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight_norm": WeightNorm,
    "weight_standardization": WeightStandardization,
    "fake_quant": lambda dense: FakeQuant(dense, bits=8),
    "lora": lambda dense: LoRA(dense, rank=8, alpha=16.0),
}


def mlp(layer: Callable[[int], nn.Module], depth: int, width: int) -> nn.Module:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for _ in range(depth):
                x = nn.tanh(layer(width)(x))
            return x

    return MLP()


def train_step(model: nn.Module) -> Callable[..., Any]:
    @jax.jit
    def step(params: Any, x: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(
            params
        )
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), loss

    return step


def compare(kind: str, depth: int, width: int, batch: int, rounds: int) -> dict[str, float]:
    models = {
        "wrapkit": mlp(lambda f: WRAPPED[kind](nn.Dense(f, kernel_init=_INIT)), depth, width),
        "hand": mlp(lambda f: _Written(f, kind), depth, width),
    }
    x = jax.random.normal(jax.random.key(1), (batch, width))
    steps, params = {}, {}
    for name, model in models.items():
        params[name] = model.init(jax.random.key(0), x)["params"]
        steps[name] = train_step(model)
        jax.block_until_ready(steps[name](params[name], x))
    flops = {
        name: steps[name].lower(params[name], x).compile().cost_analysis()["flops"]
        for name in models
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds):
        for name in models if round_ % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(steps[name](params[name], x))
            times[name].append((time.perf_counter() - start) / 5)
    ratio = statistics.median(a / b for a, b in zip(times["wrapkit"], times["hand"], strict=True))
    return {"wrapkit flops": flops["wrapkit"], "hand flops": flops["hand"], "time ratio": ratio}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    args = parser.parse_args(argv)
    depth, width, batch = (2, 64, 16) if args.quick else (4, 1024, 256)
    print(
        f"MLP {depth}x{width}, batch {batch}; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    results = {}
    for kind in WRAPPED:
        result = compare(kind, depth, width, batch, args.rounds)
        results[kind] = result
        same = "identical" if result["wrapkit flops"] == result["hand flops"] else "DIFFERENT"
        print(
            f"  {kind:24s} HLO FLOPs {result['wrapkit flops']:>16,.0f} ({same}); "
            f"time wrapkit / hand-written {result['time ratio']:.3f}"
        )
    return results


if __name__ == "__main__":
    main()
