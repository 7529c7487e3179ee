"""Summaries as text: a rich table and a markdown table, from one layout.

This is the only module that knows about markup. It reads a [`Summary`][wrapkit.Summary] and
never changes it; ``_layout`` decides what each cell says, and the two renderers only decide
how it looks (rich dims the secondary part of a cell, markdown keeps it as plain text).

A rich table can be fitted to a width (``_fit``): the numbers are never cut. When the table is
too wide, in this order, the text columns wrap (a path at its ``/``), a number and its
parenthesised part go on two lines, numbers take short units (``6.9M``), and the inputs and
outputs columns are dropped. Each numeric column keeps exact numbers while they fit.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
import rich.console
import rich.measure
import rich.table
from rich.console import JustifyMethod
from rich.text import Text

from .data import Row, Summary, VariableStats, describe

CALL_COLUMNS = ("path", "module", "inputs", "outputs", "flops", "vjp_flops", "rng_bits")
"""The columns that describe a call; one column per variable collection follows them."""

_NUMERIC = frozenset({"flops", "vjp_flops", "rng_bits"})
# The header where it is not the column's name.
_HEADERS = MappingProxyType({"rng_bits": "RNG bits"})
# What a table too wide for its width drops first: shapes matter less than the numbers.
_DROPPABLE = ("inputs", "outputs")
# flax leaves these methods out of the module column; "<lambda>" is what a `method=lambda ...`
# is called.
_PLAIN_METHODS = frozenset({"__call__", "<lambda>"})
# Decimal units for short numbers, smallest first: 73.1K, 6.9M, 1.2G.
_UNITS = (("K", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12))
# A text column narrower than its natural width shrinks to this at first (a longer word is
# folded), and only when the inputs and outputs are dropped and it still does not fit, further.
_COMFORTABLE_WIDTH = MappingProxyType({"path": 16, "module": 14, "inputs": 20, "outputs": 20})


@dataclasses.dataclass(frozen=True)
class _Cell:
    """A cell's text, and a secondary part that rich shows dimmed: ``1,024`` `` (4.1 KB)``."""

    text: str = ""
    aside: str = ""


@dataclasses.dataclass(frozen=True)
class _Count:
    """A number, written exactly (``9,323,168``) or in short units (``9.3M``).

    ``own`` (a call's own share of a total) or ``nbytes`` (the storage of a variable count)
    follows in parentheses: ``9,323,168 (own 2,048)``, ``32,768 (131.1 KB)``; in short
    units ``9.3M (2.0K)`` and ``32.8K (131.1KB)``, which the legend explains.
    """

    value: int
    own: int | None = None
    nbytes: int | None = None

    def cell(self, short: bool = False) -> _Cell:
        if self.own is not None:
            aside = f" ({_short_text(self.own)})" if short else f" (own {self.own:,})"
        elif self.nbytes is not None:
            aside = f" ({_bytes_text(self.nbytes, space='' if short else ' ')})"
        else:
            aside = ""
        return _Cell(_short_text(self.value) if short else f"{self.value:,}", aside)


_Entry = _Cell | _Count


@dataclasses.dataclass(frozen=True)
class _Layout:
    title: str
    columns: tuple[str, ...]
    """The call columns shown, then the variable collections."""
    calls: int
    """How many of ``columns`` are call columns."""
    headers: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[_Entry, ...], ...]
    depths: tuple[int, ...]
    footer: tuple[_Entry, ...]
    """Totals under the numeric columns; the renderers write "Total" left of them."""
    total: _Cell
    notes: tuple[str, ...]
    legend: tuple[str, ...]
    """What the numeric columns' cells mean, one part per column kind."""


@dataclasses.dataclass(frozen=True)
class _Fit:
    """How a layout is shown in a given width: which columns, how wide, in which units."""

    visible: tuple[int, ...]
    widths: tuple[int, ...]
    """The content width of each visible column, without padding."""
    short: tuple[bool, ...]
    """For each visible column: numbers in short units."""
    fits: bool


