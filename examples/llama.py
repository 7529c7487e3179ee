"""A Llama-like decoder (Touvron et al., 2023) in Flax Linen, for abstract model summaries.

RMSNorm before each branch, rotary position embeddings (Su et al., https://arxiv.org/abs/
2104.09864), multi-head or grouped-query attention (Ainslie et al., https://arxiv.org/abs/
2305.13245), a SwiGLU MLP (Shazeer, https://arxiv.org/abs/2002.05202) and an untied output
projection. Nothing here is specific to any checkpoint; it exists so that a 7B-parameter model
can be summarised *abstractly*: ``llama_7b()`` holds 6.7e9 parameters (27 GB in float32), so
never call its ``init`` concretely, only through ``jax.eval_shape`` or ``wrapkit.summary``.

Run:  python examples/llama.py
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

_weights = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-like decoder; the defaults are Llama-7B's.

    Attributes:
        vocab_size: number of tokens.
        max_seq_len: longest sequence the model is meant for (rotary embeddings need no
            table, so this only bounds the inputs).
        d_model: width of the residual stream.
        n_layer: decoder blocks.
        n_head: query heads; must divide ``d_model``.
        n_kv_head: key/value heads (grouped-query attention); ``None`` for one per query
            head (plain multi-head attention). Must divide ``n_head``.
        mlp_hidden: hidden width of the SwiGLU MLP.
        rope_theta: base of the rotary embedding's frequencies.
        norm_eps: epsilon of RMSNorm.
        param_dtype: dtype of the parameters (and so of the computation), e.g.
            ``jnp.bfloat16``.
    """

    vocab_size: int = 32000
    max_seq_len: int = 2048
    d_model: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    mlp_hidden: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        errors = []
        if self.d_model % self.n_head:
            errors.append(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        elif (self.d_model // self.n_head) % 2:
            errors.append(
                f"the head width d_model / n_head = {self.d_model // self.n_head} is odd, but "
                "rotary embeddings rotate pairs of features"
            )
        if self.n_head % self.kv_heads:
            errors.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if errors:
            raise ValueError(
                "LlamaConfig: " + "; ".join(errors) + ". Choose n_head dividing d_model into "
                "even head widths, and n_kv_head dividing n_head."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head


def parameter_formula(config: LlamaConfig) -> int:
    """The parameter count, derived by hand from the config.

    Per block: query and output projections ``2 d^2``, key and value projections
    ``2 d (n_kv_head * head_dim)``, three SwiGLU matrices ``3 d h`` and two RMSNorm scales
    ``2 d``; plus the embedding and the untied output projection ``2 V d`` and the final
    RMSNorm ``d``.

    Example:
        >>> parameter_formula(LlamaConfig())
        6738415616
    """
    d, kv = config.d_model, config.kv_heads * config.head_dim
    block = 2 * d * d + 2 * d * kv + 3 * d * config.mlp_hidden + 2 * d
    return config.n_layer * block + 2 * config.vocab_size * d + d


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale, computed in float32."""

    eps: float
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate each pair of features ``(x[2i], x[2i+1])`` by ``position * theta^(-2i/d)``.

    Args:
        x: queries or keys, shape ``(batch, length, heads, head_dim)``.
        positions: integer positions, shape ``(length,)``.
        theta: base of the frequencies.

    Returns:
        ``x`` rotated, same shape and dtype.
    """
    head_dim = x.shape[-1]
    frequencies = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[:, None].astype(jnp.float32) * frequencies  # (length, head_dim / 2)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def _projection(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    """A bias-free Dense layer, as every Llama projection is."""
    return nn.Dense(
        features, use_bias=False, kernel_init=_weights, param_dtype=config.param_dtype, name=name
    )


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped key/value heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = config.n_head, config.kv_heads, config.head_dim

        def split_heads(name: str, count: int) -> jax.Array:
            y = _projection(config, count * head_dim, name)(x)
            return y.reshape(batch, length, count, head_dim)

        q = split_heads("q_proj", heads)
        k, v = split_heads("k_proj", kv_heads), split_heads("v_proj", kv_heads)
        positions = jnp.arange(length)
        q, k = rotary(q, positions, config.rope_theta), rotary(k, positions, config.rope_theta)

        # Each group of heads // kv_heads query heads shares one key/value head.
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32)).astype(x.dtype)
        y = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(batch, length, heads * head_dim)
        return _projection(config, config.d_model, "o_proj")(y)


class SwiGLU(nn.Module):
    """The MLP: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config

        gate = _projection(config, config.mlp_hidden, "gate_proj")(x)
        up = _projection(config, config.mlp_hidden, "up_proj")(x)
        return _projection(config, config.d_model, "down_proj")(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
    """RMSNorm -> attention -> residual; RMSNorm -> SwiGLU -> residual."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        x = x + Attention(config, name="attn")(
            RMSNorm(config.norm_eps, config.param_dtype, name="attn_norm")(x)
        )
        return x + SwiGLU(config, name="mlp")(
            RMSNorm(config.norm_eps, config.param_dtype, name="mlp_norm")(x)
        )


