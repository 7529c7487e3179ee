"""wrapkit.summary of NNX models against nnx.tabulate and against tracing the model once.

Figures (medians over interleaved repeats, in one process; model construction is outside
every timed region):

* GPT-2 small in NNX (12 layers, width 768, 12 heads, 128 int32 tokens, batch 1, the LM head
  tied to the token embedding through ``nnx.Embed.attend``):
  - ``wrapkit.summary(abstract_model, ShapeDtypeStruct((1, 128), int32), vjp=True)`` on a
    model from ``nnx.eval_shape``;
  - ``nnx.tabulate(concrete_model, tokens, compute_flops=True, compute_vjp_flops=True)`` on
    a concrete model and concrete tokens (it needs both);
  - ``jax.make_jaxpr`` of ``jax.vjp`` of the forward pass through ``nnx.split`` /
    ``nnx.merge``, with respect to the Params, on the abstract model.
  Ratios nnx.tabulate / wrapkit (target >= 10x) and wrapkit / make_jaxpr (target <= 1.5x),
  and the FLOP totals of both tools.
* Llama-7B-like in NNX (32 layers, width 4096, 32 heads, SwiGLU 11008, vocab 32000, 2048
  tokens; no rotary embedding), from ``nnx.eval_shape``: peak resident memory (VmHWM) and
  wall time of a child process that runs wrapkit.summary(vjp=True) (target: peak < 1 GB).

Run:  python benchmarks/summary_nnx.py [--repeats 3] [--quick]
(--quick: tiny models, a smoke test; its figures are not the targets'.)
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wrapkit  # noqa: E402

TARGETS = {
    "nnx.tabulate / wrapkit": (">=", 10.0),
    "wrapkit / make_jaxpr": ("<=", 1.5),
    "llama peak MB": ("<", 1000.0),
}


@dataclass(frozen=True)
class Config:
    vocab: int
    width: int
    heads: int
    layers: int
    positions: int = 1024
    hidden: int | None = None  # SwiGLU width (Llama); None: 4 x width GELU MLP (GPT-2)


GPT2_SMALL = Config(vocab=50257, width=768, heads=12, layers=12)
GPT2_TINY = Config(vocab=256, width=64, heads=4, layers=2, positions=64)
LLAMA_7B = Config(vocab=32000, width=4096, heads=32, layers=32, positions=0, hidden=11008)
LLAMA_TINY = Config(vocab=256, width=64, heads=4, layers=2, positions=0, hidden=172)


class Attention(nnx.Module):
    """Causal self-attention with GPT-2's fused projection (nnx.MultiHeadAttention passes
    keyword arguments to its projections, on which nnx.tabulate's VJP column crashes)."""

    def __init__(self, config: Config, use_bias: bool, rngs: nnx.Rngs):
        self.heads = config.heads
        self.c_attn = nnx.Linear(config.width, 3 * config.width, use_bias=use_bias, rngs=rngs)
        self.c_proj = nnx.Linear(config.width, config.width, use_bias=use_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(shape[-1]).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e10), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return self.c_proj(out)