def rich_table(
    summary: Summary,
    depth: int | None = None,
    *,
    show_repeated: bool = True,
    columns: Sequence[str] | None = None,
    width: int | None = None,
    column_kwargs: Mapping[str, Any] = MappingProxyType({}),
    **table_kwargs: Any,
) -> rich.table.Table:
    """A ``rich.table.Table`` of ``summary``, laid out like flax's ``tabulate``.

    One row per call; a footer with the totals of every collection and of the FLOPs; a
    caption with the total parameter count, a legend of the numbers and, when the FLOPs are
    not exact, why.

    Args:
        summary: what to show.
        depth: show calls down to this call-tree depth (the root is 0). A row at the limit
            shows the variables of its whole subtree; FLOPs columns always show a call's
            total, callees included. ``None`` shows every call.
        show_repeated: show calls of a module that was called before (their variables are
            shown at the first call; their FLOPs count in their callers' totals either way).
        columns: the call columns to show, from ``"path"``, ``"module"``, ``"inputs"``,
            ``"outputs"``, ``"flops"``, ``"vjp_flops"`` and ``"rng_bits"``; one column per
            variable collection always follows. ``None`` shows all of them (``vjp_flops``
            only when the summary has VJP FLOPs, ``rng_bits`` only when the model draws
            random bits).
        width: the number of terminal columns the table must fit in, e.g. a console's
            ``console.width``. Numbers are never cut: text columns wrap first (a path at
            its ``/``), then a number and its parenthesised part go on two lines, then
            numbers take short units (``73.1K``, ``6.9M``, ``1.2G``; exact ones wherever
            they fit), then the inputs and outputs columns are dropped. A table that cannot
            fit even so comes out as narrow as it can be. ``None`` lays the table out at
            its natural width; a console narrower than that shrinks its text columns.
        column_kwargs: passed to ``rich.table.Table.add_column`` for every column.
        **table_kwargs: passed to ``rich.table.Table``; they override the defaults
            (``show_lines=True``, ``show_footer=True``, the title ...).

    Returns:
        The table; print it with a ``rich.console.Console``.

    Raises:
        ValueError: a negative ``depth``, an unknown column, ``"vjp_flops"`` for a
            summary made without ``vjp=True``, or a ``width`` below 1.
        TypeError: ``columns`` is a string, or ``width`` is not an integer.
    """
    _check_width(width)
    layout = _layout(summary, depth, show_repeated, columns)
    options: dict[str, Any] = {
        "title": layout.title,
        "show_header": True,
        "show_lines": True,
        "show_footer": True,
        "caption_style": "none",
    }
    options.update(table_kwargs)
    table = rich.table.Table(**options)
    fit = None if width is None else _fit(layout, width, functools.partial(_frame_width, options))
    visible = range(len(layout.columns)) if fit is None else fit.visible
    sizes = dict(zip(visible, fit.widths, strict=True)) if fit is not None else {}
    short = dict(zip(visible, fit.short, strict=True)) if fit is not None else {}

    def text(
        entry: _Entry, index: int, indent: int = 0, justify: JustifyMethod | None = None
    ) -> Text:
        cell = _entry_cell(entry, short.get(index, False))
        # Indented by call depth, so that a wrapped layer reads as its wrapper's child.
        cell = _Cell(step * indent + cell.text, cell.aside)
        size = sizes.get(index)
        if index == path and size is not None:
            cell = _Cell(_wrapped_path(cell.text, size))
        elif size is not None and cell.aside and len(cell.text) + len(cell.aside) > size:
            # Two lines rather than a number and a word of its parenthesised part.
            cell = _Cell(cell.text, "\n" + cell.aside.lstrip())
        return Text.assemble(cell.text, (cell.aside, "dim"), justify=justify)

    calls = layout.columns[: layout.calls]
    path = calls.index("path") if "path" in calls else None
    module = calls.index("module") if "module" in calls else None
    # Indented by two spaces a level, one in a column narrower than that needs.
    step = "  "
    if module is not None and module in sizes and sizes[module] < _text_widths(layout, module)[0]:
        step = " "
    footer = _footer(layout, visible)
    for index in visible:
        numeric = layout.numeric[index]
        defaults: dict[str, Any] = {"justify": "right" if numeric else "left"}
        if numeric:
            # Rich shrinks the wrappable columns first: the text, never the numbers.
            defaults["no_wrap"] = True
        else:
            defaults["overflow"] = "fold"
        if index in sizes:
            defaults["width"] = sizes[index]
        # Every footer is right-aligned: the numbers, and the "Total" label next to them.
        table.add_column(
            layout.headers[index],
            footer=text(footer[index], index, justify="right"),
            **{**defaults, **column_kwargs},
        )
    for entries, row_depth in zip(layout.rows, layout.depths, strict=True):
        table.add_row(*(text(entries[i], i, row_depth if i == module else 0) for i in visible))
    table.caption = _caption(layout, any(short.values()))
    return table


