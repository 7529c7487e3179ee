"""A wrapped NNX model's jitted train step against the same model with the weight written by hand.

The NNX twin of ``benchmarks/train_step.py``. For each wrapkit.nnx wrapper (WeightNorm,
SpectralNorm, WeightStandardization, FakeQuant, LoRA) an MLP whose every ``nnx.Linear`` is
wrapped is compared with the same MLP written out: a module that holds the same variables
and computes the effective weight itself (``scale * v / ||v||``, ``W / sigma`` with its
power-iteration statistics written back, the standardised kernel, the fake-quantised kernel
with its straight-through gradient, ``x @ W + s * (x A) B`` with ``W`` frozen) with the same
functions of ``wrapkit._numerics`` and ``wrapkit._family``.
The train step is ``nnx.jit`` of ``nnx.value_and_grad`` and an ``nnx.Optimizer`` SGD update.
Reported per wrapper:

* XLA's FLOPs of the two compiled train steps: equal when the wrapper's view (split, new
  Variables, merge) adds nothing to the program;
* the time ratio wrapkit / hand-written, the median over interleaved rounds after
  compilation (the machine's noise cancels in the ratio).

Then the eager (not jitted) forward pass of ``wrapkit.nnx.WeightNorm`` against flax's
``nnx.WeightNorm`` around the same layers, median time ratio of interleaved rounds: the
Python cost of building the view on every call, against flax's writing the normalised
weight into the layer.

Run:  python benchmarks/nnx_train_step.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wrapkit import _numerics
from wrapkit._family import spectral_norm
from wrapkit.nnx import FakeQuant, LoRA, SpectralNorm, WeightNorm, WeightStandardization

_INIT = nnx.initializers.lecun_normal()
_RANK, _ALPHA = 8, 16.0


class _Written(nnx.Module):
    """A Linear layer whose effective kernel is computed in the module's own code."""

    def __init__(self, features_in: int, features_out: int, kind: str, rngs: nnx.Rngs) -> None:
        self.kind = kind
        self.kernel = nnx.Param(_INIT(rngs.params(), (features_in, features_out)))
        self.bias = nnx.Param(jnp.zeros((features_out,)))
        if kind == "weight_norm":
            self.scale = nnx.Param(jnp.ones((features_out,)))
        elif kind == "spectral_norm":
            self.u = nnx.BatchStat(1e-2 * jax.random.normal(rngs.params(), (1, features_out)))
            self.sigma = nnx.BatchStat(jnp.ones(()))
        elif kind == "lora":
            self.lora_a = nnx.LoRAParam(_INIT(rngs.params(), (features_in, _RANK)))
            self.lora_b = nnx.LoRAParam(jnp.zeros((_RANK, features_out)))

    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.kernel[...]
        if self.kind == "weight_norm":
            kernel = _numerics.l2_normalize(v, axis=(0,), eps=1e-12) * self.scale[...]
        elif self.kind == "spectral_norm":
            kernel, u, sigma = spectral_norm.normalized(v, self.u[...], 1, 1e-12, None)
            self.u[...], self.sigma[...] = u, sigma
        elif self.kind == "weight_standardization":
            kernel = _numerics.standardize(v, axis=(0,), eps=1e-10)
        elif self.kind == "fake_quant":
            kernel = _numerics.fake_quantize(v, 8, symmetric=True, axis=(0,))
        else:  # the unmerged form, the base frozen
            scale = _numerics.lora_scale(_RANK, _ALPHA)
            delta = (x @ self.lora_a[...]) @ self.lora_b[...]
            return x @ jax.lax.stop_gradient(v) + scale * delta + self.bias[...]
        return x @ kernel + self.bias[...]


WRAPPED: dict[str, Callable[[nnx.Module], nnx.Module]] = {
    "weight_norm": WeightNorm,
    "spectral_norm": lambda linear: SpectralNorm(linear, rngs=nnx.Rngs(1)),
    "weight_standardization": WeightStandardization,
    "fake_quant": lambda linear: FakeQuant(linear, bits=8),
    "lora": lambda linear: LoRA(linear, rank=_RANK, alpha=_ALPHA, rngs=nnx.Rngs(1)),
}


