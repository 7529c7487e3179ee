"""Summaries as text: a rich table and a markdown table, from one layout.

This is the only module that knows about markup. It reads a [`Summary`][wrapkit.Summary] and
never changes it; ``_layout`` decides what each cell says, and the two renderers only decide
how it looks (rich dims the secondary part of a cell, markdown keeps it as plain text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
import rich.table
from rich.console import JustifyMethod
from rich.text import Text

from .data import Row, Summary, VariableStats, describe

CALL_COLUMNS = ("path", "module", "inputs", "outputs", "flops", "vjp_flops")
"""The columns that describe a call; one column per variable collection follows them."""

_NUMERIC = frozenset({"flops", "vjp_flops"})
# flax leaves these methods out of the module column; "<lambda>" is what a `method=lambda ...`
# is called.
_PLAIN_METHODS = frozenset({"__call__", "<lambda>"})


@dataclasses.dataclass(frozen=True)
class _Cell:
    """A cell's text, and a secondary part that rich shows dimmed: ``1,024`` `` (4.1 KB)``."""

    text: str = ""
    aside: str = ""


@dataclasses.dataclass(frozen=True)
class _Layout:
    title: str
    headers: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[_Cell, ...], ...]
    depths: tuple[int, ...]
    footer: tuple[_Cell, ...]
    total: _Cell
    notes: tuple[str, ...]


def rich_table(
    summary: Summary,
    depth: int | None = None,
    *,
    show_repeated: bool = True,
    columns: Sequence[str] | None = None,
    column_kwargs: Mapping[str, Any] = MappingProxyType({}),
    **table_kwargs: Any,
) -> rich.table.Table:
    """A ``rich.table.Table`` of ``summary``, laid out like flax's ``tabulate``.

    One row per call; a footer with the totals of every collection and of the FLOPs; a
    caption with the total parameter count and, when the FLOPs are not exact, why.

    Args:
        summary: what to show.
        depth: show calls down to this call-tree depth (the root is 0). A row at the limit
            shows the variables of its whole subtree; FLOPs columns always show a call's
            total, callees included. ``None`` shows every call.
        show_repeated: show calls of a module that was called before (their variables are
            shown at the first call; their FLOPs count in their callers' totals either way).
        columns: the call columns to show, from ``"path"``, ``"module"``, ``"inputs"``,
            ``"outputs"``, ``"flops"`` and ``"vjp_flops"``; one column per variable
            collection always follows. ``None`` shows all of them (``vjp_flops`` only when
            the summary has VJP FLOPs).
        column_kwargs: passed to ``rich.table.Table.add_column`` for every column.
        **table_kwargs: passed to ``rich.table.Table``; they override the defaults
            (``show_lines=True``, ``show_footer=True``, the title ...).

    Returns:
        The table; print it with a ``rich.console.Console``.

    Raises:
        ValueError: a negative ``depth``, an unknown column, or ``"vjp_flops"`` for a
            summary made without ``vjp=True``.
    """
    layout = _layout(summary, depth, show_repeated, columns)
    options: dict[str, Any] = {
        "title": layout.title,
        "show_header": True,
        "show_lines": True,
        "show_footer": True,
        "caption_style": "none",
    }
    table = rich.table.Table(**{**options, **table_kwargs})

    def text(cell: _Cell, justify: JustifyMethod | None = None) -> Text:
        return Text.assemble(cell.text, (cell.aside, "dim"), justify=justify)

    for header, numeric, footer in zip(layout.headers, layout.numeric, layout.footer, strict=True):
        defaults: dict[str, Any] = {"justify": "right" if numeric else "left"}
        if header == "path":
            # Rich shrinks the other columns first, so that a path is not cut short.
            defaults["no_wrap"] = True
        # Every footer is right-aligned: the numbers, and the "Total" label next to them.
        table.add_column(
            header, footer=text(footer, justify="right"), **{**defaults, **column_kwargs}
        )
    module = layout.headers.index("module") if "module" in layout.headers else None
    for cells, depth in zip(layout.rows, layout.depths, strict=True):
        row = [text(cell) for cell in cells]
        if module is not None:
            # Indented by call depth, so that a wrapped layer reads as its wrapper's child.
            row[module] = Text("  " * depth) + row[module]
        table.add_row(*row)
    # Styled as flax's caption, so that the two read the same in a terminal.
    total, aside = layout.total.text, layout.total.aside
    caption = Text(f"\nTotal Parameters: {total}{' ' if aside else ''}", style="bold")
    caption.append(aside.lstrip(), style="bold dim")
    for note in layout.notes:
        caption.append(f"\n{note}", style="yellow")
    table.caption = caption
    return table