def markdown(
    summary: Summary,
    depth: int | None = None,
    show_repeated: bool = True,
    *,
    columns: Sequence[str] | None = None,
) -> str:
    """A GitHub markdown table of ``summary``, with a totals row, a totals line and notes.

    Numbers are exact: a markdown table has no width to fit.

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
    visible = range(len(layout.columns))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def plain(entry: _Entry, bold: bool = False) -> str:
        cell = _entry_cell(entry, short=False)
        text = _escape(cell.text + cell.aside)
        return f"**{text}**" if bold and text else text

    footer = _footer(layout, visible)
    lines = [
        f"**{_escape(layout.title)}**",
        "",
        line(layout.headers),
        line(["---:" if numeric else "---" for numeric in layout.numeric]),
        *(line([plain(entry) for entry in entries]) for entries in layout.rows),
        line([plain(footer[index], bold=True) for index in visible]),
        "",
        f"Total Parameters: {layout.total.text}{layout.total.aside}",
    ]
    if layout.notes:
        lines += ["", *(f"- {note}" for note in layout.notes)]
    return "\n".join(lines) + "\n"


# --- what each cell says --------------------------------------------------------------------


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
    entries = []
    for row in rows:
        cut = depth is not None and row.depth == depth
        variables = summary.subtree_variables(row) if cut else _own_variables(row)
        entries.append(
            tuple(_call_entry(summary, row, column) for column in shown)
            + tuple(_stats_entry(variables.get(name, VariableStats())) for name in collections)
        )

    footer: list[_Entry] = [_Cell() for _ in shown]
    if "flops" in shown:
        footer[shown.index("flops")] = _Count(summary.flops)
    if "vjp_flops" in shown and summary.vjp_flops is not None:
        footer[shown.index("vjp_flops")] = _Count(summary.vjp_flops)
    if "rng_bits" in shown:
        footer[shown.index("rng_bits")] = _Count(summary.rng_bits)
    footer += [_stats_entry(summary.variables.get(name, VariableStats())) for name in collections]

    total = sum(summary.variables.values(), VariableStats())
    return _Layout(
        title=f"{summary.module_type} Summary",
        columns=(*shown, *collections),
        calls=len(shown),
        headers=(*(_HEADERS.get(column, column) for column in shown), *collections),
        numeric=tuple(column in _NUMERIC for column in shown) + (True,) * len(collections),
        rows=tuple(entries),
        depths=tuple(row.depth for row in rows),
        footer=tuple(footer),
        total=_Count(total.count, nbytes=total.bytes).cell() if total.count else _Cell("0"),
        notes=_notes(summary) if {"flops", "vjp_flops"} & set(shown) else (),
        legend=_legend(shown, collections),
    )


def _check_columns(summary: Summary, columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return tuple(
            column
            for column in CALL_COLUMNS
            if (column != "vjp_flops" or summary.vjp_flops is not None)
            and (column != "rng_bits" or summary.rng_bits)
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


def _check_width(width: int | None) -> None:
    if width is None:
        return
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(
            f"width={width!r} is not an integer. Pass the number of terminal columns to fit "
            "in, e.g. width=80, or None for the natural width."
        )
    if width < 1:
        raise ValueError(
            f"width={width} is not positive. Pass the number of terminal columns to fit in, "
            "e.g. width=80, or None for the natural width."
        )


def _call_entry(summary: Summary, row: Row, column: str) -> _Entry:
    if column == "path":
        return _Cell(row.name)
    if column == "module":
        return _module_cell(summary, row)
    if column == "inputs":
        return _Cell(_arguments_text(row.inputs))
    if column == "outputs":
        return _Cell(_value_text(row.outputs))
    if column == "flops":
        return _total_entry(row.flops, row.own_flops)
    if column == "rng_bits":
        return _total_entry(row.rng_bits, row.own_rng_bits)
    return _total_entry(row.vjp_flops, row.own_vjp_flops)


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


def _total_entry(total: int | None, own: int | None) -> _Entry:
    if total is None:
        return _Cell()
    # A call's total counts its callees; "own" is what it issued itself, shown when different.
    return _Count(total, own=own if own is not None and own != total else None)


def _stats_entry(stats: VariableStats) -> _Entry:
    if not stats.count:
        return _Cell()
    return _Count(stats.count, nbytes=stats.bytes)


def _entry_cell(entry: _Entry, short: bool) -> _Cell:
    return entry.cell(short) if isinstance(entry, _Count) else entry


def _own_variables(row: Row) -> Mapping[str, VariableStats]:
    # A repeated call's variables were shown at the module's first call.
    return {} if row.repeated else row.variables


def _footer(layout: _Layout, visible: Sequence[int]) -> dict[int, _Entry]:
    """The totals row, with "Total" in the last visible text column."""
    footer = {index: layout.footer[index] for index in visible}
    labels = [index for index in visible if not layout.numeric[index]]
    if labels:
        footer[labels[-1]] = _Cell("Total")
    return footer


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


def _legend(shown: Sequence[str], collections: Sequence[str]) -> tuple[str, ...]:
    parts = []
    if "flops" in shown:
        parts.append("flops: total with callees (own)")
    if "vjp_flops" in shown:
        parts.append("vjp_flops: share of forward + backward (own)")
    if "rng_bits" in shown:
        parts.append("RNG bits: random bits drawn (own)")
    if collections:
        parts.append(f"{', '.join(collections)}: count (bytes)")
    return tuple(parts)


def _caption(layout: _Layout, short: bool) -> Text:
    # Styled as flax's caption, so that the two read the same in a terminal.
    total, aside = layout.total.text, layout.total.aside
    caption = Text(f"\nTotal Parameters: {total}{' ' if aside else ''}", style="bold")
    caption.append(aside.lstrip(), style="bold dim")
    legend = list(layout.legend)
    if short:
        legend.append("K, M, G, T: 10^3, 10^6, 10^9, 10^12")
    if legend:
        caption.append(f"\n{'; '.join(legend)}", style="dim")
    for note in layout.notes:
        caption.append(f"\n{note}", style="yellow")
    return caption


# --- fitting a width ------------------------------------------------------------------------


def _fit(layout: _Layout, width: int, frame: Callable[[int], int]) -> _Fit:
    """The widest way to show ``layout`` in ``width`` characters; see the module docstring.

    ``frame(n)`` is how many characters the table's borders and padding take around ``n``
    columns. When nothing fits, the narrowest layout, which is wider than ``width``.
    """
    calls = layout.columns[: layout.calls]
    droppable = [calls.index(column) for column in _DROPPABLE if column in calls]
    frames: dict[int, int] = {}

    def attempt(dropped: Sequence[int], hard: bool) -> _Fit:
        visible = tuple(index for index in range(len(layout.columns)) if index not in dropped)
        if len(visible) not in frames:
            frames[len(visible)] = frame(len(visible))
        return _fit_columns(layout, visible, width - frames[len(visible)], hard)

    # Comfortable text widths with every column, then without the inputs, then without the
    # outputs; only then text columns narrower than comfortable, and last without the module
    # column (the path still says which call a row is).
    attempts = [(droppable[:count], False) for count in range(len(droppable) + 1)]
    attempts.append((droppable, True))
    if "module" in calls and len(layout.columns) > 1:
        attempts.append(([*droppable, calls.index("module")], True))
    for dropped, hard in attempts:
        fit = attempt(dropped, hard)
        if fit.fits:
            break
    return fit


def _fit_columns(layout: _Layout, visible: tuple[int, ...], space: int, hard: bool) -> _Fit:
    """Numbers as exact as ``space`` allows, next to text columns of a comfortable width.

    ``space`` is what the columns' contents may take. With ``hard``, once every number is in
    its narrowest form, the text columns may go down to their header's width.
    """
    numbers = {index: _number_widths(layout, index) for index in visible if layout.numeric[index]}
    texts = {index: _text_widths(layout, index) for index in visible if index not in numbers}
    choice = dict.fromkeys(numbers, 0)
    while True:
        left = space - sum(numbers[index][choice[index]][1] for index in numbers)
        text_widths = _share({index: widths[:2] for index, widths in texts.items()}, left)
        if text_widths is not None:
            break
        # The widest numeric column that can narrow takes its next form.
        narrowable = [index for index in numbers if choice[index] + 1 < len(numbers[index])]
        if not narrowable:
            least = 2 if hard else 1
            minimums = {index: (widths[0], widths[least]) for index, widths in texts.items()}
            text_widths = _share(minimums, left) or {
                index: minimum for index, (_, minimum) in minimums.items()
            }
            break
        widest = max(narrowable, key=lambda index: numbers[index][choice[index]][1])
        choice[widest] += 1
    widths = {**{index: numbers[index][choice[index]][1] for index in numbers}, **text_widths}
    return _Fit(
        visible=visible,
        widths=tuple(widths[index] for index in visible),
        short=tuple(index in numbers and numbers[index][choice[index]][0] for index in visible),
        fits=sum(widths.values()) <= space,
    )


def _number_widths(layout: _Layout, index: int) -> list[tuple[bool, int]]:
    """A numeric column's forms, widest first, as (short units, width).

    Exact on one line, exact with the parenthesised part on a second line, then likewise in
    short units; a form that is no narrower than the one before it is left out.
    """
    # Numeric columns do not wrap, their headers included.
    header = len(layout.headers[index])
    entries = [entries[index] for entries in layout.rows] + [layout.footer[index]]
    forms: list[tuple[bool, int]] = []
    for short in (False, True):
        cells = [_entry_cell(entry, short) for entry in entries]
        one_line = max(len(cell.text) + len(cell.aside) for cell in cells)
        two_lines = max(max(len(cell.text), len(cell.aside.lstrip())) for cell in cells)
        for size in (one_line, two_lines):
            size = max(size, header)
            if not forms or size < forms[-1][1]:
                forms.append((short, size))
    return forms


def _text_widths(layout: _Layout, index: int) -> tuple[int, int, int]:
    """A text column's natural width, its comfortable minimum, and the narrowest it can be."""
    column = layout.columns[index]
    texts = [_entry_cell(entries[index], False) for entries in layout.rows]
    indent = [2 * depth if column == "module" else 0 for depth in layout.depths]
    natural = max(
        [len(layout.headers[index]), len("Total")]
        + [pad + len(cell.text) + len(cell.aside) for pad, cell in zip(indent, texts, strict=True)]
    )
    header = min(natural, max(_longest_word(layout.headers[index]), len("Total")))
    # Words, and a path's parts: a path wraps after its "/".
    words = [
        len(word) for cell in texts for word in re.findall(r"[^\s/]+/?", cell.text + cell.aside)
    ]
    if column == "module":
        # The type's name after its indent, one space a level in a narrow column.
        words += [depth + len(cell.text) for depth, cell in zip(layout.depths, texts, strict=True)]
    comfortable = min(max(words, default=0), _COMFORTABLE_WIDTH.get(column, 16))
    return natural, min(natural, max(header, comfortable)), header


