"""GPT-2 (Radford et al., 2019) in Flax Linen, for model summaries.

A plain, readable GPT-2: learned token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm, and logits through the *tied* token
embedding (``wte.attend``). That last, repeated call of ``wte`` is what flax's ``tabulate``
leaves out of its FLOP count; ``wrapkit.summary`` counts it.

The zero-argument factories are what the command line takes, e.g.::

    python -m wrapkit summary examples.gpt2:gpt2_small --input 1x128:int32

Run:  python examples/gpt2.py
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wrapkit.linen import WeightNorm

# GPT-2 initialises weights from N(0, 0.02) and position embeddings from N(0, 0.01).
_weights = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2; the defaults are GPT-2 small (124M parameters).

    Attributes:
        vocab_size: number of tokens.
        n_positions: longest sequence the position embedding covers.
        d_model: width of the residual stream.
        n_head: attention heads; must divide ``d_model``.
        n_layer: transformer blocks.
        dropout: dropout rate on embeddings, attention weights and residual branches; only
            applied when the model is called with ``deterministic=False``.
        weight_norm: wrap the attention and MLP Dense layers in
            [`WeightNorm`][wrapkit.linen.WeightNorm].
        scan_layers: run the blocks with ``nn.scan`` (parameters stacked on a leading layer
            axis) instead of a Python loop of ``h_0``, ``h_1``, ... modules.
        dense: builds the Dense layers of the blocks instead, as ``dense(features, name)``
            (for benchmarks and tests that swap in another layer); ``None`` for ``nn.Dense``.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0
    weight_norm: bool = False
    scan_layers: bool = False
    dense: Callable[[int, str], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPT2Config: d_model={self.d_model} is not divisible by n_head={self.n_head}. "
                "Choose n_head among the divisors of d_model."
            )


def _dense(config: GPT2Config, features: int, name: str) -> nn.Module:
    """A Dense layer of a block, weight-normalised when the config asks for it."""
    if config.dense is not None:
        return config.dense(features, name)
    if config.weight_norm:
        # parent=None: the wrapper adopts the Dense, so its weights sit under the wrapper's name.
        return WeightNorm(nn.Dense(features, kernel_init=_weights, parent=None), name=name)
    return nn.Dense(features, kernel_init=_weights, name=name)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        config = self.config
        batch, length, width = x.shape
        head_dim = width // config.n_head
        qkv = _dense(config, 3 * width, "c_attn")(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * config.n_head, head_dim), 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = nn.Dropout(config.dropout)(jax.nn.softmax(scores), deterministic)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return _dense(config, width, "c_proj")(y)


class MLP(nn.Module):
    """The feed-forward branch: Dense to 4 * d_model, GELU, Dense back to d_model."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        y = nn.gelu(_dense(self.config, 4 * self.config.d_model, "c_fc")(x), approximate=True)
        return _dense(self.config, self.config.d_model, "c_proj")(y)


class Block(nn.Module):
    """One pre-LayerNorm transformer block: attention and MLP, each added to the residual."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dropout = nn.Dropout(self.config.dropout)
        x = x + dropout(
            CausalSelfAttention(self.config, name="attn")(
                nn.LayerNorm(epsilon=1e-5, name="ln_1")(x), deterministic
            ),
            deterministic,
        )
        y = MLP(self.config, name="mlp")(nn.LayerNorm(epsilon=1e-5, name="ln_2")(x))
        return x + dropout(y, deterministic)


def _scan_step(block: Block, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
    return block(x, deterministic), None


class GPT2(nn.Module):
    """GPT-2 language model with logits through the tied token embedding.

    Attributes:
        config: the hyperparameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = gpt2_tiny()
        >>> tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)  # abstract: nothing computed
        >>> variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        >>> jax.eval_shape(model.apply, variables, tokens)
        ShapeDtypeStruct(shape=(2, 16, 512), dtype=float32)
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Next-token logits.

        Args:
            tokens: integer token ids, shape ``(batch, length)`` with
                ``length <= n_positions``.
            deterministic: disable dropout (set False for training with ``dropout > 0``,
                passing a ``"dropout"`` rng).

        Returns:
            Logits of shape ``(batch, length, vocab_size)``.
        """
        config = self.config
        length = tokens.shape[-1]
        if length > config.n_positions:
            raise ValueError(
                f"GPT2: got {length} tokens, but n_positions={config.n_positions}. "
                "Pass at most n_positions tokens, or raise n_positions in the config."
            )
        wte = nn.Embed(config.vocab_size, config.d_model, embedding_init=_weights, name="wte")
        wpe = nn.Embed(
            config.n_positions,
            config.d_model,
            embedding_init=nn.initializers.normal(stddev=0.01),
            name="wpe",
        )
        x = wte(tokens) + wpe(jnp.arange(length))
        x = nn.Dropout(config.dropout)(x, deterministic)
        if config.scan_layers:
            blocks = nn.scan(
                _scan_step,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=config.n_layer,
            )
            x, _ = blocks(Block(config, name="h"), x, deterministic)
        else:
            for i in range(config.n_layer):
                x = Block(config, name=f"h_{i}")(x, deterministic)
        x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
        # The output projection is the token embedding, transposed: no lm_head parameters.
        return wte.attend(x)


def gpt2(**config_overrides: Any) -> GPT2:
    """A GPT-2 with the given fields of `GPT2Config` changed from GPT-2 small.

    Example:
        >>> gpt2(n_layer=48).config.n_layer
        48
    """
    return GPT2(GPT2Config(**config_overrides))


def gpt2_small() -> GPT2:
    """GPT-2 small: 12 layers, width 768, 12 heads, 124,439,808 parameters."""
    return gpt2()


def gpt2_small_weight_norm() -> GPT2:
    """GPT-2 small with every attention and MLP Dense layer in a WeightNorm."""
    return gpt2(weight_norm=True)


def gpt2_tiny() -> GPT2:
    """A 2-layer GPT-2 of width 64 with 4 heads and 512 tokens, for tests."""
    return gpt2(vocab_size=512, n_positions=128, d_model=64, n_head=4, n_layer=2)


def parameter_count(model: nn.Module, tokens: jax.ShapeDtypeStruct) -> int:
    """Number of parameters, from an abstract init: nothing is allocated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> parameter_count(gpt2_small(), jax.ShapeDtypeStruct((1, 128), jnp.int32))
        124439808
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def main() -> None:
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    for name, factory in (
        ("gpt2_small", gpt2_small),
        ("gpt2_small_weight_norm", gpt2_small_weight_norm),
        ("gpt2_tiny", gpt2_tiny),
    ):
        print(f"{name}: {parameter_count(factory(), tokens):,} parameters (abstract init)")
    print("summarise one:  python -m wrapkit summary examples.gpt2:gpt2_small --input 1x128:int32")


if __name__ == "__main__":
    main()
