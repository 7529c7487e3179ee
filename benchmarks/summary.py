"""wrapkit.summary against flax's tabulate and against tracing the model once, in one process.

Figures (medians over interleaved repeats; every repeat builds a new model object and new
functions, so that jax's trace caches miss):

* GPT-2 small (12 layers, width 768, 12 heads, 128 int32 tokens, batch 1):
  - ``wrapkit.summary(model, ShapeDtypeStruct((1, 128), int32), vjp=True)``, abstract init
    included;
  - flax's ``model.tabulate(key, tokens, compute_flops=True, compute_vjp_flops=True)`` on
    concrete tokens;
  - ``jax.make_jaxpr`` of ``jax.vjp`` of the forward pass, on abstract variables made by
    ``jax.eval_shape(model.init, ...)`` outside the timed region: one trace of the forward
    pass, linearised (JVP and partial evaluation), the transpose not traced. For context,
    the same with the VJP function applied to a cotangent (the backward pass traced too).
  Ratios flax / wrapkit (target >= 10x) and wrapkit / make_jaxpr (target <= 2.5x), and the
  forward and VJP FLOP totals of both tools next to XLA's cost analysis of the lowered
  program (untimed).
* Depth: wrapkit.summary(vjp=True) on 48 layers / on 12 layers (target <= 4.5x), next to the
  same ratio for make_jaxpr of the VJP.
* Llama-7B-like (32 layers, width 4096, 2048 tokens, vocab 32000), abstract: peak resident
  memory (VmHWM; see ``peak_rss_mb`` for why not only ru_maxrss) and wall time of a child
  process that runs wrapkit.summary(vjp=True), next to a child that only imports jax, flax and
  wrapkit (target: peak < 2 GB).

Run:  python benchmarks/summary.py [--repeats 5] [--quick]
(--quick: tiny models, a smoke test that finishes in seconds; its figures are not the targets'.)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# The examples are a folder of scripts, not an installed package.
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import wrapkit  # noqa: E402
from examples import gpt2, llama  # noqa: E402

TARGETS = {
    "flax / wrapkit": (">=", 10.0),
    "wrapkit / make_jaxpr": ("<=", 2.5),
    "depth": ("<=", 4.5),
    "llama peak MB": ("<", 2000.0),
}


def seconds(fn: Callable[[], Any]) -> float:
    # Each contender starts with no garbage left by the one before (flax's tabulate leaves
    # much), so that no run pays for another's collection.
    gc.collect()
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process, in MB (10^6 bytes), measured two ways.

    ``ru_maxrss`` (KiB on Linux) is the maximum over the process's life *including the
    parent's resident set at the fork*: Linux carries it across ``exec``, so a child of this
    benchmark reports at least the benchmark's own footprint. ``VmHWM`` in
    ``/proc/self/status`` is the high-water mark of the child's own address space, which
    starts afresh at ``exec``; it is the figure reported.
    """
    peaks = {"ru_maxrss MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}
    status = pathlib.Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []  # Linux only
    hwm = [line for line in lines if line.startswith("VmHWM:")]
    peaks["peak MB"] = int(hwm[0].split()[1]) * 1024 / 1e6 if hwm else math.nan
    return peaks


def xla_flops(fn: Callable[..., Any], *args: Any) -> int:
    """XLA's FLOP count of ``fn`` lowered (not compiled), as flax's tabulate counts."""
    return int(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def flax_root_flops(table: str) -> dict[str, int]:
    """The flops and vjp_flops columns of flax's table: its root row, and its depth-1 rows summed.

    flax's tabulate returns only the rendered table, so the numbers are read back from it.
    """
    lines = table.splitlines()
    header = next(line for line in lines if "vjp_flops" in line)
    columns = [cell.strip() for cell in header.split("┃")]
    flops, vjp = columns.index("flops"), columns.index("vjp_flops")
    # A row's first line follows a rule (┡ after the header, ├ between rows).
    starts = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith(("┡", "├"))]
    rows = [[cell.strip() for cell in line.split("│")] for line in starts]
    root = rows[0]
    children = [row for row in rows[1:] if row[1] and "/" not in row[1]]
    return {
        "flax flops": int(root[flops]),
        "flax vjp_flops": int(root[vjp]),
        "flax depth-1 rows flops": sum(int(row[flops]) for row in children),
        "flax depth-1 rows vjp_flops": sum(int(row[vjp]) for row in children),
    }


def gpt2_figures(
    model: Callable[[], nn.Module],
    deep: Callable[[], nn.Module],
    length: int,
    repeats: int,
    tabulate_repeats: int,
    warm_up: bool = True,
) -> dict[str, float]:
    """Times wrapkit.summary, flax's tabulate and make_jaxpr side by side; see the module doc."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    concrete = jnp.zeros(tokens.shape, tokens.dtype)
    key = jax.random.key(0)
    # Outside the timed region: (c) starts from abstract variables.
    variables = jax.eval_shape(model().init, key, tokens)
    deep_variables = jax.eval_shape(deep().init, key, tokens)
    vocab = model().config.vocab_size
    cotangent = jax.ShapeDtypeStruct((1, length, vocab), jnp.float32)
    console = {"width": 400, "force_terminal": False, "no_color": True}

    def summarise(factory: Callable[[], nn.Module]) -> Callable[[], Any]:
        return lambda: wrapkit.summary(factory(), tokens, vjp=True)

    def tabulate() -> str:
        return model().tabulate(
            key, concrete, compute_flops=True, compute_vjp_flops=True, console_kwargs=console
        )

    def vjp_jaxpr(factory: Callable[[], nn.Module], variables: Any) -> Callable[[], Any]:
        def trace() -> Any:
            m = factory()
            return jax.make_jaxpr(lambda v, x: jax.vjp(lambda v: m.apply(v, x), v))(
                variables, tokens
            )

        return trace

    def vjp_backward_jaxpr() -> Any:
        m = model()

        def backward(v: Any, x: jax.Array, ct: jax.Array) -> Any:
            return jax.vjp(lambda v: m.apply(v, x), v)[1](ct)

        return jax.make_jaxpr(backward)(variables, tokens, cotangent)

    timed: dict[str, Callable[[], Any]] = {
        "wrapkit": summarise(model),
        "make_jaxpr": vjp_jaxpr(model, variables),
        "make_jaxpr fwd+bwd": vjp_backward_jaxpr,
        "wrapkit deep": summarise(deep),
        "make_jaxpr deep": vjp_jaxpr(deep, deep_variables),
    }
    if warm_up:
        for fn in timed.values():
            fn()  # untimed: lazy imports and one-off initialisation, not caches
    times: dict[str, list[float]] = {name: [] for name in [*timed, "flax"]}
    table = ""
    for repeat in range(repeats):
        for name, fn in timed.items():
            times[name].append(seconds(fn))
        if repeat < tabulate_repeats:
            gc.collect()
            start = time.perf_counter()
            table = tabulate()
            times["flax"].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}

    # References for the FLOP totals, untimed: XLA's cost analysis of the lowered program.
    m = model()

    def forward_and_back(v: Any, x: jax.Array) -> Any:
        out, pullback = jax.vjp(lambda v: m.apply(v, x), v)
        return pullback(out)

    xla = {
        "xla flops": xla_flops(lambda v, x: m.apply(v, x), variables, tokens),
        "xla vjp_flops": xla_flops(forward_and_back, variables, tokens),
    }
    summary = wrapkit.summary(model(), tokens, vjp=True)
    attend = [row for row in summary.rows if row.path == ("wte",) and row.method == "attend"]
    return {
        "flax / wrapkit": median["flax"] / median["wrapkit"],
        "wrapkit / make_jaxpr": median["wrapkit"] / median["make_jaxpr"],
        "wrapkit / make_jaxpr fwd+bwd": median["wrapkit"] / median["make_jaxpr fwd+bwd"],
        "depth": median["wrapkit deep"] / median["wrapkit"],
        "depth, make_jaxpr": median["make_jaxpr deep"] / median["make_jaxpr"],
        **{f"seconds: {name}": value for name, value in median.items()},
        **{f"seconds min: {name}": min(values) for name, values in times.items()},
        **{f"seconds max: {name}": max(values) for name, values in times.items()},
        "wrapkit flops": summary.flops,
        "wrapkit vjp_flops": summary.vjp_flops,
        "wrapkit wte.attend flops": attend[0].flops if attend else math.nan,
        **flax_root_flops(table),
        **xla,
    }


def child(kind: str, quick: bool) -> None:
    """Runs in a subprocess: prints one JSON line with its peak memory and timings."""
    result: dict[str, float] = {}
    if kind == "llama":
        model = llama.llama_tiny() if quick else llama.llama_7b()
        tokens = jax.ShapeDtypeStruct((1, model.config.max_seq_len), jnp.int32)
        start = time.perf_counter()
        summary = wrapkit.summary(model, tokens, vjp=True)
        result = {
            "seconds": time.perf_counter() - start,
            "flops": summary.flops,
            "vjp_flops": summary.vjp_flops,
        }
    print(json.dumps({**peak_rss_mb(), **result}))


def run_child(kind: str, quick: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", kind] + (["--quick"] if quick else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.splitlines()[-1]), "wall s": time.perf_counter() - start}


def verdict(name: str, value: float) -> tuple[str, str]:
    relation, target = TARGETS[name]
    passed = {">=": value >= target, "<=": value <= target, "<": value < target}[relation]
    return f"{relation} {target:g}", "PASS" if passed else "FAIL"


def report(figures: dict[str, float], setup: dict[str, str]) -> None:
    print(
        f"wrapkit.summary benchmark, backend {jax.default_backend()}, jax {jax.__version__}, "
        f"{setup['mode']}\n"
    )
    rows = [
        ("flax / wrapkit", f"tabulate / summary, {setup['gpt2']}"),
        ("wrapkit / make_jaxpr", f"summary / make_jaxpr(vjp), {setup['gpt2']}"),
        ("depth", f"summary at {setup['depth']}"),
        ("llama peak MB", f"peak RSS of the child summarising {setup['llama']}"),
    ]
    print("| figure | measured | target | verdict |")
    print("| --- | --- | --- | --- |")
    for name, description in rows:
        value = figures[name]
        shown = f"{value:,.0f} MB" if name.endswith("MB") else f"{value:.2f}x"
        target, passed = verdict(name, value)
        print(f"| {name}: {description} | {shown} | {target} | {passed} |")

    timings = [name.removeprefix("seconds: ") for name in figures if name.startswith("seconds: ")]
    print(
        "\nseconds, median (min-max): "
        + ", ".join(
            f"{name} {figures['seconds: ' + name]:.3f} "
            f"({figures['seconds min: ' + name]:.3f}-{figures['seconds max: ' + name]:.3f})"
            for name in timings
        )
    )
    print(
        f"wrapkit / make_jaxpr with the backward pass traced too: "
        f"{figures['wrapkit / make_jaxpr fwd+bwd']:.2f}x; depth ratio of make_jaxpr(vjp) "
        f"itself, {setup['depth']}: {figures['depth, make_jaxpr']:.2f}x"
    )
    print(
        f"llama child: summary {figures['llama summary s']:.2f} s, whole process "
        f"{figures['llama wall s']:.2f} s; a child that only imports jax, flax and wrapkit "
        f"peaks at {figures['baseline peak MB']:,.0f} MB (VmHWM). ru_maxrss, which counts "
        f"this parent's memory at the fork: {figures['llama ru_maxrss MB']:,.0f} MB and "
        f"{figures['baseline ru_maxrss MB']:,.0f} MB"
    )
    print(f"\nFLOPs ({setup['gpt2']}):")
    print("| | forward | VJP |")
    print("| --- | --- | --- |")
    for label, key in (
        ("wrapkit.summary total", "wrapkit"),
        ("flax tabulate, root row", "flax"),
        ("flax tabulate, depth-1 rows summed", "flax depth-1 rows"),
        ("XLA cost analysis of apply, and of its VJP", "xla"),
    ):
        print(f"| {label} | {figures[key + ' flops']:,.0f} | {figures[key + ' vjp_flops']:,.0f} |")
    print(f"| wrapkit row wte (attend) | {figures['wrapkit wte.attend flops']:,.0f} | |")
    print(
        f"\n{setup['llama']}: forward {figures['llama flops']:,.0f} FLOPs, "
        f"VJP {figures['llama vjp_flops']:,.0f} FLOPs (wrapkit.summary)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measures, prints the table, and returns every figure by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--child", choices=["llama", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")
    if args.child:
        child(args.child, args.quick)
        return {}

    if args.quick:
        shallow, deep, length = 2, 8, 32
        base = {"vocab_size": 512, "n_positions": 128, "d_model": 64, "n_head": 4}
        setup = {
            "mode": "QUICK: tiny models, figures not comparable with the targets",
            "gpt2": "gpt2_tiny, 32 tokens",
            "depth": "8 / 2 layers (gpt2_tiny)",
            "llama": "llama_tiny, 128 tokens",
        }
    else:
        shallow, deep, length = 12, 48, 128
        base = {}
        setup = {
            "mode": f"{args.repeats} repeats",
            "gpt2": "GPT-2 small, 128 tokens",
            "depth": "48 / 12 layers (GPT-2 small)",
            "llama": "Llama-7B-like, 2048 tokens",
        }
    figures = gpt2_figures(
        lambda: gpt2.gpt2(**base, n_layer=shallow),
        lambda: gpt2.gpt2(**base, n_layer=deep),
        length,
        args.repeats,
        tabulate_repeats=min(args.repeats, 2),
        warm_up=not args.quick,
    )
    baseline, summarised = run_child("baseline", args.quick), run_child("llama", args.quick)
    figures |= {
        "llama peak MB": summarised["peak MB"],
        "llama summary s": summarised["seconds"],
        "llama wall s": summarised["wall s"],
        "llama flops": summarised["flops"],
        "llama vjp_flops": summarised["vjp_flops"],
        "llama ru_maxrss MB": summarised["ru_maxrss MB"],
        "baseline peak MB": baseline["peak MB"],
        "baseline ru_maxrss MB": baseline["ru_maxrss MB"],
    }
    report(figures, setup)
    return figures


if __name__ == "__main__":
    main()
