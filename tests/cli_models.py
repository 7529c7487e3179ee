"""Factories for the command-line tests: ``python -m wrapkit summary cli_models:tiny ...``."""

import flax.linen as nn
import jax.numpy as jnp

import wrapkit


class Tiny(nn.Module):
    """Two Dense layers, the first weight-normalised, and an ``encode`` method."""

    def setup(self):
        self.proj = wrapkit.linen.WeightNorm(nn.Dense(8))
        self.head = nn.Dense(2)

    def __call__(self, x):
        return self.head(nn.relu(self.proj(x)))

    def encode(self, x):
        return self.proj(x)


def tiny() -> nn.Module:
    return Tiny()


def takes_width(width: int) -> nn.Module:
    return nn.Dense(width)


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 3
INSTANCE = Tiny()


def raises() -> nn.Module:
    raise RuntimeError("no checkpoint at /tmp/x\nsecond line")


class Fails(nn.Module):
    """A model that fails to trace: it multiplies by a shape that does not broadcast."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x) * jnp.ones((7,))


def fails() -> nn.Module:
    return Fails()


class Wide(nn.Module):
    """Three wide, weight-normalised layers: numbers too long for a narrow table."""

    @nn.compact
    def __call__(self, x):
        for index in range(3):
            x = wrapkit.linen.WeightNorm(nn.Dense(2048), name=f"layer_{index}")(x)
        return x


def wide() -> nn.Module:
    return Wide()
