"""Factories for the command-line tests: ``python -m wrapkit summary cli_models:tiny ...``."""

import flax.linen as nn

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
