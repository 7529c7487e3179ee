"""The command line: ``python -m wrapkit summary PACKAGE.MODULE:FACTORY --input 8x3 ...``.

Nothing is allocated: every ``--input`` becomes a ``jax.ShapeDtypeStruct``, and the model is
traced abstractly, so a summary of a large model runs on a laptop.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PROG = "python -m wrapkit"

_TARGET_HELP = (
    "a zero-argument callable that returns a Linen module, as PACKAGE.MODULE:FACTORY "
    "(e.g. examples.gpt2:gpt2_small); the current directory is importable"
)
_INPUT_HELP = (
    "one positional input, as a shape and an optional dtype: 8x224x224x3, 1x128:int32, "
    "scalar:float32 (default dtype float32); repeat for several inputs"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0, or 1 when the model fails to trace. Malformed arguments exit
        with status 2 through ``SystemExit``, as ``argparse`` does.
    """
    parser, summary_parser = _parsers()
    args = parser.parse_args(argv)
    if args.command != "summary":  # pragma: no cover - argparse requires a command
        parser.error(f"unknown command {args.command!r}")
    return _summary_command(summary_parser, args)


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog=PROG, description="wrapkit's command line tools for Flax models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary_parser = commands.add_parser(
        "summary",
        help="a per-call table of a model: shapes, variables and FLOPs",
        description=(
            "Summarise a Linen model from one abstract trace: every module call with its "
            "input and output shapes, variables and FLOPs. Nothing is allocated."
        ),
    )
    summary_parser.add_argument("target", metavar="PACKAGE.MODULE:FACTORY", help=_TARGET_HELP)
    summary_parser.add_argument(
        "--input",
        dest="inputs",
        metavar="SHAPE[:DTYPE]",
        action="append",
        default=[],
        type=input_spec,
        help=_INPUT_HELP,
    )
    summary_parser.add_argument(
        "--vjp", action="store_true", help="also count the FLOPs of the VJP (forward and backward)"
    )
    summary_parser.add_argument(
        "--depth",
        type=_depth,
        metavar="N",
        help="show calls down to depth N (the root is 0); table and markdown only",
    )
    summary_parser.add_argument(
        "--format",
        choices=("table", "markdown", "json"),
        default="table",
        help="a rich table (default), a markdown table, or JSON with every row",
    )
    summary_parser.add_argument(
        "--method", metavar="NAME", help="the module method to call (default __call__)"
    )
    return parser, summary_parser


def input_spec(spec: str) -> jax.ShapeDtypeStruct:
    """Parses ``AxBxC[:dtype]`` (or ``scalar[:dtype]``) into a ``jax.ShapeDtypeStruct``.

    Args:
        spec: dimensions as positive integers joined by ``x``, or ``scalar`` for a shape
            of ``()``; optionally ``:`` and a numpy or JAX dtype name (default ``float32``).

    Returns:
        The abstract array.

    Raises:
        argparse.ArgumentTypeError: a malformed spec; the message says how to write it.

    Examples:
        >>> input_spec("1x128:int32")
        ShapeDtypeStruct(shape=(1, 128), dtype=int32)
        >>> input_spec("scalar")
        ShapeDtypeStruct(shape=(), dtype=float32)
    """
    shape_text, colon, dtype_text = spec.partition(":")
    example = "write e.g. 8x224x224x3, 1x128:int32 or scalar:float32"
    if not shape_text:
        raise argparse.ArgumentTypeError(
            f"{spec!r} has no shape; {example} (scalar for a shape of ())"
        )
    if shape_text == "scalar":
        shape: tuple[int, ...] = ()
    else:
        dims = shape_text.split("x")
        bad = [dim for dim in dims if not (dim.isdecimal() and dim.isascii() and int(dim) > 0)]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{spec!r} has bad dimensions {bad}: dimensions are positive integers joined "
                f"by 'x'; {example}"
            )
        shape = tuple(int(dim) for dim in dims)
    if colon and not dtype_text:
        raise argparse.ArgumentTypeError(f"{spec!r} has an empty dtype after ':'; {example}")
    return jax.ShapeDtypeStruct(shape, _dtype(dtype_text or "float32", spec))


