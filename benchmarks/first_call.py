"""The first ``tabulate`` call in a fresh process: wrapkit's against flax's, on GPT-2 small.

What a user runs once is the first call, and a fresh process pays for everything jax, flax
and wrapkit do lazily the first time (tracing machinery, rule tables, rich's setup). Each
round starts two fresh subprocesses, one per tool, in alternating order (wrapkit, flax,
wrapkit, flax, ...). Each child:

1. imports jax, flax and the model (``examples/gpt2.py``, which imports wrapkit's Linen
   wrappers) and, for wrapkit, ``wrapkit``: timed and reported as import time;
2. builds the model (``gpt2_small``: 12 layers, width 768, vocab 50257), the key and
   concrete ``int32[1, 128]`` tokens, which also starts jax's CPU backend: untimed;
3. times the first call of the user's line,
   ``tabulate(model, key, compute_flops=True, compute_vjp_flops=True)(tokens)``, with
   ``wrapkit.tabulate`` or ``flax.linen.tabulate`` (``gc.collect()`` just before);
4. times a second, warm call of a new ``tabulate(...)`` function on the same model.

Both tools render with rich's defaults; the children get ``COLUMNS=120`` so that the console
is the same width whatever the parent's terminal. Reported: medians over the rounds of each
figure, and flax / wrapkit for the first and the warm call (target: first call >= 12x).

``--profile FILE`` runs one wrapkit child under pyinstrument (``pip install pyinstrument``)
and writes its text report of the first call to FILE instead of timing rounds.

Run:  python benchmarks/first_call.py [--rounds 5] [--quick] [--profile FILE]
(--quick: gpt2_tiny, a smoke test that finishes in seconds; its figures are not the target's.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = ("wrapkit", "flax")
TARGET = 12.0


def child(tool: str, quick: bool, profile: str | None) -> None:
    """Runs in a fresh subprocess: prints one JSON line of timings for ``tool``."""
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))  # the examples are a folder of scripts, not a package
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from examples import gpt2

    if tool == "wrapkit":
        import wrapkit

        tabulate = wrapkit.tabulate
    else:
        tabulate = nn.tabulate
    imported = time.perf_counter()

    model = gpt2.gpt2_tiny() if quick else gpt2.gpt2_small()
    key = jax.random.key(0)
    tokens = jax.block_until_ready(jnp.zeros((1, 32 if quick else 128), jnp.int32))
    built = time.perf_counter()

    def call() -> tuple[float, str]:
        gc.collect()
        begin = time.perf_counter()
        table = tabulate(model, key, compute_flops=True, compute_vjp_flops=True)(tokens)
        return time.perf_counter() - begin, table

    if profile:
        import pyinstrument

        profiler = pyinstrument.Profiler(interval=0.001)
        profiler.start()
        first, table = call()
        profiler.stop()
        pathlib.Path(profile).write_text(profiler.output_text(unicode=True, show_all=False))
        print(json.dumps({"first s": first}))
        return
    first, table = call()
    warm, again = call()
    if "vjp_flops" not in table or table != again:
        raise RuntimeError(f"{tool}: unexpected table:\n{table}\n{again}")
    print(
        json.dumps(
            {
                "import s": imported - start,
                "build s": built - imported,
                "first s": first,
                "warm s": warm,
                "table lines": table.count("\n"),
            }
        )
    )


def run_child(tool: str, quick: bool, profile: str | None = None) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", tool]
    command += ["--quick"] if quick else []
    command += ["--profile", profile] if profile else []
    env = {**os.environ, "COLUMNS": "120"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.splitlines()[-1]), "process s": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the rounds, prints the table, and returns every figure by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="gpt2_tiny: a smoke test")
    parser.add_argument("--profile", metavar="FILE", help="profile one wrapkit first call")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}.")
    if args.child:
        child(args.child, args.quick, args.profile)
        return {}
    if args.profile:
        result = run_child("wrapkit", args.quick, args.profile)
        print(f"wrapkit first call {result['first s']:.3f} s; profile in {args.profile}")
        return result

    runs: dict[str, list[dict[str, float]]] = {tool: [] for tool in TOOLS}
    for _ in range(args.rounds):
        for tool in TOOLS:
            runs[tool].append(run_child(tool, args.quick))
    median = {
        tool: {name: statistics.median(run[name] for run in results) for name in results[0]}
        for tool, results in runs.items()
    }
    figures = {
        "first call flax / wrapkit": median["flax"]["first s"] / median["wrapkit"]["first s"],
        "warm call flax / wrapkit": median["flax"]["warm s"] / median["wrapkit"]["warm s"],
        **{f"{tool} {name}": value for tool in TOOLS for name, value in median[tool].items()},
    }
    model = "gpt2_tiny, 32 tokens (QUICK)" if args.quick else "GPT-2 small, 128 tokens"
    print(f"{model}; {args.rounds} rounds of fresh processes, medians (min-max)\n")
    print("| seconds | wrapkit | flax | flax / wrapkit |")
    print("| --- | --- | --- | --- |")
    for name, label in (
        ("first s", "first call"),
        ("warm s", "second (warm) call"),
        ("import s", "imports"),
        ("build s", "model, key, tokens"),
        ("process s", "whole child process"),
    ):
        cells = [
            f"{median[tool][name]:.2f} ({min(r[name] for r in runs[tool]):.2f}-"
            f"{max(r[name] for r in runs[tool]):.2f})"
            for tool in TOOLS
        ]
        ratio = median["flax"][name] / median["wrapkit"][name]
        print(f"| {label} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    ratio = figures["first call flax / wrapkit"]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"\nfirst call flax / wrapkit: {ratio:.2f}x (target >= {TARGET:g}x): {verdict}")
    return figures


if __name__ == "__main__":
    main()