class MLP(nnx.Module):
    def __init__(self, layer: Callable[[int, int, nnx.Rngs], nnx.Module], depth: int, width: int):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([layer(width, width, rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def wrapped_linear(kind: str) -> Callable[[int, int, nnx.Rngs], nnx.Module]:
    return lambda fin, fout, rngs: WRAPPED[kind](
        nnx.Linear(fin, fout, kernel_init=_INIT, rngs=rngs)
    )


def written_linear(kind: str) -> Callable[[int, int, nnx.Rngs], nnx.Module]:
    return lambda fin, fout, rngs: _Written(fin, fout, kind, rngs)


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int, repeat: int) -> float:
    """Median over ``rounds`` of first / second call's time (each timed ``repeat`` times),
    the order alternating from round to round."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(repeat):
                jax.block_until_ready(calls[name]())
            times[name].append((time.perf_counter() - start) / repeat)
    first, second = (times[name] for name in names)
    return statistics.median(a / b for a, b in zip(first, second, strict=True))


def compare(kind: str, depth: int, width: int, batch: int, rounds: int) -> dict[str, float]:
    models = {
        "wrapkit": MLP(wrapped_linear(kind), depth, width),
        "hand": MLP(written_linear(kind), depth, width),
    }
    x = jax.random.normal(jax.random.key(1), (batch, width))
    optimizers = {
        name: nnx.Optimizer(m, optax.sgd(1e-3), wrt=nnx.Param) for name, m in models.items()
    }
    for name, model in models.items():
        jax.block_until_ready(train_step(model, optimizers[name], x))  # compile
    flops = {
        name: train_step.lower(model, optimizers[name], x).compile().cost_analysis()["flops"]
        for name, model in models.items()
    }
    ratio = _interleaved(
        {name: lambda name=name: train_step(models[name], optimizers[name], x) for name in models},
        rounds,
        repeat=5,
    )
    return {"wrapkit flops": flops["wrapkit"], "hand flops": flops["hand"], "time ratio": ratio}


def eager_overhead(width: int, batch: int, depth: int, rounds: int) -> float:
    """Median time ratio of an eager forward pass, wrapkit.nnx.WeightNorm / nnx.WeightNorm,
    on ``depth`` Linear layers of ``width``."""

    def make(wrap: Callable[[nnx.Module], nnx.Module]) -> MLP:
        return MLP(lambda fin, fout, rngs: wrap(nnx.Linear(fin, fout, rngs=rngs)), depth, width)

    ours = make(WeightNorm)
    theirs = make(lambda linear: nnx.WeightNorm(linear, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (batch, width))
    for model in (ours, theirs):  # warm jax's caches of the eager operations
        jax.block_until_ready(model(x))
    return _interleaved({"wrapkit": lambda: ours(x), "flax": lambda: theirs(x)}, rounds, repeat=20)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    args = parser.parse_args(argv)
    depth, width, batch = (2, 64, 16) if args.quick else (4, 1024, 256)
    print(
        f"NNX MLP {depth}x{width}, batch {batch}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; median of {args.rounds} interleaved rounds"
    )
    results: dict[str, dict[str, float]] = {}
    for kind in WRAPPED:
        result = compare(kind, depth, width, batch, args.rounds)
        results[kind] = result
        same = "identical" if result["wrapkit flops"] == result["hand flops"] else "DIFFERENT"
        print(
            f"  {kind:24s} HLO FLOPs {result['wrapkit flops']:>16,.0f} ({same}); "
            f"time wrapkit / hand-written {result['time ratio']:.3f}"
        )
    eager = {
        "small": eager_overhead(width=64, batch=8, depth=depth, rounds=args.rounds),
        "mlp": eager_overhead(width=width, batch=batch, depth=depth, rounds=args.rounds),
    }
    results["eager forward"] = eager
    print(
        "  eager forward, wrapkit.nnx.WeightNorm / flax nnx.WeightNorm: "
        f"{depth}x64 batch 8 {eager['small']:.3f}; {depth}x{width} batch {batch} {eager['mlp']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()
