"""Quantisation-aware training: a 4-bit FakeQuant MLP tracks the float one.

The same MLP is trained twice from the same initial weights on a synthetic regression task:
once in float32, once with every kernel fake-quantised to 4 bits per output channel
([`FakeQuant`][wrapkit.linen.FakeQuant], straight-through gradients). The quantised model's
loss falls with the float one's, and its weights can be folded to the 4-bit grid.

Run:  python examples/fake_quant_mlp.py [--steps 300]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from wrapkit.linen import FakeQuant


class MLP(nn.Module):
    """Three Dense layers; with ``bits``, each kernel is fake-quantised to that many bits."""

    bits: int | None = None
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features in (self.width, self.width, 1):
            dense = nn.Dense(features)
            layer = dense if self.bits is None else FakeQuant(dense, bits=self.bits)
            x = layer(x)
            if features != 1:
                x = nn.gelu(x)
        return x[..., 0]


def data(key: jax.Array, n: int = 512) -> tuple[jax.Array, jax.Array]:
    """Inputs in [-1, 1]^4 and a smooth target of them."""
    x = jax.random.uniform(key, (n, 4), minval=-1.0, maxval=1.0)
    y = jnp.sin(3 * x[:, 0]) * x[:, 1] + jnp.cos(2 * x[:, 2]) - x[:, 3] ** 2
    return x, y


def train(model: nn.Module, params: dict, steps: int) -> list[float]:
    """Adam on the mean squared error; the loss after every step."""
    x, y = data(jax.random.key(1))
    tx = optax.adam(3e-3)
    state = tx.init(params)

    def loss_fn(params: dict) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    @jax.jit
    def step(params: dict, state: optax.OptState) -> tuple[dict, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


def run(steps: int = 300, bits: int = 4) -> dict[str, list[float]]:
    """Losses of the float and the fake-quantised MLP, from the same initial weights."""
    x, _ = data(jax.random.key(1))
    plain = MLP()
    params = plain.init(jax.random.key(0), x)["params"]
    quantised = MLP(bits=bits)
    # FakeQuant holds no variables: the quantised model takes the float model's as they are.
    quantised_params = jax.eval_shape(quantised.init, jax.random.key(0), x)["params"]
    assert jax.tree_util.tree_structure(quantised_params) == jax.tree_util.tree_structure(params)
    curves: dict[str, Callable[[], list[float]]] = {
        "float32": lambda: train(plain, params, steps),
        f"{bits}-bit": lambda: train(quantised, params, steps),
    }
    return {name: curve() for name, curve in curves.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    losses = run(args.steps, args.bits)
    for name, curve in losses.items():
        marks = [curve[i] for i in (0, len(curve) // 4, len(curve) // 2, len(curve) - 1)]
        print(f"{name:8s} loss at 0, 1/4, 1/2, end: " + "  ".join(f"{v:.4f}" for v in marks))


if __name__ == "__main__":
    main()
