"""Low-rank weight deltas applied in unmerged form, by rewriting a traced program.

A wrapper such as LoRA changes a weight ``W`` into ``W + s * A @ B``. Computing that sum and
running the layer on it is correct but wasteful: the backward pass of ``f(x; W + s*A@B)``
computes the full-size weight gradient ``x^T dy`` even when ``W`` is frozen, and the forward
pass computes the full-size product ``A @ B``. Wherever the layer uses its weight linearly,
``f(x; W + s*A@B) = f(x; W) + s * f(x; A@B)``, and ``f(x; A@B)`` can be computed through the
factors, ``(x A) B``, which is what LoRA is about (Hu et al. 2021,
https://arxiv.org/abs/2106.09685).

This module does that for any function, without knowing the layer: it traces the function to
a jaxpr once, with the weight as an input, and evaluates the jaxpr again, replacing every
use of the weight by its unmerged form. A use is followed through the operations that only
rearrange or cast the weight (``transpose``, ``convert_element_type``, ``copy``, nested
``jit`` calls) to the operation that consumes it:

* ``dot_general`` (Dense, DenseGeneral, Einsum, ``Embed.attend``): the weight's contracted
  axes must be exactly its input axes (``x @ W``) or exactly its output axes (``q @ W.T``);
* ``conv_general_dilated`` (Conv, with one feature group): ``conv(x, A)`` then ``@ B`` over
  the feature axis;
* ``gather`` of whole rows (``Embed.__call__``): rows of ``A``, then ``@ B``.

The factors are made when the first use is found, from the axes that use contracts: the
weight's *input* axes (those contracted with the input, or indexed by a lookup) and its
*output* axes (the rest), so ``A`` has shape ``(*input axes, rank)`` and ``B`` has shape
``(rank, *output axes)``. Any other use (a non-linear one, such as normalising the weight)
has no unmerged form: it raises, or, when the delta allows it, runs on the materialised
``W + s * A @ B``.

The engine knows nothing of Linen or NNX: a front end passes the function, its arguments and,
for each weight leaf among them, a ``DeltaSource`` that makes the factors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from ._name_stack import current_name_stack, set_name_stack


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A weight delta ``scale * a @ b``, contracted over ``rank``.

    Attributes:
        a: shape ``(*shared_shape, *input_shape, rank)``: the weight's shared axes (an
            expert axis that the use batches over; usually none), its input axes, the rank.
        b: shape ``(*shared_shape, rank, *output_shape)``.
        scale: the factor ``s`` (``alpha / rank`` for LoRA).
        input_fn: applied to the layer's input before it meets ``a`` (dropout on the
            adapter path), or ``None``.
    """

    a: Any
    b: Any
    scale: Any
    input_fn: Callable[[Any], Any] | None = None
    shared: int = 0  # how many leading axes of a and b are shared axes

    def materialize(self, dtype: Any) -> jax.Array:
        """``scale * a @ b``, shape ``(*shared_shape, *input_shape, *output_shape)``,
        computed in at least float32 and cast once to ``dtype``."""
        wide = jnp.promote_types(jnp.result_type(self.a, self.b), jnp.float32)
        a = jnp.asarray(self.a, wide)
        b = jnp.asarray(self.b, wide)
        shared, rank = a.shape[: self.shared], a.shape[-1]
        size = math.prod(shared)
        delta = jnp.matmul(a.reshape(size, -1, rank), b.reshape(size, rank, -1)) * self.scale
        return delta.reshape(
            shared + a.shape[self.shared : -1] + b.shape[self.shared + 1 :]
        ).astype(dtype)