class Block(nnx.Module):
    def __init__(self, config: Config, rngs: nnx.Rngs):
        llama = config.hidden is not None
        norm = nnx.RMSNorm if llama else nnx.LayerNorm
        self.ln_1 = norm(config.width, rngs=rngs)
        self.attn = Attention(config, use_bias=not llama, rngs=rngs)
        self.ln_2 = norm(config.width, rngs=rngs)
        if config.hidden is not None:
            self.gate = nnx.Linear(config.width, config.hidden, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(config.width, config.hidden, use_bias=False, rngs=rngs)
            self.down = nnx.Linear(config.hidden, config.width, use_bias=False, rngs=rngs)
        else:
            self.fc = nnx.Linear(config.width, 4 * config.width, rngs=rngs)
            self.proj = nnx.Linear(4 * config.width, config.width, rngs=rngs)
        self.llama = llama

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if self.llama:
            h = self.down(nnx.silu(self.gate(h)) * self.up(h))
        else:
            h = self.proj(nnx.gelu(self.fc(h)))
        return x + h


class LM(nnx.Module):
    """GPT-2 (learned positions, tied head) or Llama-like (RMSNorm, SwiGLU, own head)."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.wte = nnx.Embed(config.vocab, config.width, rngs=rngs)
        self.wpe = (
            nnx.Embed(config.positions, config.width, rngs=rngs) if config.positions else None
        )
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.layers)])
        norm = nnx.RMSNorm if config.hidden is not None else nnx.LayerNorm
        self.ln_f = norm(config.width, rngs=rngs)
        self.head = (
            nnx.Linear(config.width, config.vocab, use_bias=False, rngs=rngs)
            if config.hidden is not None
            else None
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.head(x) if self.head is not None else self.wte.attend(x)


def seconds(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def gpt2_figures(config: Config, length: int, repeats: int) -> dict[str, float]:
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    concrete_tokens = jnp.zeros(tokens.shape, tokens.dtype)
    abstract = nnx.eval_shape(lambda: LM(config, nnx.Rngs(0)))
    concrete = LM(config, nnx.Rngs(0))
    console = {"width": 400, "force_terminal": False, "no_color": True}

    def summarise() -> Any:
        return wrapkit.summary(abstract, tokens, vjp=True)

    def tabulate() -> Any:
        return nnx.tabulate(
            concrete,
            concrete_tokens,
            compute_flops=True,
            compute_vjp_flops=True,
            console_kwargs=console,
        )

    def vjp_jaxpr() -> Any:
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

        def forward(params: Any, rest: Any, x: Any) -> Any:
            return jax.vjp(lambda p: nnx.merge(graphdef, p, rest)(x), params)

        return jax.make_jaxpr(forward)(params, rest, tokens)

    timed = {"wrapkit": summarise, "make_jaxpr": vjp_jaxpr, "nnx.tabulate": tabulate}
    for fn in timed.values():
        fn()  # untimed: lazy imports and one-off initialisation
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            times[name].append(seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = summarise()
    return {
        "nnx.tabulate / wrapkit": median["nnx.tabulate"] / median["wrapkit"],
        "wrapkit / make_jaxpr": median["wrapkit"] / median["make_jaxpr"],
        **{f"seconds: {name}": value for name, value in median.items()},
        "wrapkit flops": result.flops,
        "wrapkit vjp_flops": result.vjp_flops or 0,
        "wrapkit wte.attend flops": result.find("wte", "attend")[0].flops,
    }


def child(quick: bool) -> None:
    start = time.perf_counter()
    config = LLAMA_TINY if quick else LLAMA_7B
    length = 128 if quick else 2048
    model = nnx.eval_shape(lambda: LM(config, nnx.Rngs(0)))
    result = wrapkit.summary(model, jax.ShapeDtypeStruct((1, length), jnp.int32), vjp=True)
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    hwm = next(line for line in status if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "llama peak MB": int(hwm.split()[1]) * 1024 / 1e6,
                "llama seconds": time.perf_counter() - start,
                "llama params": result.variables["Param"].count,
                "llama flops": result.flops,
                "llama vjp_flops": result.vjp_flops,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.quick)
        return
    config, length = (GPT2_TINY, 32) if args.quick else (GPT2_SMALL, 128)
    figures = gpt2_figures(config, length, args.repeats)
    command = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
    mode = "QUICK: tiny models, figures not comparable with the targets" if args.quick else ""
    print(f"wrapkit.summary NNX benchmark, backend {jax.default_backend()}, jax {jax.__version__}")
    if mode:
        print(mode)
    print("\n| figure | measured | target | verdict |\n| --- | --- | --- | --- |")
    for name, (op, target) in TARGETS.items():
        value = figures[name]
        ok = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        shown = f"{value:.0f} MB" if name.endswith("MB") else f"{value:.2f}x"
        print(f"| {name} | {shown} | {op} {target:g} | {'PASS' if ok else 'FAIL'} |")
    print()
    for name, value in figures.items():
        if name not in TARGETS:
            print(f"{name}: {value:,.3f}" if isinstance(value, float) else f"{name}: {value:,}")


if __name__ == "__main__":
    main()
