"""A weight-normalised CNN, initialised from data and trained a few steps.

Salimans & Kingma (2016) initialise a weight-normalised network from one batch: each layer's
scale and bias are set so that its pre-activations have zero mean and unit variance per
feature, layer by layer ([`init_from_data`][wrapkit.linen.init_from_data]). This example does
that on synthetic images (a class is the quadrant that holds a bright square), prints the
statistics of every layer before and after, and trains with Adam.

Run:  python examples/weight_norm_cnn.py [--steps 100]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from wrapkit.linen import WeightNorm, init_from_data


class CNN(nn.Module):
    """Two weight-normalised convolutions and a weight-normalised linear head."""

    classes: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(WeightNorm(nn.Conv(16, (3, 3)))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(WeightNorm(nn.Conv(32, (3, 3)))(x))
        return WeightNorm(nn.Dense(self.classes))(x.mean(axis=(1, 2)))


def images(key: jax.Array, n: int = 256) -> tuple[jax.Array, jax.Array]:
    """16x16 noise images with a bright 4x4 square in one quadrant; the label is the quadrant."""
    noise_key, label_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (n,), 0, 4)
    rows, cols = (labels // 2) * 8 + 2, (labels % 2) * 8 + 2
    grid = jnp.arange(16)
    inside = (
        (grid[None, :, None] >= rows[:, None, None])
        & (grid[None, :, None] < rows[:, None, None] + 4)
        & (grid[None, None, :] >= cols[:, None, None])
        & (grid[None, None, :] < cols[:, None, None] + 4)
    )
    x = 0.3 * jax.random.normal(noise_key, (n, 16, 16, 1)) + inside[..., None]
    return x, labels


def layer_statistics(model: nn.Module, variables: dict, x: jax.Array) -> list[tuple[float, float]]:
    """(mean, std) of each WeightNorm'd layer's output on ``x``, averaged over features."""
    found: list[tuple[float, float]] = []

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, WeightNorm) and context.method_name == "__call__":
            axes = tuple(range(out.ndim - 1))
            found.append((float(out.mean(axes).mean()), float(out.std(axes).mean())))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x)
    return found


@dataclasses.dataclass(frozen=True)
class Result:
    """Per-layer (mean, std) before and after ``init_from_data``, and the training losses."""

    before: list[tuple[float, float]]
    after: list[tuple[float, float]]
    losses: list[float]


def run(steps: int = 100) -> Result:
    """Statistics before and after the data-dependent init, and the training losses."""
    model = CNN()
    x, labels = images(jax.random.key(1))
    variables = model.init(jax.random.key(0), x)
    before = layer_statistics(model, variables, x)
    variables = init_from_data(model, variables, x[:64])
    after = layer_statistics(model, variables, x[:64])

    tx = optax.adam(3e-3)
    params = variables["params"]
    state = tx.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState) -> tuple[dict, optax.OptState, jax.Array]:
        def loss(params: dict) -> jax.Array:
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return Result(before, after, losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    result = run(parser.parse_args().steps)
    for name, stats in (("before", result.before), ("after", result.after)):
        shown = ", ".join(f"({mean:+.2f}, {std:.2f})" for mean, std in stats)
        print(f"(mean, std) of each layer {name} init_from_data: {shown}")
    losses = result.losses
    print(f"loss: {losses[0]:.3f} at the start, {losses[-1]:.3f} after {len(losses)} steps")


if __name__ == "__main__":
    main()