@dataclasses.dataclass
class DeltaSource:
    """What a front end says about one weight the program takes as input.

    Attributes:
        describe: names the weight for errors, e.g. ``"LoRA(Dense_0) kernel"``.
        make: called once, with the weight's input axes, output axes and shared axes (sorted
            tuples of axis indices), when the first use is found; returns the factors.
        name_stack: the name stack the delta's operations are recorded under (the
            wrapper's own call), so that tools attribute them to the wrapper.
        materialize: where a use has no unmerged form, run it on ``W + delta`` instead of
            raising.
        feature_axes: the weight's output axes when the caller fixes them, else ``None``
            (inferred from the first use).
        freeze: stop the gradient of the weight itself (the adapter trains, ``W`` does not).
    """

    describe: str
    make: Callable[[tuple[int, ...], tuple[int, ...], tuple[int, ...]], LowRank]
    name_stack: Any
    materialize: bool = False
    feature_axes: tuple[int, ...] | None = None
    freeze: bool = False
    low_rank: LowRank | None = None
    input_axes: tuple[int, ...] | None = None
    output_axes: tuple[int, ...] | None = None
    shared_axes: tuple[int, ...] = ()

    def partition(
        self, ndim: int, input_axes: set[int], where: str, shared: set[int] | None = None
    ) -> None:
        """Fixes (or checks) the weight's input, output and shared axes from one use."""
        shared = shared or set()
        output_axes = tuple(
            axis for axis in range(ndim) if axis not in input_axes and axis not in shared
        )
        if self.feature_axes is not None and self.input_axes is None:
            wanted = set(self.feature_axes)
            if wanted not in (set(output_axes), input_axes):
                raise UnmergedError(
                    f"{self.describe}: {where} contracts axes {sorted(input_axes)} of the "
                    f"weight and keeps {list(output_axes)}, but feature_axes="
                    f"{self.feature_axes} says its output axes are {sorted(wanted)}. Pass "
                    f"feature_axes={output_axes}."
                )
            output_axes = tuple(sorted(wanted))
            input_axes = {axis for axis in range(ndim) if axis not in wanted | shared}
        if self.input_axes is None:
            self.input_axes = tuple(sorted(input_axes))
            self.output_axes = output_axes
            self.shared_axes = tuple(sorted(shared))
        self.get()

    def get(self) -> LowRank:
        if self.low_rank is None:
            assert self.input_axes is not None and self.output_axes is not None
            with set_name_stack(self.name_stack):
                self.low_rank = self.make(self.input_axes, self.output_axes, self.shared_axes)
        return self.low_rank

    def delta(self, dtype: Any) -> jax.Array:
        """The materialised delta, laid out like the weight (its axes in their places)."""
        assert self.input_axes is not None and self.output_axes is not None
        order = self.shared_axes + self.input_axes + self.output_axes
        full = self.get().materialize(dtype)
        return _transposed_to(full, [order.index(axis) for axis in range(len(order))])

    def merged(self, weight: Any) -> jax.Array:
        """``weight + delta``, computed in at least float32 and cast once to its dtype."""
        weight = jnp.asarray(weight)
        wide = jnp.promote_types(weight.dtype, jnp.float32)
        return (weight.astype(wide) + self.delta(wide)).astype(weight.dtype)

    def default_partition(self, ndim: int) -> None:
        """Input and output axes where no use fixed them: ``feature_axes``, or the last axis."""
        if self.input_axes is None:
            out = self.feature_axes if self.feature_axes is not None else (ndim - 1,)
            self.partition(ndim, {axis for axis in range(ndim) if axis not in out}, "")


class UnmergedError(ValueError):
    """A weight is used in a way that has no unmerged form (and may not be materialised)."""


@dataclasses.dataclass(frozen=True)
class _Derived:
    """A value that is the weight of ``source``, rearranged and cast (no arithmetic).

    Axis ``i`` of the value is axis ``perm[i]`` of the weight; its dtype is ``dtype``.
    """

    source: DeltaSource
    perm: tuple[int, ...]
    dtype: Any

    def delta(self) -> jax.Array:
        """The delta laid out like this value."""
        ndim = len(self.perm)
        self.source.default_partition(ndim)
        return _transposed_to(self.source.delta(self.dtype), self.perm)