class Llama(nn.Module):
    """A Llama-like decoder-only language model with an untied output projection.

    Attributes:
        config: the hyperparameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = llama_tiny()
        >>> tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)  # abstract: nothing computed
        >>> variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        >>> jax.eval_shape(model.apply, variables, tokens)
        ShapeDtypeStruct(shape=(2, 16, 256), dtype=float32)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
            tokens: integer token ids, shape ``(batch, length)`` with
                ``length <= max_seq_len``.

        Returns:
            Logits of shape ``(batch, length, vocab_size)``, in ``param_dtype``.
        """
        config = self.config
        if tokens.shape[-1] > config.max_seq_len:
            raise ValueError(
                f"Llama: got {tokens.shape[-1]} tokens, but max_seq_len={config.max_seq_len}. "
                "Pass at most max_seq_len tokens, or raise max_seq_len in the config."
            )
        x = nn.Embed(
            config.vocab_size,
            config.d_model,
            embedding_init=_weights,
            param_dtype=config.param_dtype,
            name="embed",
        )(tokens)
        for i in range(config.n_layer):
            x = DecoderBlock(config, name=f"layers_{i}")(x)
        x = RMSNorm(config.norm_eps, config.param_dtype, name="norm")(x)
        return nn.Dense(
            config.vocab_size,
            use_bias=False,
            kernel_init=_weights,
            param_dtype=config.param_dtype,
            name="lm_head",
        )(x)


def llama(**config_overrides: Any) -> Llama:
    """A Llama-like model with the given fields of `LlamaConfig` changed from Llama-7B's."""
    return Llama(LlamaConfig(**config_overrides))


def llama_7b() -> Llama:
    """Llama-7B's shape: 32 layers, width 4096, 32 heads, MLP 11008, 6,738,415,616 parameters.

    Summarise it abstractly only (``jax.eval_shape``, ``wrapkit.summary``), on up to 2048
    tokens.
    """
    return llama()


def llama_7b_bf16() -> Llama:
    """Llama-7B's shape with bfloat16 parameters."""
    return llama(param_dtype=jnp.bfloat16)


def llama_tiny() -> Llama:
    """A 2-layer model of width 64, 4 query heads sharing 2 key/value heads, 256 tokens."""
    return llama(
        vocab_size=256,
        max_seq_len=128,
        d_model=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        mlp_hidden=172,
    )


def parameter_count(model: nn.Module, tokens: jax.ShapeDtypeStruct) -> int:
    """Number of parameters, from an abstract init: nothing is allocated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> parameter_count(llama_7b(), jax.ShapeDtypeStruct((1, 2048), jnp.int32))
        6738415616
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def main() -> None:
    for name, factory, length in (("llama_7b", llama_7b, 2048), ("llama_tiny", llama_tiny, 128)):
        model = factory()
        count = parameter_count(model, jax.ShapeDtypeStruct((1, length), jnp.int32))
        formula = parameter_formula(model.config)
        print(f"{name}: {count:,} parameters (abstract init; by hand: {formula:,})")
    print("summarise one:  python -m wrapkit summary examples.llama:llama_7b --input 1x2048:int32")


if __name__ == "__main__":
    main()
