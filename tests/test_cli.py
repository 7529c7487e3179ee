"""The command line: ``python -m wrapkit summary PACKAGE.MODULE:FACTORY --input ...``."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from cli_models import tiny

import wrapkit
from wrapkit._summary.cli import input_spec, main

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def in_tests_directory(monkeypatch):
    """Targets are given relative to the working directory, as `python -m` users do."""
    monkeypatch.chdir(HERE)
    monkeypatch.syspath_prepend(str(HERE))


def run(capsys, *argv):
    status = main(["summary", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: python -m wrapkit")
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    ("spec", "shape", "dtype"),
    [
        ("8x224x224x3", (8, 224, 224, 3), jnp.float32),
        ("1x128:int32", (1, 128), jnp.int32),
        ("4:bfloat16", (4,), jnp.bfloat16),
        ("2x2:bool", (2, 2), jnp.bool_),
        ("scalar", (), jnp.float32),
        ("scalar:int8", (), jnp.int8),
    ],
    ids=["image", "tokens", "bfloat16", "bool", "scalar", "scalar-int8"],
)
def test_input_specs(spec, shape, dtype):
    assert input_spec(spec) == jax.ShapeDtypeStruct(shape, dtype)


def expected(*inputs, **options):
    return wrapkit.summary(
        tiny(),
        *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in inputs),
        **options,
    )


def test_json_is_the_summary_of_the_same_inputs(capsys):
    status, out, err = run(capsys, "cli_models:tiny", "--input", "4x3", "--vjp", "--format", "json")
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert data == expected(((4, 3), jnp.float32), vjp=True).to_dict()
    assert data["vjp_flops"] > data["flops"] > 0
    assert {"proj", "proj/layer_instance", "head"} <= {row["path"] for row in data["rows"]}


def test_markdown_with_depth(capsys):
    status, out, _ = run(
        capsys, "cli_models:tiny", "--input", "4x3", "--format", "markdown", "--depth", "1"
    )
    assert status == 0
    summary = expected(((4, 3), jnp.float32))
    assert out == summary.to_markdown(1)
    assert all(f"| {row.name} |" not in out for row in summary.rows if row.depth > 1)


def test_table_is_the_default_format(capsys):
    status, out, _ = run(capsys, "cli_models:tiny", "--input", "4x3")
    assert status == 0
    assert (
        "Tiny Summary" in out and "Total Parameters: 58 (232 B)" in out and "vjp_flops" not in out
    )


def test_method_picks_the_method(capsys):
    status, out, _ = run(
        capsys, "cli_models:tiny", "--input", "4x3", "--method", "encode", "--format", "json"
    )
    assert status == 0
    data = json.loads(out)
    assert data == expected(((4, 3), jnp.float32), method="encode").to_dict()
    assert ("", "encode") in [(row["path"], row["method"]) for row in data["rows"]]
    assert "head" not in [row["path"] for row in data["rows"]]


def test_trace_failure_exits_1_naming_the_module(capsys):
    status, out, err = run(capsys, "cli_models:tiny", "--input", "scalar")
    assert (status, out) == (1, "")
    assert err.startswith("python -m wrapkit summary: error: wrapkit.summary failed")
    assert "Tiny" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cli_models"], r"target 'cli_models' has no ':' between the module and the factory"),
        ([":tiny"], r"target ':tiny' has no module name; write PACKAGE\.MODULE:FACTORY"),
        (["cli_models:"], r"target 'cli_models:' has no factory name"),
        (["cli_models:ti-ny"], r"'cli_models:ti-ny' is not a module and attribute name"),
        (["no_such_module:tiny"], r"cannot import 'no_such_module' \(No module named"),
        (["cli_models:tinyy"], r"'cli_models' has no attribute 'tinyy'; did you mean tiny"),
        (["cli_models:NOT_CALLABLE"], r"cli_models:NOT_CALLABLE is not callable \(got int\)"),
        (["cli_models:INSTANCE"], r"cli_models:INSTANCE is a Tiny instance, not a factory"),
        (["cli_models:takes_width"], r"cannot be called without arguments \(missing a required"),
        (["cli_models:not_a_module"], r"returned int, not a flax\.linen\.Module"),
        (["cli_models:tiny", "--method", "decode"], r"Tiny has no method 'decode'"),
        (["cli_models:tiny", "--input", "8xx3"], r"--input: '8xx3' has bad dimensions \[''\]"),
        (["cli_models:tiny", "--input", "0x3"], r"'0x3' has bad dimensions \['0'\]: dimensions"),
        (["cli_models:tiny", "--input", "8x-3"], r"'8x-3' has bad dimensions \['-3'\]"),
        (["cli_models:tiny", "--input", "8X3"], r"'8X3' has bad dimensions \['8X3'\]"),
        (["cli_models:tiny", "--input", ":int32"], r"':int32' has no shape; write e\.g\. 8x224"),
        (["cli_models:tiny", "--input", "8x3:"], r"'8x3:' has an empty dtype after ':'"),
        (["cli_models:tiny", "--input", "8x3:flaot32"], r"unknown dtype 'flaot32': use a numpy"),
        (["cli_models:tiny", "--input", "8x3:object"], r"'8x3:object' has unknown dtype 'object'"),
        (["cli_models:tiny", "--depth", "-1"], r"argument --depth: '-1' is not a depth"),
        (["cli_models:tiny", "--format", "yaml"], r"argument --format: invalid choice: 'yaml'"),
        ([], r"the following arguments are required: PACKAGE\.MODULE:FACTORY"),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-factory",
        "bad-name",
        "not-importable",
        "no-attribute",
        "not-callable",
        "module-instance",
        "needs-arguments",
        "not-a-module",
        "no-method",
        "empty-dimension",
        "zero-dimension",
        "negative-dimension",
        "capital-x",
        "no-shape",
        "empty-dtype",
        "unknown-dtype",
        "non-numeric-dtype",
        "negative-depth",
        "unknown-format",
        "no-target",
    ],
)
def test_malformed_arguments_exit_2_with_usage_and_a_specific_error(capsys, argv, message):
    last_line = usage_error(capsys, "summary", *argv)
    assert last_line.startswith("python -m wrapkit summary: error: ")
    assert re.search(message, last_line), last_line


def test_a_command_is_required(capsys):
    last_line = usage_error(capsys)
    assert last_line == "python -m wrapkit: error: the following arguments are required: COMMAND"


def test_python_dash_m_entry_point():
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "wrapkit",
            "summary",
            "cli_models:tiny",
            "--input",
            "2x3",
            "--format",
            "json",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["module_type"] == "Tiny"
