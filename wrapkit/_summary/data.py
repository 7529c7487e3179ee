"""What a summary is: plain, frozen data with totals and queries, and nothing about display."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import jax
import numpy as np

from ..flops import Cost


@dataclasses.dataclass(frozen=True)
class VariableStats:
    """How many values a group of variables holds, and how many bytes.

    Attributes:
        count: number of scalar values (the sum of the arrays' sizes).
        bytes: storage in bytes, from each array's dtype.
    """

    count: int = 0
    bytes: int = 0

    def __add__(self, other: VariableStats) -> VariableStats:
        return VariableStats(self.count + other.count, self.bytes + other.bytes)

    @classmethod
    def of(cls, tree: Any) -> VariableStats:
        """The statistics of every array leaf in ``tree`` (concrete or abstract)."""
        count = nbytes = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            size = int(np.prod(leaf.shape, dtype=np.int64))
            count += size
            nbytes += size * np.dtype(leaf.dtype).itemsize
        return cls(count, nbytes)


@dataclasses.dataclass(frozen=True)
class Row:
    """One module method call in a [`Summary`][wrapkit.Summary].

    FLOPs follow XLA's conventions (one multiply-add is 2 FLOPs; transcendentals are counted
    separately). ``own_*`` counts the equations this call issued itself; the totals add the
    calls made from inside it, so a row's total is never below any of its children's.

    Attributes:
        index: position of the call in call order; ``rows[index]`` is this row.
        parent: index of the calling row, ``None`` for the root.
        children: indices of the calls made from inside this one, in order.
        depth: depth in the call tree (the root is 0).
        path: the module's path in the variable tree; the root module's is ``()``.
        module_type: the module's class name.
        method: the method called (``"__call__"``, or a delegated ``"encode"`` ...).
        inputs: the call's positional and keyword arguments, arrays as
            ``jax.ShapeDtypeStruct`` (inside ``nn.vmap``, the shapes of one slice).
        outputs: the call's return value, likewise.
        variables: the module's own variables per collection (those of called submodules
            are in their rows).
        repeated: the module was called before (a shared module, or a second call).
        wrapper: the module is a wrapper (see [`is_wrapper`][wrapkit.is_wrapper]).
        own_flops: forward FLOPs issued by this call itself.
        flops: forward FLOPs of this call, its callees included.
        own_transcendentals: transcendental operations issued by this call itself.
        transcendentals: transcendental operations, callees included.
        own_vjp_flops: this call's share of the whole model's VJP, or ``None`` when the
            summary was made without ``vjp=True``.
        vjp_flops: the VJP share of this call and its callees, or ``None``.
    """

    index: int
    parent: int | None
    children: tuple[int, ...]
    depth: int
    path: tuple[str, ...]
    module_type: str
    method: str
    inputs: Any
    outputs: Any
    variables: Mapping[str, VariableStats]
    repeated: bool
    wrapper: bool
    own_flops: int
    flops: int
    own_transcendentals: int
    transcendentals: int
    own_vjp_flops: int | None
    vjp_flops: int | None

    @property
    def name(self) -> str:
        """The path joined with ``/``; the root module's is ``""``."""
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True, repr=False)
class Summary:
    """A per-call table of a model: shapes, variables and FLOPs, from one abstract trace.

    Made by [`wrapkit.summary`][wrapkit.summary]. Plain data: render it with
    ``print(summary)`` (markdown), [`to_markdown`][wrapkit.Summary.to_markdown],
    [`to_rich`][wrapkit.Summary.to_rich] or [`to_json`][wrapkit.Summary.to_json].

    Attributes:
        module_type: the summarised module's class name.
        rows: one [`Row`][wrapkit.Row] per module method call, in call order; ``rows[0]``
            is the root.
        collections: the variable collections, in the order of the variables.
        variables: totals per collection over the whole variable tree (each variable once,
            however often its module is called).
        flops: forward FLOPs of the whole call; equal to the root row's ``flops`` and to
            [`wrapkit.flops.count`][wrapkit.flops.count] of the same function.
        transcendentals: forward transcendental operations.
        vjp_flops: FLOPs of the whole model's VJP (forward and backward, with respect to the
            floating-point variables and inputs), or ``None`` without ``vjp=True``.
        primitives: forward cost per primitive name.
        vjp_primitives: VJP cost per primitive name (empty without ``vjp=True``).
        unsupported: primitives met without a FLOP rule; they count as nothing, so the
            totals are lower bounds while this is not empty.
        lower_bound: a ``while`` loop was counted once, its trip count being unknown, so
            the totals are lower bounds.
        branches: ``cond``/``switch`` equations whose most expensive branch was counted.
    """

    module_type: str
    rows: tuple[Row, ...]
    collections: tuple[str, ...]
    variables: Mapping[str, VariableStats]
    flops: int
    transcendentals: int
    vjp_flops: int | None
    primitives: Mapping[str, Cost]
    vjp_primitives: Mapping[str, Cost]
    unsupported: tuple[str, ...]
    lower_bound: bool
    branches: int

    @property
    def root(self) -> Row:
        """The row of the summarised call itself."""
        return self.rows[0]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, path: str | tuple[str, ...], method: str | None = None) -> tuple[Row, ...]:
        """The rows of the module at ``path``, optionally only calls of ``method``.

        Args:
            path: a module path, as a tuple of names or joined with ``/``; ``""`` is the
                root module.
            method: a method name; ``None`` selects every method.

        Returns:
            The matching rows, in call order (empty when there are none).
        """
        if isinstance(path, str):
            path = tuple(part for part in path.split("/") if part)
        return tuple(
            row
            for row in self.rows
            if row.path == path and (method is None or row.method == method)
        )

    def subtree_variables(self, row: Row) -> Mapping[str, VariableStats]:
        """The variables of ``row`` and of every call below it, as a table cut there shows.

        Each module's variables count at its first call (a ``repeated`` row adds nothing),
        so the rows of a cut table add up to [`variables`][wrapkit.Summary].
        """
        totals: dict[str, VariableStats] = {}
        stack = [row.index]
        while stack:
            current = self.rows[stack.pop()]
            if not current.repeated:
                for name, stats in current.variables.items():
                    totals[name] = totals.get(name, VariableStats()) + stats
            stack.extend(current.children)
        return MappingProxyType(totals)

    def by_module(self, *, vjp: bool = False) -> Mapping[str, int]:
        """Own FLOPs per module path, summed over all calls of each module.

        Args:
            vjp: count VJP FLOPs instead of forward FLOPs.

        Returns:
            A read-only mapping from the ``/``-joined path to FLOPs. Its values add up to
            the total.

        Raises:
            ValueError: ``vjp=True`` on a summary made without ``vjp=True``.
        """
        if vjp:
            self._require_vjp()
        totals: dict[str, int] = {}
        for row in self.rows:
            own = row.own_vjp_flops if vjp else row.own_flops
            totals[row.name] = totals.get(row.name, 0) + (own or 0)
        return MappingProxyType(totals)

    def by_primitive(self, *, vjp: bool = False) -> Mapping[str, Cost]:
        """Cost per primitive name (``dot_general``, ``exp`` ...) over the whole call.

        Args:
            vjp: the primitives of the VJP instead of the forward pass.

        Raises:
            ValueError: ``vjp=True`` on a summary made without ``vjp=True``.
        """
        if vjp:
            self._require_vjp()
        return self.vjp_primitives if vjp else self.primitives

    def _require_vjp(self) -> None:
        if self.vjp_flops is None:
            raise ValueError(
                "This summary has no VJP FLOPs. Make it with wrapkit.summary(..., vjp=True)."
            )

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready builtins; arrays become ``"float32[8, 3]"`` strings."""
        return {
            "module_type": self.module_type,
            "flops": self.flops,
            "transcendentals": self.transcendentals,
            "vjp_flops": self.vjp_flops,
            "collections": list(self.collections),
            "variables": {
                name: dataclasses.asdict(stats) for name, stats in self.variables.items()
            },
            "unsupported": list(self.unsupported),
            "lower_bound": self.lower_bound,
            "branches": self.branches,
            "primitives": {
                name: dataclasses.asdict(cost) for name, cost in self.primitives.items()
            },
            "vjp_primitives": {
                name: dataclasses.asdict(cost) for name, cost in self.vjp_primitives.items()
            },
            "rows": [_row_dict(row) for row in self.rows],
        }

    def to_json(self, **json_kwargs: Any) -> str:
        """[`to_dict`][wrapkit.Summary.to_dict] as a JSON string.

        Args:
            **json_kwargs: passed to ``json.dumps`` (``indent=2`` ...).
        """
        return json.dumps(self.to_dict(), **json_kwargs)

    def to_markdown(self, depth: int | None = None) -> str:
        """A markdown table: one row per call, totals underneath.

        Args:
            depth: show calls down to this call-tree depth; a row at the limit counts
                its hidden callees in its variables. ``None`` shows every call.
        """
        from .render import markdown

        return markdown(self, depth=depth)

    def to_rich(self, depth: int | None = None, **table_kwargs: Any) -> Any:
        """A ``rich.table.Table`` like flax's ``tabulate``, with a totals footer.

        Args:
            depth: as in [`to_markdown`][wrapkit.Summary.to_markdown].
            **table_kwargs: passed to ``rich.table.Table``.
        """
        from .render import rich_table

        return rich_table(self, depth=depth, **table_kwargs)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        vjp = "" if self.vjp_flops is None else f", vjp_flops={self.vjp_flops:,}"
        calls = f"{len(self.rows)} call{'' if len(self.rows) == 1 else 's'}"
        return f"Summary({self.module_type}, {calls}, flops={self.flops:,}{vjp})"

    def __rich__(self) -> Any:
        """``rich.print(summary)`` prints the table."""
        return self.to_rich()

    def _repr_markdown_(self) -> str:
        """Notebooks show the markdown table."""
        return self.to_markdown()


def describe(value: Any) -> Any:
    """Arrays as ``"float32[8, 3]"``; containers kept; other values as ``repr``."""
    if isinstance(value, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        return f"{value.dtype}[{', '.join(str(d) for d in value.shape)}]"
    if isinstance(value, Mapping):
        return {str(key): describe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [describe(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _row_dict(row: Row) -> dict[str, Any]:
    return {
        "index": row.index,
        "parent": row.parent,
        "children": list(row.children),
        "depth": row.depth,
        "path": row.name,
        "module_type": row.module_type,
        "method": row.method,
        "inputs": describe(row.inputs),
        "outputs": describe(row.outputs),
        "variables": {name: dataclasses.asdict(stats) for name, stats in row.variables.items()},
        "repeated": row.repeated,
        "wrapper": row.wrapper,
        "own_flops": row.own_flops,
        "flops": row.flops,
        "own_transcendentals": row.own_transcendentals,
        "transcendentals": row.transcendentals,
        "own_vjp_flops": row.own_vjp_flops,
        "vjp_flops": row.vjp_flops,
    }
