"""``wrapkit.nnx.tabulate``: flax's ``nnx.tabulate``, rendered from one ``wrapkit.summary``."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx import summary as _flax_summary

from .capture_linen import summary
from .data import Row, Summary
from .render import rich_table
from .tabulate import _columns


def tabulate(
    obj: Any,
    *input_args: Any,
    depth: int | None = None,
    method: str = "__call__",
    row_filter: Callable[[Any], bool] = _flax_summary.filter_rng_streams,
    table_kwargs: Mapping[str, Any] = MappingProxyType({}),
    column_kwargs: Mapping[str, Any] = MappingProxyType({}),
    console_kwargs: Mapping[str, Any] = MappingProxyType({}),
    compute_flops: bool = False,
    compute_vjp_flops: bool = False,
    **input_kwargs: Any,
) -> str:
    """A drop-in for ``flax.nnx.tabulate``: same signature, a table from one abstract trace.

    Moving over is one import change. Under the hood it is
    [`wrapkit.summary`][wrapkit.summary] and [`Summary.to_rich`][wrapkit.Summary.to_rich];
    call those to get the data instead.

    Differences from flax:

    - Nothing runs: ``obj`` may come from ``nnx.eval_shape`` and the inputs may be
      ``jax.ShapeDtypeStruct``s. flax runs the model, and lowers every call again for its
      FLOPs. No class stays changed when the model raises.
    - FLOPs are counted from the one traced program: a call's FLOPs include its callees,
      every call has a row (a second call of a module is marked repeated), a ``scan`` body
      counts ``length`` times, and VJP FLOPs are each call's share of the whole model's VJP
      (with respect to the Params and the floating-point inputs), so no child exceeds its
      parent. flax's VJP column crashes on keyword arguments (``nnx.MultiHeadAttention``).
    - ``row_filter`` receives a [`Row`][wrapkit.Row] (``module_type``, ``path``, ...), not
      flax's ``CallInfo``; flax's default, which hides ``RngStream`` rows, has nothing to
      hide (RNG streams are not module calls here; their state is in the ``RngState``
      column). A row that is filtered out hides only itself: its callees hang from the
      nearest row that is kept.
    - ``depth`` counts calls (a wrapped module is one level below its wrapper).
    - The variable columns are the Variable types (``Param``, ``BatchStat``, ``RngState``
      ...) with counts and bytes; arrays a module holds outside Variables (flax's
      ``nnx.WeightNorm`` scales) are in an ``Array`` column.

    Args:
        obj: the NNX module to tabulate.
        *input_args: positional arguments of the method, arrays or ``ShapeDtypeStruct``s.
        depth: how many calls deep to show; ``None`` shows every call.
        method: the method to call.
        row_filter: which rows to show, a predicate on a [`Row`][wrapkit.Row].
        table_kwargs: passed to ``rich.table.Table``.
        column_kwargs: passed to ``rich.table.Table.add_column`` for every column.
        console_kwargs: passed to ``rich.console.Console``, over the defaults
            ``{"force_terminal": True, "force_jupyter": <in IPython>}``.
        compute_flops: add a ``flops`` column.
        compute_vjp_flops: add a ``vjp_flops`` column.
        **input_kwargs: keyword arguments of the method.

    Returns:
        The table, as a string.

    Raises:
        TypeError: ``obj`` is not an NNX module.
    """
    if not isinstance(obj, nnx.Module):
        raise TypeError(
            f"wrapkit.nnx.tabulate expects a flax.nnx.Module, got {type(obj).__name__}. "
            "For a Linen module use wrapkit.tabulate."
        )
    result = summary(obj, *input_args, method=method, vjp=compute_vjp_flops, **input_kwargs)
    if row_filter is not _flax_summary.filter_rng_streams:
        result = _filtered(result, row_filter)
    import rich.console

    console_options = {
        "force_terminal": True,
        "force_jupyter": _flax_summary.in_ipython,
        **console_kwargs,
    }
    table_options = dict(table_kwargs)
    buffer = io.StringIO()
    console = rich.console.Console(file=buffer, **console_options)
    table = rich_table(
        result,
        depth,
        columns=_columns(result, compute_flops, compute_vjp_flops),
        column_kwargs=column_kwargs,
        width=table_options.pop("width", console.width),
        **table_options,
    )
    console.print(table)
    return buffer.getvalue()


def _filtered(result: Summary, keep: Callable[[Row], bool]) -> Summary:
    """``result`` with only the rows ``keep`` accepts (the root always): a row's callees
    that are kept hang from its nearest kept ancestor."""
    kept = [row for row in result.rows if row.index == 0 or keep(row)]
    index = {row.index: new for new, row in enumerate(kept)}

    def parent(row: Row) -> int | None:
        above = row.parent
        while above is not None and above not in index:
            above = result.rows[above].parent
        return None if above is None else index[above]

    parents = [parent(row) for row in kept]
    depths: list[int] = []
    for above in parents:  # a parent comes before its children
        depths.append(0 if above is None else depths[above] + 1)
    children: list[list[int]] = [[] for _ in kept]
    for new, above in enumerate(parents):
        if above is not None:
            children[above].append(new)
    rows = tuple(
        dataclasses.replace(
            row,
            index=new,
            parent=parents[new],
            children=tuple(children[new]),
            depth=depths[new],
        )
        for new, row in enumerate(kept)
    )
    return dataclasses.replace(result, rows=rows)
