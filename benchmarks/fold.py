"""Fold time against model size: ``wrapkit.linen.fold`` of a 10M- and a 100M-parameter MLP.

Both MLPs have the same ten WeightNorm'd Dense layers (so the same program to trace and
compile), 1,000 and 3,162 wide: 10M and 100M parameters. Each round folds both, in
alternating order; reported are the medians and their ratio. Linear in the parameters is a
ratio of at most 10 (less where the fixed cost of tracing and compiling shows).

Run:  python benchmarks/fold.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from wrapkit.linen import WeightNorm, fold


class MLP(nn.Module):
    width: int
    layers: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.layers):
            x = nn.tanh(WeightNorm(nn.Dense(self.width))(x))
        return x


def timed_fold(width: int, variables: dict) -> float:
    x = jax.ShapeDtypeStruct((1, width), jnp.float32)
    start = time.perf_counter()
    folded = fold(MLP(width), variables, x)
    jax.block_until_ready(folded)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs=2, default=(1000, 3162))
    args = parser.parse_args(argv)
    sizes = {}
    variables = {}
    for width in args.widths:
        model = MLP(width)
        variables[width] = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, width)))
        sizes[width] = sum(v.size for v in jax.tree_util.tree_leaves(variables[width]))
    times: dict[int, list[float]] = {width: [] for width in args.widths}
    for round_ in range(args.rounds):
        order = args.widths if round_ % 2 == 0 else args.widths[::-1]
        for width in order:
            times[width].append(timed_fold(width, variables[width]))
    small, large = args.widths
    medians = {width: statistics.median(times[width]) for width in args.widths}
    ratio = medians[large] / medians[small]
    params_ratio = sizes[large] / sizes[small]
    for width in args.widths:
        print(f"{sizes[width] / 1e6:6.1f}M parameters: fold {medians[width]:.3f} s (median)")
    print(f"time ratio {ratio:.2f} for {params_ratio:.1f}x the parameters")
    return {"time ratio": ratio, "parameter ratio": params_ratio}


if __name__ == "__main__":
    main()