def markdown(
    summary: Summary,
    depth: int | None = None,
    show_repeated: bool = True,
    *,
    columns: Sequence[str] | None = None,
) -> str:
    """A GitHub markdown table of ``summary``, with a totals row, a totals line and notes.

    Args:
        summary: what to show.
        depth: as in ``rich_table``.
        show_repeated: as in ``rich_table``.
        columns: as in ``rich_table``.

    Returns:
        The markdown text, ending in a newline.

    Raises:
        ValueError: as ``rich_table``.
    """
    layout = _layout(summary, depth, show_repeated, columns)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def plain(cell: _Cell, bold: bool = False) -> str:
        text = _escape(cell.text + cell.aside)
        return f"**{text}**" if bold and text else text

    lines = [
        f"**{_escape(layout.title)}**",
        "",
        line(layout.headers),
        line(["---:" if numeric else "---" for numeric in layout.numeric]),
        *(line([plain(cell) for cell in cells]) for cells in layout.rows),
        line([plain(cell, bold=True) for cell in layout.footer]),
        "",
        f"Total Parameters: {layout.total.text}{layout.total.aside}",
    ]
    if layout.notes:
        lines += ["", *(f"- {note}" for note in layout.notes)]
    return "\n".join(lines) + "\n"


def _layout(
    summary: Summary, depth: int | None, show_repeated: bool, columns: Sequence[str] | None
) -> _Layout:
    shown = _check_columns(summary, columns)
    if depth is not None and depth < 0:
        raise ValueError(
            f"depth={depth} is negative. Pass depth=0 for the root call only, a larger depth "
            "for more levels, or None for every call."
        )
    rows = [
        row
        for row in summary.rows
        if (depth is None or row.depth <= depth) and (show_repeated or not row.repeated)
    ]
    collections = tuple(summary.collections)
    cells = []
    for row in rows:
        cut = depth is not None and row.depth == depth
        variables = summary.subtree_variables(row) if cut else _own_variables(row)
        cells.append(
            tuple(_call_cell(summary, row, column) for column in shown)
            + tuple(_stats_cell(variables.get(name, VariableStats())) for name in collections)
        )

    footer = [_Cell() for _ in shown]
    labels = [i for i, column in enumerate(shown) if column not in _NUMERIC]
    if labels:
        footer[labels[-1]] = _Cell("Total")
    if "flops" in shown:
        footer[shown.index("flops")] = _Cell(f"{summary.flops:,}")
    if "vjp_flops" in shown and summary.vjp_flops is not None:
        footer[shown.index("vjp_flops")] = _Cell(f"{summary.vjp_flops:,}")
    footer += [_stats_cell(summary.variables.get(name, VariableStats())) for name in collections]

    total = sum(summary.variables.values(), VariableStats())
    return _Layout(
        title=f"{summary.module_type} Summary",
        headers=(*shown, *collections),
        numeric=tuple(column in _NUMERIC for column in shown) + (True,) * len(collections),
        rows=tuple(cells),
        depths=tuple(row.depth for row in rows),
        footer=tuple(footer),
        total=_stats_cell(total) if total.count else _Cell("0"),
        notes=_notes(summary) if _NUMERIC & set(shown) else (),
    )