def _share(texts: Mapping[int, tuple[int, int]], space: int) -> dict[int, int] | None:
    """Text column widths within ``space``: the widest shrink first, none below its minimum.

    ``None`` when even the minimums do not fit.
    """
    if sum(minimum for _, minimum in texts.values()) > space:
        return None

    def capped(cap: int) -> dict[int, int]:
        return {
            index: min(natural, max(minimum, cap)) for index, (natural, minimum) in texts.items()
        }

    # The largest cap on the widths that fits; the loop is short (widths are small).
    cap = max((natural for natural, _ in texts.values()), default=0)
    while cap > 0 and sum(capped(cap).values()) > space:
        cap -= 1
    return capped(cap)


def _wrapped_path(path: str, width: int) -> str:
    """``path`` on lines of at most ``width``, broken after a ``/`` (longer parts fold)."""
    lines = [""]
    for part in re.findall(r"[^/]+/?|/", path):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def _frame_width(options: Mapping[str, Any], count: int) -> int:
    """The characters that borders and padding add to ``count`` columns of such a table.

    Measured on an empty table made with the same options, so that ``box``, ``padding``,
    ``show_edge`` and the like given in ``table_kwargs`` count as rich counts them.
    """
    probe = rich.table.Table(**{**options, "title": None, "caption": None})
    for _ in range(count):
        probe.add_column(width=1)
    console = rich.console.Console(file=io.StringIO(), width=1_000_000)
    return rich.measure.Measurement.get(console, console.options, probe).maximum - count


# --- how values read ------------------------------------------------------------------------


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
    if isinstance(value, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        # Written without spaces, as flax does, so that a table never wraps inside a shape.
        return f"{value.dtype}[{','.join(str(dim) for dim in value.shape)}]"
    return str(describe(value))


def _short_text(count: int) -> str:
    """A count in decimal units with one decimal: ``73.1K``, ``6.9M``; below 1,000 exact."""
    if count < 1000:
        return f"{count}"
    *smaller, (unit, size) = _UNITS
    for name, scale in smaller:
        # Rounded to 1000.0 it reads better in the next unit: 999,960 is 1.0M.
        if count / scale < 999.95:
            unit, size = name, scale
            break
    return f"{count / size:,.1f}{unit}"


def _bytes_text(count: int, space: str = " ") -> str:
    """Bytes in decimal units with one decimal, as flax writes them: ``4.1 KB``."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count > size:
            return f"{count / size:,.1f}{space}{unit}"
    return f"{count:,}{space}B"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