def call_unmerged(
    fun: Callable[..., Any], args: Sequence[Any], sources: dict[int, DeltaSource]
) -> Any:
    """``fun(*args)``, with the weights named in ``sources`` taking their deltas unmerged.

    Args:
        fun: a function of arrays (and static Python values) returning a pytree of arrays.
        args: its positional arguments, a pytree.
        sources: for a leaf of ``args`` (by ``id``) that is a weight, its delta source.

    Returns:
        ``fun``'s output, computed from one trace of ``fun``.

    Raises:
        UnmergedError: a weight has a use without an unmerged form (and its source does not
            allow materialising), or a use that contracts a mix of its axes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(list(args))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def flat(*values: Any) -> Any:
        rebuilt = list(leaves)
        for index, value in zip(dynamic, values, strict=True):
            rebuilt[index] = value
        return fun(*jax.tree_util.tree_unflatten(treedef, rebuilt))

    values = [leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*values)
    derived = {
        position: _Derived(
            sources[id(leaves[index])],
            tuple(range(np.ndim(leaves[index]))),
            jnp.result_type(leaves[index]),
        )
        for position, index in enumerate(dynamic)
        if id(leaves[index]) in sources
    }
    for position, item in derived.items():
        if item.source.freeze:
            values[position] = lax.stop_gradient(values[position])
    outs = _Interpreter().run(closed.jaxpr, closed.consts, values, derived)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


_STRUCTURAL = {prims.convert_element_type_p, prims.transpose_p, prims.copy_p}
_CALLS = {prims.jit_p, prims.closed_call_p}


class _Interpreter:
    """Evaluates a jaxpr, following weights to their uses and applying their deltas there."""

    def run(
        self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], derived: dict[int, _Derived]
    ) -> list[Any]:
        env: dict[Any, Any] = {}
        marks: dict[Any, _Derived] = {}

        def read(var: Any) -> Any:
            return var.val if isinstance(var, jex.Literal) else env[var]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for position, (var, value) in enumerate(zip(jaxpr.invars, args, strict=True)):
            env[var] = value
            if position in derived:
                marks[var] = derived[position]

        for eqn in jaxpr.eqns:
            found = [
                (i, marks[var])
                for i, var in enumerate(eqn.invars)
                if not isinstance(var, jex.Literal) and var in marks
            ]
            invals = [read(var) for var in eqn.invars]
            name_stack = current_name_stack() + eqn.source_info.name_stack
            with set_name_stack(name_stack), eqn.ctx.manager:
                if not found:
                    outs = self._bind(eqn, invals)
                    out_marks: list[_Derived | None] = [None] * len(outs)
                else:
                    outs, out_marks = self._with_deltas(eqn, invals, found)
            for var, value, mark in zip(eqn.outvars, outs, out_marks, strict=True):
                if isinstance(var, jex.DropVar):
                    continue
                env[var] = value
                if mark is not None:
                    marks[var] = mark

        results = []
        for var in jaxpr.outvars:
            value = read(var)
            if not isinstance(var, jex.Literal) and var in marks:
                value = self._materialize(marks[var], value, "is returned by the call")
            results.append(value)
        return results

    @staticmethod
    def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        return list(out) if eqn.primitive.multiple_results else [out]

    def _with_deltas(
        self, eqn: Any, invals: list[Any], found: list[tuple[int, _Derived]]
    ) -> tuple[list[Any], list[_Derived | None]]:
        primitive = eqn.primitive
        if primitive in _STRUCTURAL and len(found) == 1:
            ((_, mark),) = found
            out = self._bind(eqn, invals)
            if primitive is prims.transpose_p:
                perm = tuple(mark.perm[axis] for axis in eqn.params["permutation"])
                return out, [dataclasses.replace(mark, perm=perm)]
            if primitive is prims.convert_element_type_p:
                return out, [dataclasses.replace(mark, dtype=eqn.params["new_dtype"])]
            return out, [mark]
        if primitive in _CALLS:
            closed = eqn.params["jaxpr"]
            inner = {i: mark for i, mark in found}
            outs = self.run(closed.jaxpr, closed.consts, invals, inner)
            return outs, [None] * len(outs)
        if len(found) == 1:
            ((index, mark),) = found
            rule = _RULES.get(primitive)
            if rule is not None:
                result = rule(self, eqn, invals, index, mark)
                if result is not None:
                    return [result], [None]
        # No unmerged form: the use runs on W + delta, if allowed.
        for index, mark in found:
            invals[index] = self._materialize(mark, invals[index], f"is used by {primitive.name}")
        return self._bind(eqn, invals), [None] * len(eqn.outvars)

    @staticmethod
    def _materialize(mark: _Derived, value: Any, use: str) -> Any:
        source = mark.source
        if not source.materialize:
            raise UnmergedError(
                f"{source.describe} {use}, which is not a linear use with an unmerged form "
                "(x @ W, a convolution with W, or a lookup of rows of W). Build the wrapper "
                "with materialize=True to run it on W + delta (its backward pass then "
                "computes a full-size weight gradient), or leave this weight out of "
                "variable_filter."
            )
        with set_name_stack(source.name_stack):
            return value + mark.delta()


def _transposed_to(value: jax.Array, order: Sequence[int]) -> jax.Array:
    """``value`` with its axes reordered so that axis ``i`` of the result is ``order[i]``."""
    order = tuple(order)
    return value if order == tuple(range(len(order))) else jnp.transpose(value, order)


def _finish(mark: _Derived, base: jax.Array, product: jax.Array) -> jax.Array:
    return base + (product * mark.source.get().scale).astype(base.dtype)


def _dot_general(
    self: _Interpreter, eqn: Any, invals: list[Any], index: int, mark: _Derived
) -> jax.Array | None:
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    if index == 1:
        weight_contract, x_contract, weight_batch, x_batch = (
            contract_rhs,
            contract_lhs,
            batch_rhs,
            batch_lhs,
        )
    else:
        weight_contract, x_contract, weight_batch, x_batch = (
            contract_lhs,
            contract_rhs,
            batch_lhs,
            batch_rhs,
        )
    ndim = len(mark.perm)
    contracted = {mark.perm[d] for d in weight_contract}
    # Axes the use batches over (an expert axis of an Einsum): each slice has its own delta.
    shared = {mark.perm[d] for d in weight_batch}
    free = [d for d in range(ndim) if d not in weight_contract and d not in weight_batch]
    source = mark.source
    if source.input_axes is None:
        source.partition(ndim, contracted, f"{eqn.primitive.name}", shared)
    assert source.input_axes is not None and source.output_axes is not None
    if shared != set(source.shared_axes):
        return None
    low = source.get()
    if contracted == set(source.input_axes):
        # x @ W: contract x with A over the input axes, then the rank with B.
        first, second, first_axes, rest = low.a, low.b, source.input_axes, source.output_axes
        first_offset, second_rank = 0, len(source.shared_axes)
    elif contracted == set(source.output_axes):
        # q @ W.T: contract q with B over the output axes, then the rank with A.
        first, second, first_axes, rest = low.b, low.a, source.output_axes, source.input_axes
        first_offset = 1
        second_rank = len(source.shared_axes) + len(source.input_axes)
    else:
        return None
    x = invals[1 - index]
    base = self._bind(eqn, invals)[0]
    nb = len(source.shared_axes)
    with set_name_stack(source.name_stack):
        if low.input_fn is not None:
            x = low.input_fn(x)
        first = jnp.asarray(first, mark.dtype)
        second = jnp.asarray(second, mark.dtype)
        first_contract = tuple(
            nb + first_offset + first_axes.index(mark.perm[d]) for d in weight_contract
        )
        factor_batch = tuple(source.shared_axes.index(mark.perm[d]) for d in weight_batch)
        params = dict(
            precision=eqn.params.get("precision"),
            preferred_element_type=eqn.params.get("preferred_element_type"),
        )
        t = lax.dot_general(
            x,
            first,
            ((tuple(x_contract), first_contract), (tuple(x_batch), factor_batch)),
            **params,
        )
        # t: the shared axes (in the use's order), x's free axes, then the rank.
        u = lax.dot_general(
            t,
            second,
            (((t.ndim - 1,), (second_rank,)), (tuple(range(nb)), factor_batch)),
            **params,
        )
        # u: shared axes, x's free axes, the weight's `rest` axes (sorted): the eqn's order
        # is shared axes, then lhs free, then rhs free.
        n_x_free = t.ndim - 1 - nb
        weight_part = [nb + n_x_free + rest.index(mark.perm[d]) for d in free]
        x_part = list(range(nb, nb + n_x_free))
        order = list(range(nb)) + (x_part + weight_part if index == 1 else weight_part + x_part)
        return _finish(mark, base, _transposed_to(u, order))


def _conv(
    self: _Interpreter, eqn: Any, invals: list[Any], index: int, mark: _Derived
) -> jax.Array | None:
    params = eqn.params
    if index != 1 or params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    dnums = params["dimension_numbers"]
    out_dim, feature_dim = dnums.rhs_spec[0], dnums.out_spec[1]
    ndim = len(mark.perm)
    source = mark.source
    if source.input_axes is None:
        source.partition(ndim, {mark.perm[d] for d in range(ndim) if d != out_dim}, "a convolution")
    assert source.input_axes is not None and source.output_axes is not None
    if source.output_axes != (mark.perm[out_dim],) or source.shared_axes:
        return None
    base = self._bind(eqn, invals)[0]
    with set_name_stack(source.name_stack):
        low = source.get()
        x = invals[0] if low.input_fn is None else low.input_fn(invals[0])
        a = jnp.asarray(low.a, mark.dtype)
        # A as a kernel laid out like the weight, with the rank where the output features are.
        kernel = jnp.transpose(
            a,
            [
                len(source.input_axes) if d == out_dim else source.input_axes.index(mark.perm[d])
                for d in range(ndim)
            ],
        )
        t = _Interpreter._bind(eqn, [x, kernel])[0]
        b = jnp.asarray(low.b, mark.dtype)
        u = lax.dot_general(
            t,
            b,
            (((feature_dim,), (0,)), ((), ())),
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
        )
        order = list(range(u.ndim - 1))
        order.insert(feature_dim, u.ndim - 1)
        return _finish(mark, base, _transposed_to(u, order))


def _gather(
    self: _Interpreter, eqn: Any, invals: list[Any], index: int, mark: _Derived
) -> jax.Array | None:
    if index != 0:
        return None
    params = eqn.params
    dnums = params["dimension_numbers"]
    if dnums.operand_batching_dims or set(dnums.collapsed_slice_dims) != set(dnums.start_index_map):
        return None
    ndim = len(mark.perm)
    kept = [d for d in range(ndim) if d not in dnums.collapsed_slice_dims]
    shape = eqn.invars[0].aval.shape
    if len(kept) != 1 or params["slice_sizes"][kept[0]] != shape[kept[0]]:
        return None
    source = mark.source
    if source.input_axes is None:
        source.partition(ndim, {mark.perm[d] for d in dnums.collapsed_slice_dims}, "a lookup")
    assert source.input_axes is not None and source.output_axes is not None
    if source.output_axes != (mark.perm[kept[0]],) or source.shared_axes:
        return None
    base = self._bind(eqn, invals)[0]
    with set_name_stack(source.name_stack):
        low = source.get()
        a = jnp.asarray(low.a, mark.dtype)
        table = jnp.transpose(
            a,
            [
                len(source.input_axes) if d == kept[0] else source.input_axes.index(mark.perm[d])
                for d in range(ndim)
            ],
        )
        sizes = list(params["slice_sizes"])
        sizes[kept[0]] = a.shape[-1]
        rows = eqn.primitive.bind(table, invals[1], **{**params, "slice_sizes": tuple(sizes)})
        (offset_dim,) = dnums.offset_dims
        b = jnp.asarray(low.b, mark.dtype)
        u = lax.dot_general(rows, b, (((offset_dim,), (0,)), ((), ())))
        order = list(range(u.ndim - 1))
        order.insert(offset_dim, u.ndim - 1)
        return _finish(mark, base, _transposed_to(u, order))


_RULES: dict[Any, Callable[..., jax.Array | None]] = {
    prims.dot_general_p: _dot_general,
    prims.conv_general_dilated_p: _conv,
    prims.gather_p: _gather,
}
