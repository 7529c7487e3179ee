"""LoRA fine-tuning of a small GPT, with the adapter injected by pattern.

The model's code (``examples/gpt2.py``) has no LoRA in it: one line of
[`inject`][wrapkit.linen.inject] puts a [`LoRA`][wrapkit.linen.LoRA] on every attention
projection, [`param_labels`][wrapkit.linen.param_labels] and
[`train_labels`][wrapkit.linen.train_labels] make an optimizer that trains only the
adapters, and [`fold`][wrapkit.linen.fold] merges them into plain weights that the original
model takes. The task is synthetic: continue a sequence that counts up modulo the vocabulary
from a random start, which the random "pretrained" model cannot do.

Run:  python examples/lora_finetune.py [--steps 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from examples.gpt2 import gpt2  # noqa: E402
from wrapkit.linen import LoRA, fold, inject, param_labels, train_labels  # noqa: E402


def batch(key: jax.Array, size: int, length: int, vocab: int) -> jax.Array:
    """Sequences ``s, s+1, s+2, ...`` modulo ``vocab``, each from a random start ``s``."""
    starts = jax.random.randint(key, (size, 1), 0, vocab)
    return (starts + jnp.arange(length)) % vocab


def loss_fn(model: nn.Module, params: dict, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@dataclasses.dataclass(frozen=True)
class Result:
    losses: list[float]
    base_unchanged: bool  # every base weight bit-identical after training
    trainable: int  # parameters the optimizer trains
    total: int
    fold_error: float  # largest |plain model on folded weights - injected model|


def run(steps: int = 150, rank: int = 4) -> Result:
    model = gpt2(vocab_size=32, n_positions=32, d_model=64, n_head=4, n_layer=2)
    tokens = batch(jax.random.key(1), 32, 16, 32)
    pretrained = model.init(jax.random.key(0), tokens)  # stands for a trained checkpoint

    # The one line: LoRA on every attention projection (c_attn, c_proj inside attn).
    lora = inject(model, functools.partial(LoRA, rank=rank, alpha=2.0 * rank), "attn/c_*")

    variables = lora.init(jax.random.key(2), tokens)
    # Keep the pretrained weights; only the adapters are new (B = 0: outputs unchanged).
    flat = traverse_util.flatten_dict(variables["params"])
    flat.update(traverse_util.flatten_dict(pretrained["params"]))
    params = traverse_util.unflatten_dict(flat)
    labels = param_labels(lora, tokens)
    tx = optax.multi_transform(
        {"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, train_labels(labels)
    )
    state = tx.init(params)

    @jax.jit
    def step(
        params: dict, state: optax.OptState, tokens: jax.Array
    ) -> tuple[dict, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, lora))(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    trained = params
    for i in range(steps):
        trained, state, loss = step(trained, state, batch(jax.random.key(10 + i), 32, 16, 32))
        losses.append(float(loss))

    before = traverse_util.flatten_dict(pretrained["params"])
    after = traverse_util.flatten_dict(trained)
    base_unchanged = all(bool((after[path] == value).all()) for path, value in before.items())
    kinds = traverse_util.flatten_dict(labels)
    trainable = sum(after[path].size for path, kind in kinds.items() if kind == "adapter")
    total = sum(value.size for value in after.values())

    folded = fold(lora, {"params": trained}, tokens)
    merged = model.apply(folded, tokens)
    fold_error = float(jnp.abs(merged - lora.apply({"params": trained}, tokens)).max())
    return Result(losses, base_unchanged, trainable, total, fold_error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    result = run(parser.parse_args().steps)
    print(
        f"trainable {result.trainable:,} of {result.total:,} parameters "
        f"({100 * result.trainable / result.total:.2f}%)"
    )
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    print(f"base weights bit-identical: {result.base_unchanged}")
    print(f"folded plain model vs injected model: max |difference| {result.fold_error:.2e}")


if __name__ == "__main__":
    main()
