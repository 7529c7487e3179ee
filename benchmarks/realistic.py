"""flax's ``tabulate`` against ``wrapkit.tabulate`` on third-party models at realistic sizes.

The models of the compatibility suite (``tests/test_compat.py``), at the sizes people use,
built from transformers' configs with random initialisation (nothing is downloaded), batch 1:

* GPT-2 small: ``FlaxGPT2LMHeadModule(GPT2Config())``, 12 layers, width 768, vocab 50257,
  128 tokens (input ids, attention mask, position ids);
* BERT-base: ``FlaxBertModule(BertConfig())``, 12 layers, width 768, with the pooler, 128
  tokens (input ids, attention mask);
* ViT-B/16: ``FlaxViTModule(ViTConfig())``, one 224x224 RGB image (NHWC);
* ResNet-50: ``FlaxResNetModule(ResNetConfig())``, one 224x224 RGB image (NHWC), BatchNorm
  on its running averages (``deterministic=True``, the default).

Each contender is the user's line, ``tabulate(model, key, compute_flops=True,
compute_vjp_flops=True)(*inputs)``: ``flax.linen.tabulate`` on concrete inputs,
``wrapkit.tabulate`` on ``jax.ShapeDtypeStruct``s, both rendering to a console 120 wide.
Every call builds a new module from its config, so that no trace cache is shared between
calls. A warm-up round (untimed) pays for one-off work (lazy imports, the first compilation);
then the rounds interleave the two tools model by model, each call after ``gc.collect()``.
Reported: median seconds of each and flax / wrapkit. If flax's tabulate fails on a model,
its error is reported instead of a ratio (and it is not tried again).

Run:  python benchmarks/realistic.py [--rounds 5] [--quick]
(--quick: the suite's tiny configs, a smoke test; its figures say nothing about real sizes.)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import BertConfig, GPT2Config, ResNetConfig, ViTConfig
from transformers.models.bert.modeling_flax_bert import FlaxBertModule
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule
from transformers.models.resnet.modeling_flax_resnet import FlaxResNetModule
from transformers.models.vit.modeling_flax_vit import FlaxViTModule

import wrapkit

CONSOLE = {"width": 120}


@dataclasses.dataclass(frozen=True)
class Model:
    """A model factory and its inputs, abstract (for wrapkit) and concrete (for flax)."""

    make: Callable[[], nn.Module]
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    concrete: tuple[jax.Array, ...]


def tokens_model(make: Callable[[], nn.Module], length: int, count: int) -> Model:
    """A model of ``count`` int32 inputs of shape (1, length): ids, mask, positions."""
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    values = (
        jnp.zeros(ids.shape, ids.dtype),  # token ids
        jnp.ones(ids.shape, ids.dtype),  # attention mask: attend everywhere
        jnp.arange(length, dtype=ids.dtype)[None],  # position ids
    )
    return Model(make, (ids,) * count, values[:count])


def image_model(make: Callable[[], nn.Module], size: int) -> Model:
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return Model(make, (images,), (jnp.zeros(images.shape, images.dtype),))


def models(quick: bool) -> dict[str, Model]:
    if quick:  # the compatibility suite's configs
        gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
        bert = BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=16,
        )
        vit = ViTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
        resnet = ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"
        )
        length, size = 8, 16
    else:  # transformers' defaults are these models' base sizes
        gpt2, bert, vit, resnet = GPT2Config(), BertConfig(), ViTConfig(), ResNetConfig()
        length, size = 128, 224
    return {
        "GPT-2 small": tokens_model(lambda: FlaxGPT2LMHeadModule(gpt2), length, 3),
        "BERT-base": tokens_model(lambda: FlaxBertModule(bert), length, 2),
        "ViT-B/16": image_model(lambda: FlaxViTModule(vit), size),
        "ResNet-50": image_model(lambda: FlaxResNetModule(resnet), size),
    }


def contenders(model: Model) -> dict[str, Callable[[], str]]:
    key = jax.random.key(0)
    options: dict[str, Any] = {
        "compute_flops": True,
        "compute_vjp_flops": True,
        "console_kwargs": CONSOLE,
    }
    return {
        "wrapkit": lambda: wrapkit.tabulate(model.make(), key, **options)(*model.inputs),
        "flax": lambda: nn.tabulate(model.make(), key, **options)(*model.concrete),
    }


def seconds(fn: Callable[[], str]) -> float:
    gc.collect()  # no contender pays for the garbage of the one before
    start = time.perf_counter()
    table = fn()
    elapsed = time.perf_counter() - start
    if "vjp_flops" not in table:
        raise RuntimeError(f"not a table with VJP FLOPs:\n{table}")
    return elapsed


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measures, prints the table, and returns flax / wrapkit by model (NaN where flax failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke test")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}.")

    start = time.perf_counter()
    timed = {name: contenders(model) for name, model in models(args.quick).items()}
    failed: dict[str, str] = {}
    times: dict[tuple[str, str], list[float]] = {
        (name, tool): [] for name in timed for tool in ("wrapkit", "flax")
    }
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        for name, tools in timed.items():
            for tool, fn in tools.items():
                if (name, tool) in failed:
                    continue
                try:
                    elapsed = seconds(fn)
                except Exception as error:  # recorded, not raised: flax's failures are figures
                    if tool == "wrapkit":
                        raise
                    failed[(name, tool)] = f"{type(error).__name__}: {error}".splitlines()[0]
                    continue
                if round_:
                    times[(name, tool)].append(elapsed)

    mode = "QUICK: tiny configs" if args.quick else "batch 1"
    print(f"{mode}; {args.rounds} interleaved rounds after a warm-up, median seconds (min-max)\n")
    print("| model | wrapkit | flax | flax / wrapkit |")
    print("| --- | --- | --- | --- |")
    ratios = {}
    for name in timed:
        cells = []
        for tool in ("wrapkit", "flax"):
            values = times[(name, tool)]
            cells.append(
                f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
                if values
                else "failed"
            )
        if (name, "flax") in failed:
            ratios[name] = float("nan")
            ratio = f"flax failed: {failed[(name, 'flax')]}"
        else:
            ratios[name] = statistics.median(times[(name, "flax")]) / statistics.median(
                times[(name, "wrapkit")]
            )
            ratio = f"{ratios[name]:.2f}x"
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s")
    return ratios


if __name__ == "__main__":
    main()
