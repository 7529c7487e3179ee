"""Summaries of Linen modules: record every module call in one abstract trace, then count.

Each module method call runs inside ``jax.named_scope`` with a unique marker, so every
equation of the traced program (and of its VJP, whose equations keep their name stacks)
names the call that issued it. Nothing is allocated: the variables come from
``jax.eval_shape`` and the program from ``jax.make_jaxpr``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from flax.core.scope import Scope
from jax.extend import core as jex_core
from jax.interpreters import partial_eval as pe

from .. import _calls
from .. import flops as _flops
from .._protocol import delegated_methods, is_wrapper
from .._warnings import warn
from .data import Row, Summary, VariableStats, describe

_MARKER = "wrapkit-call-"
_SYNTHETIC = -1  # the id of the row above several top-level calls
# Call ids are unique in the process, not only in one summary: nn.jit caches its traced body,
# and a summary that reuses a cached trace sees the markers of an earlier summary's calls.
# Those name no call of this one, so their equations count for the enclosing call.
_CALL_IDS = itertools.count()


@dataclasses.dataclass
class _Call:
    """A module method call as the interceptor saw it (mutable while tracing)."""

    id: int
    path: tuple[str, ...]
    module_type: str
    method: str
    wrapper: bool
    inputs: Any
    outputs: Any = None
    children: list[_Call] = dataclasses.field(default_factory=list)
    # A call that is not a method of its module (flax's lifted ``layer_forward``, the
    # ``<lambda>`` of nn.scan / nn.remat ...), a private helper (flax's WeightNorm
    # ``_l2_normalize``), ``setup``, a lifted transform's copy of its caller's call, or (by
    # default) a helper method a module calls on itself gets no row: its cost and callees
    # are its caller's.
    transparent: bool = False
    # Which variable tree the call's variables are in (0: the model's; others: those passed
    # to a ``Module.apply`` made inside the model), and the module's path inside that tree.
    tree: int = 0
    prefix: tuple[str, ...] = ()
    local_path: tuple[str, ...] = ()
    # The call is the top of a ``Module.apply`` made inside the model.
    nested: bool = False
    module_id: int = 0
    module_class: type = object
    root_scope_id: int = 0


def _is_method(cls: type, name: str) -> bool:
    """Whether ``cls`` defines ``name`` as a method, read without running any user code."""
    attribute = inspect.getattr_static(cls, name, None)
    return callable(attribute) or isinstance(attribute, staticmethod | classmethod)


class _Recorder:
    """An ``nn.intercept_methods`` interceptor that builds the call tree."""

    def __init__(self, mark: bool, helpers: bool = False, initialised: bool = False) -> None:
        self.mark = mark
        self.helpers = helpers
        # The model's variables come from wrapkit's own abstract init of the same call: the
        # scopes of the model's own variable tree may skip flax's re-check of their shapes.
        self.initialised = initialised
        self.model_root: int | None = None
        self.roots: list[_Call] = []
        self.stack: list[_Call] = []
        self.failed: _Call | None = None
        # "Type.method" while the recorder inspects a call: an error then is wrapkit's own.
        self.probing: str | None = None
        # id(root scope) -> (the scope, kept alive so that its id stays unique; tree; prefix)
        self.scopes: dict[int, tuple[Any, int, tuple[str, ...]]] = {}
        # The variables of each ``Module.apply`` made inside the model; 0 is the model's.
        self.trees: list[Any] = [None]
        self.ids: set[int] = set()

    def __call__(self, next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        self.probing = f"{type(module).__name__}.{context.method_name}"
        call = self._record(module, context.method_name, args, kwargs)
        if self.model_root is None:
            self.model_root = call.root_scope_id
        if self.initialised and call.root_scope_id == self.model_root:
            _reuse_initialised_shapes(module.scope)
        self.probing = None
        self.stack.append(call)
        try:
            scope = (
                jax.named_scope(f"{_MARKER}{call.id}")
                if self.mark and not call.transparent
                else contextlib.nullcontext()
            )
            with scope:
                out = next_fun(*args, **kwargs)
        except Exception:
            if self.failed is None:
                self.failed = call
            raise
        finally:
            self.stack.pop()
        call.outputs = _abstract(out)
        return out

    def diverted(self, module: Any) -> None:
        """The call being recorded for ``module`` runs a wrapper instead (``inject``): its
        row is the wrapper's, and the module's own call inside the wrapper."""
        if self.stack and self.stack[-1].module_id == id(module):
            self.stack[-1].transparent = True

    def _record(self, module: nn.Module, method: str, args: Any, kwargs: Any) -> _Call:
        # Only the class is read, never the instance's attributes through getattr: model
        # libraries define ``__getattr__`` (forwarding to a config), which would re-enter
        # user code from inside the interceptor.
        cls = type(module)
        wrapper = is_wrapper(module)
        parent = self.stack[-1] if self.stack else None
        visible = next((call for call in reversed(self.stack) if not call.transparent), None)
        tree, prefix, local, nested, root_id = self._locate(module, parent)
        path = prefix + local
        # flax's lifted class (``JitBlock``) subclasses the user's (``Block``).
        lifted_copy = (
            visible is not None
            and (visible.path, visible.method) == (path, method)
            and issubclass(visible.module_class, cls)
        )
        if lifted_copy and visible is not None:
            visible.module_type = cls.__name__
        transparent = (
            method == "setup"
            or _calls.is_transparent(cls)
            or (method.startswith("_") and not method.startswith("__"))
            or not (
                _is_method(cls, method)
                # A wrapper's per-instance delegates are its methods too.
                or (wrapper and method in delegated_methods(module))
            )
            # A lifted transform (nn.jit, nn.remat of a class ...) calls the same method of
            # its copy of the module: one call, one row.
            or lifted_copy
            # A helper method the module calls on itself is part of its caller's work.
            or (not self.helpers and visible is not None and visible.module_id == id(module))
        )
        call = _Call(
            id=next(_CALL_IDS),
            path=path,
            module_type=cls.__name__,
            method=method,
            wrapper=wrapper,
            inputs=_abstract((args, kwargs)),
            transparent=transparent,
            tree=tree,
            prefix=prefix,
            local_path=local,
            nested=nested,
            module_id=id(module),
            module_class=cls,
            root_scope_id=root_id,
        )
        (parent.children if parent is not None else self.roots).append(call)
        self.ids.add(call.id)
        return call

    def _locate(
        self, module: nn.Module, parent: _Call | None
    ) -> tuple[int, tuple[str, ...], tuple[str, ...], bool, int]:
        """(tree, path prefix, path in the tree, top of a nested apply, id of the root scope).

        Each ``Module.apply`` and each lifted transform makes a new root scope. A lifted
        transform's scope keeps the module's path (and a debug path naming the transform);
        a ``Module.apply`` made inside the model (a tied LM head's
        ``self.head.apply({"params": {"kernel": embedding.T}}, x)``) starts a variable tree
        of its own at path ``()``: its calls are placed under the calling module's path,
        and their variables are looked up in the variables passed to that apply.
        """
        scope = module.scope
        inherited = (parent.tree, parent.prefix) if parent is not None else (0, ())
        if scope is None:
            return *inherited, (), False, 0
        root = scope.root
        local = tuple(scope.path)
        known = self.scopes.get(id(root))
        if known is not None:
            return known[1], known[2], local, False, id(root)
        nested = (
            parent is not None
            and parent.root_scope_id != id(root)
            and not local
            and not scope.debug_path
        )
        if nested and parent is not None:
            tree = len(self.trees)
            self.trees.append(_abstract(scope.variables()))
            prefix = parent.path + (module.name or type(module).__name__,)
        else:
            tree, prefix = inherited
        self.scopes[id(root)] = (root, tree, prefix)
        return tree, prefix, local, nested, id(root)


def summary(
    module: nn.Module,
    *args: Any,
    rngs: Any = None,
    variables: Any = None,
    method: str | Callable[..., Any] | None = None,
    mutable: Any = False,
    vjp: bool = False,
    helpers: bool = False,
    **kwargs: Any,
) -> Summary:
    """Summarises a Linen module call: shapes, variables and FLOPs of every module call.

    One abstract trace of ``module.apply(variables, *args, **kwargs)`` records each module
    method call; every equation of the traced program is attributed to the call that
    issued it and counted with [`wrapkit.flops`][wrapkit.flops.count]'s rules. Nothing is
    allocated or run, so inputs and variables may be ``jax.ShapeDtypeStruct``s and the
    model may be far larger than memory.

    Wrappers are seen through: a wrapper's row holds the cost of its variable transform,
    and the inner module is its child, with its real path and the delegated method's name.

    Args:
        module: the Linen module to summarise.
        *args: positional arguments of the call: arrays or ``jax.ShapeDtypeStruct``s (other
            values are passed through as static Python values).
        rngs: PRNG keys as for ``Module.init``/``apply``: a key or a dict of keys, concrete
            or abstract. Values never matter to an abstract trace; by default a ``params``
            key is used, which flax also hands to other streams (``dropout`` ...). A dict
            without ``params`` gets an abstract one added, which initialisation needs.
        variables: the module's variables, concrete or abstract, to skip initialisation.
            By default they are made abstractly with ``jax.eval_shape(module.init, ...)``.
        method: the method to call, a name or a function, as in ``Module.apply``.
        mutable: collections the call may update, as in ``Module.apply``.
        vjp: also count the whole model's VJP (forward and backward with respect to the
            floating-point variables and inputs), per call.
        helpers: give a row to each helper method a module calls on itself
            (``self.split_heads(x)``). By default such a call is part of its caller's
            row, costs included; calls on other modules always have rows.
        **kwargs: keyword arguments of the call.

    Returns:
        A [`Summary`][wrapkit.Summary]: one row per module method call.

    Raises:
        TypeError: ``module`` is not a Linen module.
        ValueError: the trace failed (wrong input shapes or dtypes ...); the message says
            whether initialising, applying or differentiating failed, and names the module
            path and method where it failed. The original error is chained.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, wrapkit
        >>> x = jax.ShapeDtypeStruct((8, 3), jnp.float32)
        >>> table = wrapkit.summary(wrapkit.linen.WeightNorm(nn.Dense(4)), x)
        >>> for row in table:
        ...     print(row.depth, row.module_type, row.own_flops, row.flops)
        0 WeightNorm 48 272
        1 Dense 224 224
    """
    if not isinstance(module, nn.Module):
        hint = (
            " NNX modules are not supported by wrapkit.summary yet."
            if type(module).__module__.startswith("flax.nnx")
            else ""
        )
        raise TypeError(
            f"wrapkit.summary expects a flax.linen.Module, got {type(module).__name__}.{hint}"
        )
    with _cyclic_gc_paused():
        return _summary(module, args, kwargs, rngs, variables, method, mutable, vjp, helpers)


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
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


def _summary(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rngs: Any,
    variables: Any,
    method: str | Callable[..., Any] | None,
    mutable: Any,
    vjp: bool,
    helpers: bool,
) -> Summary:
    rngs = _prepare_rngs(rngs)
    dynamic, rebuild = _split_static((args, kwargs))

    initialised = variables is None
    if initialised:

        def init(rngs: Any, dynamic: Any, recorder: _Recorder | None = None) -> Any:
            call_args, call_kwargs = rebuild(dynamic)
            with nn.intercept_methods(recorder) if recorder else contextlib.nullcontext():
                return module.init(rngs, *call_args, method=method, **call_kwargs)

        try:
            variables = jax.eval_shape(init, rngs, dynamic)
        except Exception as error:
            # Only now pay for recording the calls: trace again to find where it failed.
            recorder = _Recorder(mark=False)
            with contextlib.suppress(Exception):
                jax.eval_shape(functools.partial(init, recorder=recorder), rngs, dynamic)
            raise _trace_error(module, recorder, "initialising", error) from error
    variables = _abstract(variables)

    inputs, treedef = jax.tree_util.tree_flatten((variables, rngs, dynamic))

    def apply(recorder: _Recorder, *leaves: Any) -> Any:
        variables, rngs, dynamic = jax.tree_util.tree_unflatten(treedef, leaves)
        call_args, call_kwargs = rebuild(dynamic)
        with nn.intercept_methods(recorder), _calls.listening(recorder.diverted):
            result = module.apply(
                variables, *call_args, rngs=rngs, method=method, mutable=mutable, **call_kwargs
            )
        # With ``mutable``, apply returns (output, updated variables).
        return result if mutable is not False else (result, {})

    recorder = _Recorder(mark=True, helpers=helpers, initialised=initialised)
    traced, outputs = _trace(apply, inputs, vjp, module, recorder)
    if _markers_in(traced.jaxpr) - recorder.ids:
        # A cached trace was reused: nn.jit keeps the body an earlier summary traced, so the
        # calls inside it ran no Python and were not recorded (their markers are that
        # summary's). Clearing jax's caches costs recompilation later, and is only needed
        # when a summary of such a model is repeated.
        jax.clear_caches()
        recorder = _Recorder(mark=True, helpers=helpers, initialised=initialised)
        traced, outputs = _trace(apply, inputs, vjp, module, recorder)
    # Values computed and then dropped (the first trace of an nn.scan body, say) are not
    # part of the program: XLA never runs them, and their calls get no rows.
    forward = _dce(traced, [index < outputs for index in range(len(traced.out_avals))])

    calls = _calls_in(recorder, forward)
    trees = [variables, *recorder.trees[1:]]
    rows = _Rows(calls, module, method, _abstract((args, kwargs)), trees)
    # The counter warns about primitives it has no rule for at each count; one summary
    # warns once, for the forward pass and the VJP together.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _flops.UnsupportedPrimitiveWarning)
        forward_count = _flops.count_jaxpr(forward, on_cost=rows.attributor("forward"))
        vjp_count = None
        if vjp:
            # The counter drops the program's dead code itself.
            vjp_count = _flops.count_jaxpr(traced, on_cost=rows.attributor("vjp"))
    result = rows.summary(module, variables, forward_count, vjp_count)
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


def _prepare_rngs(rngs: Any) -> dict[str, Any]:
    if rngs is not None and not isinstance(rngs, Mapping):
        return {"params": rngs}
    if isinstance(rngs, Mapping) and "params" in rngs:
        return dict(rngs)
    # flax's init needs a ``params`` stream; the values never matter to an abstract trace.
    params = jax.eval_shape(lambda: jax.random.key(0))
    return {"params": params, **(rngs or {})}


def _reuse_initialised_shapes(scope: Scope | None) -> None:
    """Lets ``scope`` return its existing parameters without tracing their initialisers again.

    flax's ``Scope.param`` checks each parameter that exists against ``jax.eval_shape`` of
    its initialiser, one trace per parameter: about a tenth of a GPT-2 summary's time. Called
    only for the scopes of the model's own variable tree when wrapkit made those variables
    itself, with ``jax.eval_shape(module.init, ...)`` on the same module, method and inputs:
    there every shape already is what its initialiser returned. Variables passed in by the
    user, those of a ``Module.apply`` inside the model, and the scopes of lifted transforms
    (which map variables on their way in) keep flax's check. Only this scope object, which
    flax makes for this one ``apply`` and discards after it, is changed, never flax's class;
    a parameter that does not exist yet goes to flax's own method.
    """
    if type(scope) is not Scope or "param" in vars(scope):
        return

    def param(
        name: str,
        init_fn: Callable[..., Any],
        *init_args: Any,
        unbox: bool = True,
        **init_kwargs: Any,
    ) -> Any:
        if not scope.has_variable("params", name):
            return Scope.param(scope, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        scope.reserve(name, "params")  # as flax does: a name is declared once
        value = scope.get_variable("params", name)
        return meta.unbox(value) if unbox else value

    scope.param = param  # type: ignore[method-assign]


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def _split_static(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Separates the array leaves (traced) from static Python values (closed over)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [_is_array(leaf) for leaf in leaves]
    dynamic = [leaf for leaf, array in zip(leaves, is_array, strict=True) if array]

    def rebuild(values: list[Any]) -> Any:
        it = iter(values)
        merged = [next(it) if array else leaf for leaf, array in zip(leaves, is_array, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, merged)

    return dynamic, rebuild


def _abstract(tree: Any) -> Any:
    """Arrays and tracers as ``jax.ShapeDtypeStruct``; everything else unchanged."""

    def leaf(value: Any) -> Any:
        if isinstance(value, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(np.shape(value), value.dtype)
        return value

    return jax.tree_util.tree_map(leaf, tree)


def _trace_error(
    module: nn.Module, recorder: _Recorder | None, doing: str, error: Exception
) -> ValueError:
    """The error for a failed trace: what failed (initialising, applying, differentiating,
    or wrapkit's own recording of a call), and the path and method of the call it failed in.
    """
    name = type(module).__name__
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
    return ValueError(
        f"wrapkit.summary failed while {doing} {name}, in {where}: {reason}{_hint(error)}"
    )


def _hint(error: Exception) -> str:
    """Advice for errors about shapes and dtypes; flax's other errors explain themselves."""
    if isinstance(error, flax.errors.ScopeParamShapeError):
        return "\nCheck the input shapes against the shapes of the given variables."
    if isinstance(error, flax.errors.FlaxError):
        return ""
    if isinstance(error, TypeError | ValueError):
        return "\nCheck the input shapes and dtypes against what this module expects."
    return ""


def _calls_in(recorder: _Recorder, program: jex_core.ClosedJaxpr) -> list[_Call]:
    """The recorded calls that belong to ``program``.

    Lifted transforms (nn.scan ...) may trace a body more than once, and flax's own
    wrappers compute values they then drop; jax leaves the discarded traces out of the
    program. A call that left no equation in the program is dropped when a later call
    from the same caller repeats its module and method: it was an earlier trace of that
    call. (A call that issues no equation at all keeps its row.)
    """
    seen = _markers_in(program.jaxpr)

    def alive(call: _Call) -> bool:
        return call.id in seen or any(alive(child) for child in call.children)

    def prune(children: list[_Call]) -> list[_Call]:
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


def _markers_in(jaxpr: jex_core.Jaxpr) -> set[int]:
    found: set[int] = set()
    stacks: set[Any] = set()

    def visit(jaxpr: jex_core.Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            stacks.add(eqn.source_info.name_stack)
            for sub in jex_core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr)
    for stack in stacks:
        for element in stack.stack:
            name = getattr(element, "name", "")
            if name.startswith(_MARKER):
                found.add(int(name[len(_MARKER) :]))
    return found


def _visible(calls: list[_Call]) -> list[_Call]:
    """``calls``, each transparent one replaced by its own visible callees."""
    return [
        shown
        for call in calls
        for shown in (_visible(call.children) if call.transparent else [call])
    ]


class _Rows:
    """Turns the call tree into rows, and attributes counted equations to them."""

    def __init__(
        self, roots: list[_Call], module: nn.Module, method: Any, inputs: Any, trees: list[Any]
    ) -> None:
        self.trees = trees
        self.calls: list[_Call] = []
        self.parent: list[int | None] = []
        self.depth: list[int] = []
        self.row_of_call: dict[int, int] = {}
        visible = _visible(roots)
        if len(visible) == 1:
            root = visible[0]
        else:  # ``method=`` a function calling several methods: one row above them all
            root = _Call(
                id=_SYNTHETIC,
                path=(),
                module_type=type(module).__name__,
                method=getattr(method, "__name__", None) or str(method or "__call__"),
                wrapper=is_wrapper(module),
                inputs=inputs,
                children=visible,
            )
        self._add(root, None, 0)
        self.own = {
            "forward": [[0, 0, 0] for _ in self.calls],
            "vjp": [[0, 0, 0] for _ in self.calls],
        }

    def _add(self, call: _Call, parent: int | None, depth: int) -> None:
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
        own = self.own[kind]
        row_of_call = self.row_of_call
        cache: dict[tuple[str, ...], int] = {}

        def row_of(scopes: tuple[str, ...]) -> int:
            for name in reversed(scopes):
                if name.startswith(_MARKER):
                    row = row_of_call.get(int(name[len(_MARKER) :]))
                    if row is not None:
                        return row
            return 0  # outside every module call (flax's bookkeeping): the root's

        def on_cost(scopes: tuple[str, ...], primitive: str, cost: _flops.Cost) -> None:
            row = cache.get(scopes)
            if row is None:
                row = cache[scopes] = row_of(scopes)
            own[row][0] += cost.flops
            own[row][1] += cost.transcendentals
            own[row][2] += cost.rng_bits

        return on_cost

    def summary(
        self,
        module: nn.Module,
        variables: Any,
        forward: _flops.FlopCount,
        vjp: _flops.FlopCount | None,
    ) -> Summary:
        count = len(self.calls)
        children: list[list[int]] = [[] for _ in range(count)]
        for index, parent in enumerate(self.parent):
            if parent is not None:
                children[parent].append(index)

        def totals(values: list[int]) -> list[int]:
            result = list(values)
            for index in range(count - 1, 0, -1):  # children come after their parents
                parent = self.parent[index]
                if parent is not None:
                    result[parent] += result[index]
            return result

        own_flops = [cost[0] for cost in self.own["forward"]]
        own_trans = [cost[1] for cost in self.own["forward"]]
        own_vjp = [cost[0] for cost in self.own["vjp"]]
        own_bits = [cost[2] for cost in self.own["forward"]]
        flops, trans, vjp_flops = totals(own_flops), totals(own_trans), totals(own_vjp)
        bits = totals(own_bits)

        paths = {(call.tree, call.local_path) for call in self.calls}
        seen: set[tuple[str, ...]] = set()
        rows = []
        for index, call in enumerate(self.calls):
            # The row above several top-level calls is not a call of the module: its
            # variables are on the module's own call.
            synthetic = call.id == _SYNTHETIC
            rows.append(
                Row(
                    index=index,
                    parent=self.parent[index],
                    children=tuple(children[index]),
                    depth=self.depth[index],
                    path=call.path,
                    module_type=call.module_type,
                    method=call.method,
                    inputs=call.inputs,
                    outputs=call.outputs,
                    variables=(
                        MappingProxyType({})
                        if synthetic
                        else _own_variables(
                            self.trees[call.tree], call.tree, call.local_path, paths
                        )
                    ),
                    repeated=not synthetic and call.path in seen,
                    wrapper=call.wrapper,
                    own_flops=own_flops[index],
                    flops=flops[index],
                    own_transcendentals=own_trans[index],
                    transcendentals=trans[index],
                    own_vjp_flops=own_vjp[index] if vjp is not None else None,
                    vjp_flops=vjp_flops[index] if vjp is not None else None,
                    own_rng_bits=own_bits[index],
                    rng_bits=bits[index],
                    nested=call.nested,
                )
            )
            if not synthetic:
                seen.add(call.path)
        if (
            flops[0] != forward.flops
            or bits[0] != forward.rng_bits
            or (vjp is not None and vjp_flops[0] != vjp.flops)
        ):
            raise AssertionError("wrapkit bug: the rows' FLOPs do not add up to the total")
        unsupported = set(forward.unsupported) | set(vjp.unsupported if vjp else ())
        return Summary(
            module_type=type(module).__name__,
            rows=tuple(rows),
            collections=tuple(variables),
            variables=MappingProxyType(
                {name: VariableStats.of(tree) for name, tree in variables.items()}
            ),
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


def _own_variables(
    variables: Mapping[str, Any],
    tree: int,
    path: tuple[str, ...],
    paths: set[tuple[int, tuple[str, ...]]],
) -> Mapping[str, VariableStats]:
    """The variables at ``path`` of variable tree ``tree``, without those of submodules
    that have their own rows."""
    own = {}
    for collection, values in variables.items():
        for name in path:
            if not isinstance(values, Mapping) or name not in values:
                values = None
                break
            values = values[name]
        if values is None:
            continue
        if isinstance(values, Mapping):
            values = {
                key: value for key, value in values.items() if (tree, path + (key,)) not in paths
            }
        stats = VariableStats.of(values)
        if stats.count:
            own[collection] = stats
    return MappingProxyType(own)


def _trace(
    apply: Callable[..., tuple[Any, Any]],
    inputs: list[Any],
    vjp: bool,
    module: nn.Module,
    recorder: _Recorder,
) -> tuple[jex_core.ClosedJaxpr, int]:
    """The traced program of ``apply``, and how many of its outputs are the forward's.

    ``apply(recorder, *inputs)`` runs the module under ``recorder``. With ``vjp``, the
    program is the whole VJP: its inputs are ``inputs`` and then the cotangents of the
    module's floating-point outputs, its outputs the forward's and then the gradients with
    respect to the floating-point inputs. The forward pass is traced once, linearised as it
    goes (``jax.vjp``), and its pullback is traced on abstract cotangents; the two programs
    are joined at the residuals. Cotangents are inputs, not constants, so that no backward
    work is folded away that a real training step does (XLA folds arithmetic on constants).
    Otherwise it is the forward pass. Failures raise ``ValueError`` naming what failed.
    """
    if not vjp:
        try:
            traced = jax.make_jaxpr(functools.partial(apply, recorder))(*inputs)
        except Exception as error:
            raise _trace_error(module, recorder, "applying", error) from error
        return traced, len(traced.out_avals)
    moves = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in inputs]

    def forward(*leaves: Any) -> Any:
        fixed = [leaf for leaf, moving in zip(leaves, moves, strict=True) if not moving]

        def differentiable(*moving: Any) -> tuple[list[Any], Any]:
            it_moving, it_fixed = iter(moving), iter(fixed)
            output, state = apply(recorder, *(next(it_moving if m else it_fixed) for m in moves))
            # Floating-point outputs are differentiated; the rest rides along.
            values = jax.tree_util.tree_leaves(output)
            floats = [value for value in values if jnp.issubdtype(value.dtype, jnp.inexact)]
            others = [value for value in values if not jnp.issubdtype(value.dtype, jnp.inexact)]
            return floats, (others, state)

        moving = [leaf for leaf, m in zip(leaves, moves, strict=True) if m]
        floats, pullback, rest = jax.vjp(differentiable, *moving, has_aux=True)
        # The pullback is a pytree whose leaves are the residuals.
        return (floats, rest), pullback

    try:
        first, ((floats, rest), pullback) = jax.make_jaxpr(forward, return_shape=True)(*inputs)
    except Exception as error:
        if recorder.probing is not None:
            raise _trace_error(module, recorder, "applying", error) from error
        # Linearising runs the forward pass. Only now pay for a plain forward trace, to
        # tell a failing forward pass from a failing linearisation.
        plain = _Recorder(mark=False)
        try:
            jax.eval_shape(functools.partial(apply, plain), *inputs)
        except Exception as forward_error:
            raise _trace_error(module, plain, "applying", forward_error) from forward_error
        raise _trace_error(module, None, "differentiating", error) from error
    outputs = len(jax.tree_util.tree_leaves((floats, rest)))
    residuals = jax.tree_util.tree_structure(pullback)

    def backward(residual_values: list[Any], cotangents: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(residuals, residual_values)(cotangents)

    try:
        second = jax.make_jaxpr(backward)(jax.tree_util.tree_leaves(pullback), floats)
    except Exception as error:
        raise _trace_error(module, None, "differentiating", error) from error
    return _join(first, outputs, second), outputs


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
