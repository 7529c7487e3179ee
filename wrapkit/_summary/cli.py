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
from typing import TYPE_CHECKING, Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from .data import Summary

PROG = "python -m wrapkit"
"""How the usage line names the program; the ``wrapkit`` console script passes its own name."""

_TARGET_HELP = (
    "a zero-argument callable that returns a Linen or NNX module, as PACKAGE.MODULE:FACTORY "
    "(e.g. examples.gpt2:gpt2_small); the current directory is importable"
)
_INPUT_HELP = (
    "one positional input, as a shape and an optional dtype: 8x224x224x3, 1x128:int32, "
    "scalar:float32 (default dtype float32); repeat for several inputs"
)
_USAGE, _FAILED = 2, 1
"""Exit statuses: a malformed command line (as argparse), and a model that fails."""


class _Failure(Exception):
    """A command-line failure: one line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = _USAGE) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line failures rather than usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise _Failure(message)


def main(argv: Sequence[str] | None = None, prog: str = "wrapkit") -> int:
    """Runs the command line.

    Every failure prints one line, ``wrapkit: error: ...``, to stderr, saying what went
    wrong and, where there is one, the fix.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.
        prog: the program's name in the usage and ``--help`` text.

    Returns:
        The exit status: 0; 2 for a malformed command line (a target that cannot be
        imported or is not a module factory, a bad ``--input``, ``--method``, ``--depth``
        or ``--width``); 1 when the factory raises or the model fails to trace.
        ``--help`` and ``--version`` exit with 0 through ``SystemExit``.
    """
    try:
        parser = _parsers(prog)
        args = parser.parse_args(argv)
        return _summary_command(args)
    except _Failure as failure:
        print(f"wrapkit: error: {failure}", file=sys.stderr)
        return failure.status


def _parsers(prog: str) -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=prog, description="wrapkit's command line tools for Flax models.")
    parser.add_argument("--version", action="version", version=f"wrapkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary_parser = commands.add_parser(
        "summary",
        help="a per-call table of a model: shapes, variables and FLOPs",
        description=(
            "Summarise a Linen or NNX model from one abstract trace: every module call with its "
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
    summary_parser.add_argument(
        "--width",
        type=_width,
        metavar="N",
        help=(
            "fit the table in N columns (default: the terminal's; into a file or a pipe, "
            "the table's natural width); table only"
        ),
    )
    return parser


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


def _width(text: str) -> int:
    if not (text.isdecimal() and text.isascii() and int(text) > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a width: pass a positive number of terminal columns, e.g. 80"
        )
    return int(text)


def _summary_command(args: argparse.Namespace) -> int:
    module = _load_module(args.target)
    if args.method is not None and not callable(getattr(module, args.method, None)):
        methods = ", ".join(_public_methods(module))
        listed = f"pass one of its methods ({methods})" if methods else "pass one of its methods"
        raise _Failure(
            f"--method {args.method}: {type(module).__name__} has no method "
            f"{args.method!r}; {listed}, or leave --method out for __call__"
        )
    from .capture_linen import summary

    try:
        result = summary(module, *args.inputs, method=args.method, vjp=args.vjp)
    except ValueError as error:
        # summary's first line names the module path and method where the trace failed.
        raise _Failure(str(error).splitlines()[0], _FAILED) from error
    if args.format == "json":
        print(result.to_json(indent=2))
    elif args.format == "markdown":
        print(result.to_markdown(args.depth), end="")
    else:
        _print_table(result, args.depth, args.width)
    return 0


def _public_methods(module: Any) -> list[str]:
    """The methods a module's class adds to ``nn.Module``'s (or ``nnx.Module``'s), for a
    ``--method`` hint."""
    nnx = sys.modules.get("flax.nnx")
    base = nnx.Module if nnx is not None and isinstance(module, nnx.Module) else nn.Module
    inherited = set(dir(base))
    # Looked up on the class, not the instance: nothing of the module runs.
    return [
        name
        for name in dir(type(module))
        if not name.startswith("_")
        and name not in inherited
        and inspect.isfunction(inspect.getattr_static(type(module), name))
    ]


def _print_table(result: Summary, depth: int | None, width: int | None) -> None:
    import rich.console
    import rich.measure

    from .render import rich_table

    console = rich.console.Console()
    if width is None and console.is_terminal:
        width = console.width
    table = rich_table(result, depth, width=width)
    # Into a file or a pipe, the table keeps its natural width instead of 80 columns; and a
    # table that cannot be made narrow enough is printed whole rather than cut.
    options = console.options.update_width(1_000_000)
    needed = rich.measure.Measurement.get(console, options, table).maximum
    rich.console.Console(width=max(needed, width or console.width)).print(table)


def _load_module(target: str) -> Any:
    """Imports ``PACKAGE.MODULE:FACTORY`` and calls the factory."""
    form = "write PACKAGE.MODULE:FACTORY, e.g. examples.gpt2:gpt2_small"
    module_name, colon, factory_name = target.partition(":")
    if not colon:
        raise _Failure(f"target {target!r} has no ':' between the module and the factory; {form}")
    if not module_name or not factory_name:
        missing = "module" if not module_name else "factory"
        raise _Failure(f"target {target!r} has no {missing} name; {form}")
    bad = [part for part in module_name.split(".") if not part.isidentifier()]
    bad += [part for part in factory_name.split(".") if not part.isidentifier()]
    if bad or ":" in factory_name:
        raise _Failure(f"target {target!r} is not a module and attribute name; {form}")

    # Like `python -m`, make the working directory importable (for an installed console script).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise _Failure(
            f"cannot import {module_name!r} ({error}); run from the directory that contains "
            "it, or install its package"
        ) from error
    except Exception as error:  # the module's own code failed: say how, in one line
        raise _Failure(f"importing {module_name!r} raised {_one_line(error)}", _FAILED) from error
    owner = module_name
    for name in factory_name.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            names = [n for n in dir(found) if not n.startswith("_")]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise _Failure(f"{owner!r} has no attribute {name!r}{hint}") from None
        owner = f"{owner}.{name}"

    if not callable(found):
        raise _Failure(
            f"{target} is not callable (got {type(found).__name__}); FACTORY must be a "
            "zero-argument function (or class) that returns a Linen module"
        )
    if _is_module(found):
        raise _Failure(
            f"{target} is a {type(found).__name__} instance, not a factory; FACTORY must be a "
            "zero-argument function that returns the module"
        )
    try:
        inspect.signature(found).bind()
    except TypeError as error:
        raise _Failure(
            f"{target} cannot be called without arguments ({error}); FACTORY must take no "
            "arguments: wrap it in a function that fills them in"
        ) from error
    except ValueError:  # no signature to inspect (a builtin); let the call decide
        pass
    try:
        module = found()
    except Exception as error:  # the factory is the user's code: report what it raised
        raise _Failure(f"{target}() raised {_one_line(error)}", _FAILED) from error
    if not _is_module(module):
        raise _Failure(
            f"{target}() returned {type(module).__name__}, not a flax.linen.Module; "
            "FACTORY must return a Linen module"
        )
    return module


def _is_module(value: Any) -> bool:
    """A Linen module, or an NNX one (flax.nnx is looked at only once it is imported)."""
    nnx = sys.modules.get("flax.nnx")
    return isinstance(value, nn.Module) or (nnx is not None and isinstance(value, nnx.Module))


def _one_line(error: Exception) -> str:
    """``TypeName: first line of the message``."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
