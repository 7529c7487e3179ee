"""The command line: ``python -m wrapkit summary PACKAGE.MODULE:FACTORY --input ...``."""

import json
import pathlib
import shutil
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


def failure(capsys, *argv, status=2):
    """The one line a failing command prints, after checking that it is all it prints."""
    assert main(list(argv)) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback or usage
    assert err.startswith("wrapkit: error: ")
    return err[len("wrapkit: error: ") : -1]


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


def test_table_fits_the_width_and_keeps_the_numbers(capsys):
    status, out, _ = run(capsys, "cli_models:wide", "--input", "64x1024", "--vjp", "--width", "60")
    assert status == 0
    assert max(len(line) for line in out.splitlines()) <= 60
    assert "…" not in out
    assert "Wide Summary" in out and "vjp_flops" in out and "layer_2" in out


def test_trace_failure_exits_1_with_the_first_line_of_the_error(capsys):
    message = failure(capsys, "summary", "cli_models:fails", "--input", "4x3", status=1)
    assert message == (
        "wrapkit.summary failed while initialising Fails, in Fails at path '<root>' "
        "(__call__) with inputs [['float32[4, 3]'], {}]: ValueError: Incompatible shapes for "
        "broadcasting: shapes=[(4, 3), (7,)]"
    )


def test_a_factory_that_raises_exits_1_with_its_error_in_one_line(capsys):
    message = failure(capsys, "summary", "cli_models:raises", status=1)
    assert message == "cli_models:raises() raised RuntimeError: no checkpoint at /tmp/x"


def test_a_module_that_fails_to_import_exits_1_with_its_error(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_models.py").write_text("raise KeyError('MODEL_DIR')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = failure(capsys, "summary", "broken_models:tiny", status=1)
    assert message == "importing 'broken_models' raised KeyError: 'MODEL_DIR'"


FORM = "write PACKAGE.MODULE:FACTORY, e.g. examples.gpt2:gpt2_small"
SPEC = "write e.g. 8x224x224x3, 1x128:int32 or scalar:float32"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["cli_models"],
            f"target 'cli_models' has no ':' between the module and the factory; {FORM}",
        ),
        ([":tiny"], f"target ':tiny' has no module name; {FORM}"),
        (["cli_models:"], f"target 'cli_models:' has no factory name; {FORM}"),
        (
            ["cli_models:ti-ny"],
            f"target 'cli_models:ti-ny' is not a module and attribute name; {FORM}",
        ),
        (
            ["no_such_module:tiny"],
            "cannot import 'no_such_module' (No module named 'no_such_module'); run from the "
            "directory that contains it, or install its package",
        ),
        (["cli_models:tinyy"], "'cli_models' has no attribute 'tinyy'; did you mean tiny, Tiny?"),
        (["cli_models:nothing_like_it"], "'cli_models' has no attribute 'nothing_like_it'"),
        (
            ["cli_models:NOT_CALLABLE"],
            "cli_models:NOT_CALLABLE is not callable (got int); FACTORY must be a zero-argument "
            "function (or class) that returns a Linen module",
        ),
        (
            ["cli_models:INSTANCE"],
            "cli_models:INSTANCE is a Tiny instance, not a factory; FACTORY must be a "
            "zero-argument function that returns the module",
        ),
        (
            ["cli_models:takes_width"],
            "cli_models:takes_width cannot be called without arguments (missing a required "
            "argument: 'width'); FACTORY must take no arguments: wrap it in a function that "
            "fills them in",
        ),
        (
            ["cli_models:not_a_module"],
            "cli_models:not_a_module() returned int, not a flax.linen.Module; FACTORY must "
            "return a Linen module",
        ),
        (
            ["cli_models:tiny", "--method", "decode"],
            "--method decode: Tiny has no method 'decode'; pass one of its methods (encode), "
            "or leave --method out for __call__",
        ),
        (
            ["cli_models:tiny", "--input", "8xx3"],
            "argument --input: '8xx3' has bad dimensions ['']: dimensions are positive "
            f"integers joined by 'x'; {SPEC}",
        ),
        (
            ["cli_models:tiny", "--input", "0x3"],
            "argument --input: '0x3' has bad dimensions ['0']: dimensions are positive "
            f"integers joined by 'x'; {SPEC}",
        ),
        (
            ["cli_models:tiny", "--input", "8x-3"],
            "argument --input: '8x-3' has bad dimensions ['-3']: dimensions are positive "
            f"integers joined by 'x'; {SPEC}",
        ),
        (
            ["cli_models:tiny", "--input", "8X3"],
            "argument --input: '8X3' has bad dimensions ['8X3']: dimensions are positive "
            f"integers joined by 'x'; {SPEC}",
        ),
        (
            ["cli_models:tiny", "--input", ":int32"],
            f"argument --input: ':int32' has no shape; {SPEC} (scalar for a shape of ())",
        ),
        (
            ["cli_models:tiny", "--input", "8x3:"],
            f"argument --input: '8x3:' has an empty dtype after ':'; {SPEC}",
        ),
        (
            ["cli_models:tiny", "--input", "8x3:flaot32"],
            "argument --input: '8x3:flaot32' has unknown dtype 'flaot32': use a numpy or JAX "
            "dtype name such as float32, bfloat16, int32 or bool",
        ),
        (
            ["cli_models:tiny", "--input", "8x3:object"],
            "argument --input: '8x3:object' has unknown dtype 'object': use a numpy or JAX "
            "dtype name such as float32, bfloat16, int32 or bool",
        ),
        (
            ["cli_models:tiny", "--depth", "-1"],
            "argument --depth: '-1' is not a depth: pass 0 for the root call only, or a "
            "positive integer",
        ),
        (
            ["cli_models:tiny", "--width", "0"],
            "argument --width: '0' is not a width: pass a positive number of terminal "
            "columns, e.g. 80",
        ),
        (
            ["cli_models:tiny", "--width", "wide"],
            "argument --width: 'wide' is not a width: pass a positive number of terminal "
            "columns, e.g. 80",
        ),
        (
            ["cli_models:tiny", "--format", "yaml"],
            "argument --format: invalid choice: 'yaml' (choose from 'table', 'markdown', 'json')",
        ),
        (["cli_models:tiny", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: PACKAGE.MODULE:FACTORY"),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-factory",
        "bad-name",
        "not-importable",
        "no-attribute",
        "no-attribute-no-hint",
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
        "zero-width",
        "word-width",
        "unknown-format",
        "unknown-option",
        "no-target",
    ],
)
def test_malformed_arguments_exit_2_with_one_line_saying_what_is_wrong(capsys, argv, message):
    assert failure(capsys, "summary", *argv) == message


def test_a_command_is_required(capsys):
    assert failure(capsys) == "the following arguments are required: COMMAND"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"wrapkit {wrapkit.__version__}\n"


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


@pytest.mark.skipif(shutil.which("wrapkit") is None, reason="the package is not installed")
def test_console_script():
    script = shutil.which("wrapkit")
    version = subprocess.run(
        [script, "--version"], cwd=HERE, capture_output=True, text=True, check=False
    )
    assert (version.returncode, version.stdout) == (0, f"wrapkit {wrapkit.__version__}\n")
    completed = subprocess.run(
        [script, "summary", "cli_models:tiny", "--input", "2x3", "--format", "json"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["module_type"] == "Tiny"
    failed = subprocess.run(
        [script, "summary", "cli_models:tiny", "--width", "0"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2
    assert failed.stderr == (
        "wrapkit: error: argument --width: '0' is not a width: pass a positive number of "
        "terminal columns, e.g. 80\n"
    )