def _dtype(name: str, spec: str) -> Any:
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
        raise argparse.ArgumentTypeError(
            f"{spec!r} has unknown dtype {name!r}: use a numpy or JAX dtype name such as "
            "float32, bfloat16, int32 or bool"
        )
    return dtype


def _depth(text: str) -> int:
    if not (text.isdecimal() and text.isascii()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a depth: pass 0 for the root call only, or a positive integer"
        )
    return int(text)


def _summary_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    module = _load_module(parser, args.target)
    if args.method is not None and not callable(getattr(module, args.method, None)):
        parser.error(
            f"--method {args.method}: {type(module).__name__} has no method "
            f"{args.method!r}; name one of its methods, or leave --method out for __call__"
        )
    from .capture_linen import summary

    try:
        result = summary(module, *args.inputs, method=args.method, vjp=args.vjp)
    except ValueError as error:
        # summary's message names the module path and method where the trace failed.
        print(f"{PROG} summary: error: {error}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(result.to_json(indent=2))
    elif args.format == "markdown":
        print(result.to_markdown(args.depth), end="")
    else:
        _print_table(result.to_rich(args.depth))
    return 0


def _print_table(table: Any) -> None:
    import rich.console
    import rich.measure

    console = rich.console.Console()
    if not console.is_terminal:
        # Into a file or a pipe, the table keeps its natural width instead of 80 columns.
        options = console.options.update_width(1_000_000)
        natural = rich.measure.Measurement.get(console, options, table).maximum
        console = rich.console.Console(width=max(natural, console.width))
    console.print(table)


def _load_module(parser: argparse.ArgumentParser, target: str) -> nn.Module:
    """Imports ``PACKAGE.MODULE:FACTORY`` and calls the factory; usage errors exit with 2."""
    form = "write PACKAGE.MODULE:FACTORY, e.g. examples.gpt2:gpt2_small"
    module_name, colon, factory_name = target.partition(":")
    if not colon:
        parser.error(f"target {target!r} has no ':' between the module and the factory; {form}")
    if not module_name or not factory_name:
        missing = "module" if not module_name else "factory"
        parser.error(f"target {target!r} has no {missing} name; {form}")
    bad = [part for part in module_name.split(".") if not part.isidentifier()]
    bad += [part for part in factory_name.split(".") if not part.isidentifier()]
    if bad or ":" in factory_name:
        parser.error(f"target {target!r} is not a module and attribute name; {form}")

    # Like `python -m`, make the working directory importable (for an installed console script).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        parser.error(
            f"cannot import {module_name!r} ({error}); run from the directory that contains "
            "it, or install its package"
        )
    owner = module_name
    for name in factory_name.split("."):
        if not hasattr(found, name):
            names = [n for n in dir(found) if not n.startswith("_")]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            parser.error(f"{owner!r} has no attribute {name!r}{hint}")
        found = getattr(found, name)
        owner = f"{owner}.{name}"

    if not callable(found):
        parser.error(
            f"{target} is not callable (got {type(found).__name__}); FACTORY must be a "
            "zero-argument function (or class) that returns a Linen module"
        )
    if isinstance(found, nn.Module):
        parser.error(
            f"{target} is a {type(found).__name__} instance, not a factory; FACTORY must be a "
            "zero-argument function that returns the module"
        )
    try:
        inspect.signature(found).bind()
    except TypeError as error:
        parser.error(
            f"{target} cannot be called without arguments ({error}); FACTORY must take no "
            "arguments: wrap it in a function that fills them in"
        )
    except ValueError:  # no signature to inspect (a builtin); let the call decide
        pass
    module = found()
    if not isinstance(module, nn.Module):
        parser.error(
            f"{target}() returned {type(module).__name__}, not a flax.linen.Module; "
            "FACTORY must return a Linen module"
        )
    return module
