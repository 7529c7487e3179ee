"""The summary engine, framework-neutral: one traced program and a call tree -> a ``Summary``.

A front end (``capture_linen``, ``capture_nnx``) records the module method calls of one
abstract trace on a ``Recorder`` and runs each inside ``_name_stack.mark_call(<id>)``, so
that every equation of the traced program (and of its VJP, whose equations keep their name
stacks) names the call that issued it. The engine traces the front end's function (and,
when asked, the VJP of a replay of that program in which repeated calls share one program:
``segments.py``), drops what the program does not use, turns the call tree into rows,
counts the program with [`wrapkit.flops`][wrapkit.flops.count]'s rules and gives each
counted equation to the row of the innermost call that issued it. It knows neither Linen
nor NNX: where a call's variables are is the front end's answer (``FrontEnd.variables``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import partial_eval as pe

from .. import flops as _flops
from .._name_stack import Parts, mark_call, marked_calls, resolve
from .._warnings import warn
from . import segments
from .data import Row, Summary, VariableStats, describe

# Call ids are unique in the process, not only in one summary: a lifted jit (nn.jit) caches
# its traced body, and a summary that reuses a cached trace sees the markers of an earlier
# summary's calls. Those name no call of this one, so their equations count for the
# enclosing call.
_CALL_IDS = itertools.count()


def new_call_id() -> int:
    return next(_CALL_IDS)


@dataclasses.dataclass
class Call:
    """A module method call as a front end recorded it (mutable while tracing).

    Front ends subclass it with what they need to locate the call's variables.
    """

    id: int
    path: tuple[str, ...]
    module_type: str
    method: str
    wrapper: bool
    inputs: Any
    outputs: Any = None
    children: list[Call] = dataclasses.field(default_factory=list)
    # A call that gets no row: its cost and callees are its caller's (a front end decides
    # which: helpers, lifted copies, calls that are not methods of their module ...).
    transparent: bool = False
    # The call is the top of a separate application made inside the model (Linen's
    # ``Module.apply`` of a tied head); see ``Row.nested``.
    nested: bool = False


def top_call(name: str, method: Any, wrapper: bool, inputs: Any, calls: list[Call]) -> Call:
    """One row above the calls of a ``method=`` that calls several methods (a function)."""
    return Call(
        id=new_call_id(),
        path=(),
        module_type=name,
        method=getattr(method, "__name__", None) or str(method or "__call__"),
        wrapper=wrapper,
        inputs=inputs,
        children=calls,
    )


class Recorder:
    """The call tree of one trace: what a front end's method hook adds calls to."""

    def __init__(self, mark: bool) -> None:
        self.mark = mark
        self.roots: list[Call] = []
        self.stack: list[Call] = []
        self.failed: Call | None = None
        # "Type.method" while the front end inspects a call: an error then is wrapkit's own.
        self.probing: str | None = None
        self.ids: set[int] = set()

    @property
    def caller(self) -> Call | None:
        """The call being run, the new call's caller."""
        return self.stack[-1] if self.stack else None

    @property
    def visible_caller(self) -> Call | None:
        """The innermost call being run that gets a row."""
        return next((call for call in reversed(self.stack) if not call.transparent), None)

    def add(self, call: Call) -> None:
        """Adds ``call`` under the call being run (or as a root)."""
        parent = self.caller
        (parent.children if parent is not None else self.roots).append(call)
        self.ids.add(call.id)

    def run(self, call: Call, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Runs ``fn(*args, **kwargs)`` as ``call``: marked, and its outputs recorded."""
        self.stack.append(call)
        try:
            scope = (
                mark_call(call.id)
                if self.mark and not call.transparent
                else contextlib.nullcontext()
            )
            with scope:
                out = fn(*args, **kwargs)
        except Exception:
            if self.failed is None:
                self.failed = call
            raise
        finally:
            self.stack.pop()
        call.outputs = abstract(out)
        return out


class FrontEnd(Protocol):
    """What the engine asks of a framework's front end for one summary."""

    #: the summarised module's class name
    name: str

    def recorder(self) -> Recorder:
        """A fresh recorder that marks the calls it records."""
        ...

    def apply(self, recorder: Recorder, *leaves: Any) -> tuple[Any, Any]:
        """Runs the model on the input ``leaves`` under ``recorder``: (output, state); the
        state (updated variables) is counted but not differentiated."""
        ...

    def differentiable(self, leaves: Sequence[Any]) -> list[bool]:
        """Which input leaves the VJP is taken with respect to."""
        ...

    def top(self, calls: list[Call]) -> Call:
        """The row above several top-level ``calls`` (``method=`` a function)."""
        ...

    def variables(
        self, recorder: Recorder, calls: Sequence[Call]
    ) -> list[Mapping[str, VariableStats]]:
        """Each call's own variables by collection (``VariableStats``), those of callees
        with rows of their own left out."""
        ...

    def totals(self) -> tuple[tuple[str, ...], Mapping[str, VariableStats]]:
        """The collections, and the statistics of each over the whole model."""
        ...

    def hint(self, error: Exception) -> str:
        """Advice appended to the message of a failed trace ("" for none)."""
        ...


def summarise(front: FrontEnd, inputs: list[Any], vjp: bool) -> Summary:
    """The summary of ``front.apply`` on ``inputs`` (leaves, concrete or abstract)."""
    recorder = front.recorder()
    traced, outputs, parts = trace(front, recorder, inputs, vjp)
    if marked_calls(traced.jaxpr, parts) - recorder.ids:
        # A cached trace was reused: a lifted jit (nn.jit) keeps the body an earlier summary
        # traced, so the calls inside it ran no Python and were not recorded (their markers
        # are that summary's). Clearing jax's caches costs recompilation later, and is only
        # needed when a summary of such a model is repeated.
        jax.clear_caches()
        recorder = front.recorder()
        traced, outputs, parts = trace(front, recorder, inputs, vjp)
    # Values computed and then dropped (the first trace of an nn.scan body, say) are not
    # part of the program: XLA never runs them, and their calls get no rows.
    forward = _dce(traced, [index < outputs for index in range(len(traced.out_avals))])

    rows = _Rows(_calls_in(recorder, forward, parts), front.top, parts)
    # The counter warns about primitives it has no rule for at each count; one summary
    # warns once, for the forward pass and the VJP together.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _flops.UnsupportedPrimitiveWarning)
        forward_count = _flops.count_jaxpr(forward, on_cost=rows.attributor("forward"))
        vjp_count = None
        if vjp:
            # The counter drops the program's dead code itself.
            vjp_count = _flops.count_jaxpr(traced, on_cost=rows.attributor("vjp"))
    result = rows.summary(front, recorder, forward_count, vjp_count)
    if result.unsupported:
        first = result.unsupported[0]
        warn(
            f"No FLOP rule for primitive(s) {', '.join(result.unsupported)}; "
            f"wrapkit.summary counted them as 0 and lists them in Summary.unsupported. Add "
            f"a rule with @wrapkit.flops.register_rule({first!r}); a rule is "
            "`rule(eqn) -> Cost`, and wrapkit.flops.elementwise(flops=...) makes one.",
            _flops.UnsupportedPrimitiveWarning,
        )
    return result


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector, restoring its state afterwards.

    A trace allocates many objects that stay alive until it ends; each full collection
    walks all of them, so with the collector running a summary's time grows faster than
    the model's depth (a 48-layer GPT-2 took about 20% longer). Reference counting still
    frees everything else, and the cycles are collected once the collector resumes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def is_method(cls: type, name: str) -> bool:
    """Whether ``cls`` defines ``name`` as a method, read without running any user code."""
    attribute = inspect.getattr_static(cls, name, None)
    return callable(attribute) or isinstance(attribute, staticmethod | classmethod)


def is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def split_static(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Separates the array leaves (traced) from static Python values (closed over)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [is_array(leaf) for leaf in leaves]
    dynamic = [leaf for leaf, array in zip(leaves, arrays, strict=True) if array]

    def rebuild(values: list[Any]) -> Any:
        it = iter(values)
        merged = [next(it) if array else leaf for leaf, array in zip(leaves, arrays, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, merged)

    return dynamic, rebuild


def abstract(tree: Any) -> Any:
    """Arrays and tracers as ``jax.ShapeDtypeStruct``; everything else unchanged."""

    def leaf(value: Any) -> Any:
        if isinstance(value, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(np.shape(value), value.dtype)
        return value

    return jax.tree_util.tree_map(leaf, tree)


def trace_error(
    name: str, recorder: Recorder | None, doing: str, error: Exception, hint: str = ""
) -> ValueError:
    """The error for a failed trace of module ``name``: what failed (initialising,
    applying, differentiating, or wrapkit's own recording of a call), and the path and
    method of the call it failed in."""
    reason = f"{type(error).__name__}: {error}"
    if recorder is not None and recorder.probing is not None:
        return ValueError(
            f"wrapkit.summary failed while recording the call {recorder.probing} of {name}, "
            f"before the call ran: {reason}\nThis is an error in wrapkit, not in the model; "
            "please report it."
        )
    if doing == "differentiating":
        return ValueError(
            f"wrapkit.summary traced {name}, but not its VJP: {reason}\nSummarise without "
            "vjp=True to count the forward pass only."
        )
    failed = recorder.failed if recorder is not None else None
    where = (
        f"{failed.module_type} at path '{'/'.join(failed.path) or '<root>'}' "
        f"({failed.method}) with inputs {describe(failed.inputs)}"
        if failed is not None
        else name
    )
    return ValueError(f"wrapkit.summary failed while {doing} {name}, in {where}: {reason}{hint}")


def _failure(front: FrontEnd, recorder: Recorder | None, doing: str, error: Exception) -> Any:
    return trace_error(front.name, recorder, doing, error, front.hint(error))


def trace(
    front: FrontEnd, recorder: Recorder, inputs: list[Any], vjp: bool
) -> tuple[jex_core.ClosedJaxpr, int, Parts]:
    """The traced program of ``front.apply``, how many of its outputs are the forward's, and
    the table of the calls its equations name relatively (``_name_stack.resolve``).

    With ``vjp``, the program is the whole VJP: its inputs are ``inputs`` and then the
    cotangents of the module's floating-point outputs, its outputs the forward's and then
    the gradients with respect to the floating-point inputs. The module runs once, in a
    plain trace of the forward pass; that program is linearised (``jax.vjp`` of its replay,
    each repeated call's equations linearised once: ``segments.replay``), and the pullback
    is traced on abstract cotangents; the two programs are joined at the residuals.
    Cotangents are inputs, not constants, so that no backward work is folded away that a
    real training step does (XLA folds arithmetic on constants). Otherwise it is the
    forward pass. Failures raise ``ValueError`` naming what failed.
    """
    apply = front.apply
    if not vjp:
        try:
            traced = jax.make_jaxpr(functools.partial(apply, recorder))(*inputs)
        except Exception as error:
            raise _failure(front, recorder, "applying", error) from error
        return traced, len(traced.out_avals), {}
    moves = front.differentiable(inputs)

    def plain(*leaves: Any) -> tuple[list[Any], list[Any], Any]:
        output, state = apply(recorder, *leaves)
        # Floating-point outputs are differentiated; the rest rides along.
        values = jax.tree_util.tree_leaves(output)
        floats = [value for value in values if jnp.issubdtype(value.dtype, jnp.inexact)]
        others = [value for value in values if not jnp.issubdtype(value.dtype, jnp.inexact)]
        return floats, others, state

    try:
        program, (float_outputs, _, _) = jax.make_jaxpr(plain, return_shape=True)(*inputs)
    except Exception as error:
        raise _failure(front, recorder, "applying", error) from error
    run, parts = segments.replay(program, recorder.roots, _visible)
    floating = len(float_outputs)

    def forward(*leaves: Any) -> Any:
        fixed = [leaf for leaf, moving in zip(leaves, moves, strict=True) if not moving]

        def differentiable(*moving: Any) -> tuple[list[Any], list[Any]]:
            it_moving, it_fixed = iter(moving), iter(fixed)
            outs = run(*(next(it_moving if m else it_fixed) for m in moves))
            return outs[:floating], outs[floating:]

        moving = [leaf for leaf, m in zip(leaves, moves, strict=True) if m]
        floats, pullback, rest = jax.vjp(differentiable, *moving, has_aux=True)
        # The pullback is a pytree whose leaves are the residuals.
        return (floats, rest), pullback

    try:
        first, ((floats, rest), pullback) = jax.make_jaxpr(forward, return_shape=True)(*inputs)
    except Exception as error:
        raise _failure(front, None, "differentiating", error) from error
    outputs = len(jax.tree_util.tree_leaves((floats, rest)))
    residuals = jax.tree_util.tree_structure(pullback)

    def backward(residual_values: list[Any], cotangents: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(residuals, residual_values)(cotangents)

    try:
        second = jax.make_jaxpr(backward)(jax.tree_util.tree_leaves(pullback), floats)
    except Exception as error:
        raise _failure(front, None, "differentiating", error) from error
    return _join(first, outputs, second), outputs, parts


def _join(
    first: jex_core.ClosedJaxpr, outputs: int, second: jex_core.ClosedJaxpr
) -> jex_core.ClosedJaxpr:
    """One program: ``first``, then ``second`` fed with ``first``'s outputs after ``outputs``.

    Its inputs are ``first``'s and ``second``'s remaining ones; its outputs ``first``'s
    first ``outputs`` and all of ``second``'s. Joined rather than traced as one function so
    that ``second``'s own inputs (the cotangents) can be inputs of the program.
    """
    a, b = first.jaxpr, second.jaxpr
    passed = a.outvars[outputs:]
    env: dict[Any, Any] = dict(zip(b.invars[: len(passed)], passed, strict=True))

    def substitute(atom: Any) -> Any:
        return atom if isinstance(atom, jex_core.Literal) else env.get(atom, atom)

    eqns = [*a.eqns]
    eqns.extend(eqn.replace(invars=[substitute(v) for v in eqn.invars]) for eqn in b.eqns)
    invars = [*a.invars, *b.invars[len(passed) :]]
    outvars = [*a.outvars[:outputs], *(substitute(v) for v in b.outvars)]
    debug = a.debug_info
    jaxpr = jex_core.Jaxpr(
        constvars=[*a.constvars, *b.constvars],
        invars=invars,
        outvars=outvars,
        eqns=eqns,
        effects=a.effects | b.effects,
        debug_info=debug._replace(
            arg_names=(*debug.arg_names, *b.debug_info.arg_names[len(passed) :]),
            result_paths=None,
        ),
    )
    return jex_core.ClosedJaxpr(jaxpr, [*first.consts, *second.consts])


def _dce(program: jex_core.ClosedJaxpr, used: list[bool]) -> jex_core.ClosedJaxpr:
    """``program`` with only the equations the ``used`` outputs need (inputs all kept)."""
    jaxpr = pe.dce_jaxpr(program.jaxpr, used, instantiate=True)[0]
    return jex_core.ClosedJaxpr(jaxpr, program.consts)


def _calls_in(recorder: Recorder, program: jex_core.ClosedJaxpr, parts: Parts) -> list[Call]:
    """The recorded calls that belong to ``program``.

    Lifted transforms (nn.scan ...) may trace a body more than once, and flax's own
    wrappers compute values they then drop; jax leaves the discarded traces out of the
    program. A call that left no equation in the program is dropped when a later call
    from the same caller repeats its module and method: it was an earlier trace of that
    call. (A call that issues no equation at all keeps its row.)
    """
    seen = marked_calls(program.jaxpr, parts)

    def alive(call: Call) -> bool:
        return call.id in seen or any(alive(child) for child in call.children)

    def prune(children: list[Call]) -> list[Call]:
        later: set[tuple[tuple[str, ...], str]] = set()
        kept = []
        for child in reversed(children):
            key = (child.path, child.method)
            if key not in later or alive(child):
                kept.append(child)
                child.children = prune(child.children)
            later.add(key)
        return kept[::-1]

    recorder.roots = prune(recorder.roots)
    return recorder.roots


def _visible(calls: list[Call]) -> list[Call]:
    """``calls``, each transparent one replaced by its own visible callees."""
    return [
        shown
        for call in calls
        for shown in (_visible(call.children) if call.transparent else [call])
    ]


class _Rows:
    """The call tree as rows (depth first, in call order), and each row's own cost."""

    def __init__(self, roots: list[Call], top: Callable[[list[Call]], Call], parts: Parts) -> None:
        self.parts = parts
        self.calls: list[Call] = []
        self.parent: list[int | None] = []
        self.depth: list[int] = []
        self.row_of_call: dict[int, int] = {}
        visible = _visible(roots)
        # ``method=`` a function calling several methods: one row above them all, which is
        # not a call of the module (it has no variables, and repeats nothing).
        self.synthetic = len(visible) != 1
        self._add(top(visible) if self.synthetic else visible[0], None, 0)
        # Per row: [flops, transcendentals, rng_bits], added to in the counter's hot path.
        self.own: dict[str, list[list[int]]] = {
            kind: [[0, 0, 0] for _ in self.calls] for kind in ("forward", "vjp")
        }

    def _add(self, call: Call, parent: int | None, depth: int) -> None:
        if call.transparent:
            for child in call.children:
                self._add(child, parent, depth)
            return
        index = len(self.calls)
        self.calls.append(call)
        self.parent.append(parent)
        self.depth.append(depth)
        self.row_of_call[call.id] = index
        for child in call.children:
            self._add(child, index, depth + 1)

    def attributor(self, kind: str) -> Callable[[tuple[str, ...], str, _flops.Cost], None]:
        """An ``on_cost`` for ``count_jaxpr``: each cost to the innermost marked call's row."""
        own = self.own[kind]
        row_of_call = self.row_of_call
        parts = self.parts
        cache: dict[tuple[str, ...], int] = {}

        def row_of(scopes: tuple[str, ...]) -> int:
            for call in reversed(resolve(scopes, parts)):
                row = row_of_call.get(call)
                if row is not None:
                    return row
            return 0  # outside every module call (a framework's bookkeeping): the root's

        def on_cost(scopes: tuple[str, ...], primitive: str, cost: _flops.Cost) -> None:
            row = cache.get(scopes)
            if row is None:
                row = cache[scopes] = row_of(scopes)
            own[row][0] += cost.flops
            own[row][1] += cost.transcendentals
            own[row][2] += cost.rng_bits

        return on_cost

    def _children(self) -> list[tuple[int, ...]]:
        children: list[list[int]] = [[] for _ in self.calls]
        for index, parent in enumerate(self.parent):
            if parent is not None:
                children[parent].append(index)
        return [tuple(indices) for indices in children]

    def _costs(self, kind: str) -> tuple[list[_flops.Cost], list[_flops.Cost]]:
        """Each row's own cost, and its total with its callees' (summed bottom-up, so that
        no child exceeds its parent)."""
        own = [_flops.Cost(*cost) for cost in self.own[kind]]
        total = list(own)
        for index in range(len(own) - 1, 0, -1):  # children come after their parents
            parent = self.parent[index]
            if parent is not None:
                total[parent] = total[parent] + total[index]
        return own, total

    def _variables(self, front: FrontEnd, recorder: Recorder) -> list[Mapping[str, VariableStats]]:
        calls = self.calls[1:] if self.synthetic else self.calls
        found = front.variables(recorder, calls)
        empty: Mapping[str, VariableStats] = MappingProxyType({})
        return [empty, *found] if self.synthetic else list(found)

    def _repeated(self) -> list[bool]:
        seen: set[tuple[str, ...]] = set()
        repeated = []
        for index, call in enumerate(self.calls):
            synthetic = self.synthetic and index == 0
            repeated.append(not synthetic and call.path in seen)
            if not synthetic:
                seen.add(call.path)
        return repeated

    def summary(
        self,
        front: FrontEnd,
        recorder: Recorder,
        forward: _flops.FlopCount,
        vjp: _flops.FlopCount | None,
    ) -> Summary:
        own, total = self._costs("forward")
        own_vjp, total_vjp = self._costs("vjp")
        if total[0] != forward.total or (vjp is not None and total_vjp[0].flops != vjp.flops):
            raise AssertionError("wrapkit bug: the rows' FLOPs do not add up to the total")
        children = self._children()
        variables = self._variables(front, recorder)
        repeated = self._repeated()
        rows = tuple(
            Row(
                index=index,
                parent=self.parent[index],
                children=children[index],
                depth=self.depth[index],
                path=call.path,
                module_type=call.module_type,
                method=call.method,
                inputs=call.inputs,
                outputs=call.outputs,
                variables=variables[index],
                repeated=repeated[index],
                wrapper=call.wrapper,
                own_flops=own[index].flops,
                flops=total[index].flops,
                own_transcendentals=own[index].transcendentals,
                transcendentals=total[index].transcendentals,
                own_vjp_flops=own_vjp[index].flops if vjp is not None else None,
                vjp_flops=total_vjp[index].flops if vjp is not None else None,
                own_rng_bits=own[index].rng_bits,
                rng_bits=total[index].rng_bits,
                nested=call.nested,
            )
            for index, call in enumerate(self.calls)
        )
        collections, totals = front.totals()
        unsupported = set(forward.unsupported) | set(vjp.unsupported if vjp else ())
        return Summary(
            module_type=front.name,
            rows=rows,
            collections=collections,
            variables=MappingProxyType(dict(totals)),
            flops=forward.flops,
            transcendentals=forward.transcendentals,
            vjp_flops=vjp.flops if vjp is not None else None,
            primitives=forward.by_primitive,
            vjp_primitives=vjp.by_primitive if vjp is not None else MappingProxyType({}),
            unsupported=tuple(sorted(unsupported)),
            lower_bound=forward.lower_bound or bool(vjp and vjp.lower_bound),
            branches=_branches(forward),
            rng_bits=forward.rng_bits,
        )


def _branches(count: _flops.FlopCount) -> int:
    branches = count.branches
    return branches if isinstance(branches, int) else len(branches)
