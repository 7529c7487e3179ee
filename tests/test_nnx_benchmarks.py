"""The NNX benchmarks' quick modes: what they compare holds (FLOPs), never how fast."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_benchmark(name: str, file: str) -> types.ModuleType:
    """A script of benchmarks/ (a folder of scripts, not a package) as a module, registered
    in ``sys.modules`` first, as tests/test_examples.py's ``_load_script`` does."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_wrapped_nnx_train_steps_compile_to_the_flops_of_hand_written_ones():
    benchmark = _load_benchmark("nnx_train_step_benchmark", "nnx_train_step.py")
    results = benchmark.main(["--quick", "--rounds", "1"])
    eager = results.pop("eager forward")
    assert set(results) == set(benchmark.WRAPPED)
    for kind, result in results.items():
        assert result["wrapkit flops"] == result["hand flops"] > 0, kind
        assert math.isfinite(result["time ratio"]) and result["time ratio"] > 0, kind
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in eager.values())