def _check_columns(summary: Summary, columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return tuple(
            column
            for column in CALL_COLUMNS
            if column != "vjp_flops" or summary.vjp_flops is not None
        )
    if isinstance(columns, str):
        raise TypeError(
            f"columns={columns!r} is a string. Pass a sequence of column names, e.g. "
            f"columns=({columns!r},)."
        )
    unknown = [column for column in columns if column not in CALL_COLUMNS]
    if unknown:
        raise ValueError(
            f"Unknown columns {unknown}. Choose among {list(CALL_COLUMNS)}; the variable "
            "collections always follow them."
        )
    if "vjp_flops" in columns and summary.vjp_flops is None:
        raise ValueError(
            "columns asks for 'vjp_flops', but this summary has no VJP FLOPs. Make it with "
            "wrapkit.summary(..., vjp=True), or leave 'vjp_flops' out."
        )
    return tuple(columns)


def _call_cell(summary: Summary, row: Row, column: str) -> _Cell:
    if column == "path":
        return _Cell(row.name)
    if column == "module":
        return _module_cell(summary, row)
    if column == "inputs":
        return _Cell(_arguments_text(row.inputs))
    if column == "outputs":
        return _Cell(_value_text(row.outputs))
    if column == "flops":
        return _flops_cell(row.flops, row.own_flops)
    return _flops_cell(row.vjp_flops, row.own_vjp_flops)


def _module_cell(summary: Summary, row: Row) -> _Cell:
    notes = []
    if row.method not in _PLAIN_METHODS:
        notes.append(row.method)
    if row.wrapper and row.children:
        # A wrapper's first call is the delegated call of the module it wraps.
        notes.append(f"wraps {summary.rows[row.children[0]].module_type}")
    if row.repeated:
        notes.append("repeated")
    return _Cell(row.module_type, f" ({', '.join(notes)})" if notes else "")


def _flops_cell(total: int | None, own: int | None) -> _Cell:
    if total is None:
        return _Cell()
    # A call's total counts its callees; "own" is what it issued itself, shown when different.
    aside = f" (own {own:,})" if own is not None and own != total else ""
    return _Cell(f"{total:,}", aside)


def _stats_cell(stats: VariableStats) -> _Cell:
    if not stats.count:
        return _Cell()
    return _Cell(f"{stats.count:,}", f" ({_bytes_text(stats.bytes)})")


def _own_variables(row: Row) -> Mapping[str, VariableStats]:
    # A repeated call's variables were shown at the module's first call.
    return {} if row.repeated else row.variables


def _notes(summary: Summary) -> tuple[str, ...]:
    notes = []
    if summary.unsupported:
        notes.append(
            "FLOPs are a lower bound: primitives without a FLOP rule were not counted: "
            f"{', '.join(summary.unsupported)}."
        )
    if summary.lower_bound:
        notes.append("FLOPs are a lower bound: a while loop was counted once.")
    if summary.branches:
        each = " of each" if summary.branches > 1 else ""
        notes.append(
            f"{summary.branches} cond/switch: the most expensive branch{each} was counted."
        )
    return tuple(notes)


def _arguments_text(inputs: Any) -> str:
    """A call's ``(args, kwargs)`` written like a call site: ``x, y, key: z``."""
    if (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], tuple)
        and isinstance(inputs[1], Mapping)
    ):
        args, kwargs = inputs
        return _items_text([*args], kwargs)
    return _value_text(inputs)


def _value_text(value: Any) -> str:
    """A value, its outer container left implicit: ``float32[8,3], int32[8]``."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return _items_text([], value)
    if isinstance(value, list | tuple):
        return _items_text(value, {})
    return _nested_text(value)


def _items_text(items: Sequence[Any], named: Mapping[Any, Any]) -> str:
    parts = [_nested_text(item) for item in items]
    parts += [f"{key}: {_nested_text(item)}" for key, item in named.items()]
    return ", ".join(parts)


def _nested_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + _items_text([], value) + "}"
    if isinstance(value, list | tuple):
        return "(" + _items_text(value, {}) + ")"
    described = describe(value)
    if isinstance(value, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        # Written without spaces, as flax does, so that a table never wraps inside a shape.
        return str(described).replace(" ", "")
    return str(described)


def _bytes_text(count: int) -> str:
    """Bytes in decimal units with one decimal, as flax writes them: ``4.1 KB``."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count > size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,} B"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
