"""wrapkit's WeightNorm and SpectralNorm against flax's, side by side in one process.

For an MLP whose every Dense layer is wrapped, measures (median over interleaved repeats):

* trace: ``jax.make_jaxpr`` of the forward pass (what every jit, eval_shape and summary pays);
* init: ``jax.eval_shape`` of ``init`` (abstract, nothing allocated);
* forward / train step: a jitted forward pass, and a jitted loss-and-gradient step with the
  statistics updated, after compilation;
* jaxpr size: equations in the forward pass, counted recursively.

Each figure is reported as a ratio to flax's class measured in the same run, so the machine's
speed and noise cancel out. Run:  python benchmarks/wrappers.py [--layers 12] [--width 512]
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

import wrapkit.linen as wl


def mlp(wrapper: Callable[..., nn.Module] | None, layers: int, width: int) -> nn.Module:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            for _ in range(layers):
                dense = nn.Dense(width)
                if wrapper is None:
                    x = dense(x)
                elif wrapper in (nn.SpectralNorm, wl.SpectralNorm):
                    x = wrapper(dense)(x, update_stats=train)
                else:
                    x = wrapper(dense)(x)
                x = nn.tanh(x)
            return x

    return MLP()


def count_equations(jaxpr: jax.extend.core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                total += count_equations(inner)
    return total


def fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A new function object calling ``fn``, so that jax's trace caches miss."""
    return lambda *args: fn(*args)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: nn.Module, x: jax.Array, repeats: int) -> dict[str, float]:
    key = jax.random.key(0)
    variables = model.init(key, x, False)
    mutable = ["batch_stats"] if "batch_stats" in variables else False

    def forward(v: Any, x: jax.Array) -> jax.Array:
        return model.apply(v, x, False)

    def loss(params: Any, rest: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        if mutable:
            y, updates = model.apply({"params": params, **rest}, x, True, mutable=mutable)
        else:
            y, updates = model.apply({"params": params, **rest}, x, True), {}
        return jnp.mean(y**2), updates

    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    jit_forward = jax.jit(forward)
    jit_step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    jax.block_until_ready(jit_forward(variables, x))
    jax.block_until_ready(jit_step(params, rest, x))
    jaxpr = jax.make_jaxpr(forward)(variables, x)
    return {
        # A new function each time: jax caches traces by function.
        "trace": median_seconds(lambda: jax.make_jaxpr(fresh(forward))(variables, x), repeats),
        "init": median_seconds(
            lambda: jax.eval_shape(fresh(lambda k: model.init(k, x, False)), key), repeats
        ),
        "forward": median_seconds(lambda: jit_forward(variables, x), 10 * repeats),
        "train step": median_seconds(lambda: jit_step(params, rest, x), 10 * repeats),
        "jaxpr equations": count_equations(jaxpr.jaxpr),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = jnp.ones((args.batch, args.width))

    pairs = {
        "WeightNorm": (nn.WeightNorm, wl.WeightNorm),
        "SpectralNorm": (nn.SpectralNorm, wl.SpectralNorm),
    }
    plain = measure(mlp(None, args.layers, args.width), x, args.repeats)
    print(
        f"{args.layers}-layer MLP, width {args.width}, batch {args.batch}, "
        f"backend {jax.default_backend()}; ratios wrapkit / flax (lower is faster)\n"
    )
    metrics = list(plain)
    print("| wrapper | " + " | ".join(metrics) + " |")
    print("| --- |" + " --- |" * len(metrics))
    for name, (theirs, ours) in pairs.items():
        results = {}
        for label, wrapper in (("flax", theirs), ("wrapkit", ours)):
            results[label] = measure(mlp(wrapper, args.layers, args.width), x, args.repeats)
        ratios = [results["wrapkit"][m] / results["flax"][m] for m in metrics]
        print(f"| {name} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    print(
        "\nunwrapped MLP for scale: "
        + ", ".join(
            f"{m} {plain[m] * 1e3:.2f} ms" if m != "jaxpr equations" else f"{m} {plain[m]}"
            for m in metrics
        )
    )


if __name__ == "__main__":
    main()
