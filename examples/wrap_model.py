"""Wrap a small ResNet with wrapkit and print its outputs and variable tree.

Run:  python examples/wrap_model.py
Summarise it, seeing through the wrappers (the README's main job):
      python -m wrapkit summary examples.wrap_model:resnet --input 8x32x32x3 --vjp
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.tree import Tree

import wrapkit
from wrapkit.linen import SpectralNorm, WeightNorm


class ResidualBlock(nn.Module):
    """Two weight-normalised 3x3 convolutions with a skip connection."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = WeightNorm(nn.Conv(self.features, (3, 3)))(x)
        y = nn.relu(y)
        y = WeightNorm(nn.Conv(self.features, (3, 3)))(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet with weight-normalised convolutions and a spectrally normalised head."""

    features: int = 16
    blocks: int = 2
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = WeightNorm(nn.Conv(self.features, (3, 3)))(x)
        for _ in range(self.blocks):
            x = ResidualBlock(self.features)(x)
        x = jnp.mean(x, axis=(1, 2))
        return SpectralNorm(nn.Dense(self.classes))(x, update_stats=train)


def resnet() -> ResNet:
    """The example model, for ``python -m wrapkit summary examples.wrap_model:resnet``."""
    return ResNet()


def variable_tree(variables: dict, label: str) -> Tree:
    """A rich tree of the variables: shape and dtype of each leaf."""
    tree = Tree(label)
    for name, value in variables.items():
        if isinstance(value, dict):
            tree.add(variable_tree(value, name))
        else:
            tree.add(f"{name}: {value.dtype}{list(value.shape)}")
    return tree


def main() -> None:
    console = Console()
    model = ResNet()
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)

    # One training step's forward: SpectralNorm updates its power-iteration statistics.
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images
    )
    sigma = updates["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/sigma"]

    console.rule("wrapkit: a ResNet with WeightNorm convolutions and a SpectralNorm head")
    console.print(f"logits {logits.dtype}{list(logits.shape)}, first row:")
    console.print(np.array2string(np.asarray(logits[0]), precision=4))
    console.print(f"estimated spectral norm of the head's kernel: {float(sigma):.4f}")
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
    console.print(f"parameters: {count:,}")
    console.print(variable_tree(variables, "variables"))

    wrapper = WeightNorm(SpectralNorm(nn.Dense(4)))
    chain = " -> ".join(type(module).__name__ for module in wrapkit.chain(wrapper))
    console.print("what the wrapper protocol sees in WeightNorm(SpectralNorm(Dense)):")
    console.print(chain)


if __name__ == "__main__":
    main()
