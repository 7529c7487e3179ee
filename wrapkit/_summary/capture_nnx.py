"""The NNX front end of the summary: record NNX module calls, locate their variables.

NNX puts nothing into the name stack and has no method interceptor, so for the duration of
one trace this front end replaces the methods of every module class in the model by
recording ones (``_patched``), and puts every class back in ``finally``, whatever the model
raises. The model is traced through ``nnx.split``/``nnx.merge``: its state leaves (concrete
or, from ``nnx.eval_shape``, abstract) are the inputs of the traced program, and the model
the methods run on is the one merged inside the trace, so the user's model is never
touched. The engine (``engine.py``) traces, marks, attributes and counts.

What this relies on in flax.nnx 0.12.8 beyond its documented API, each pinned by
``tests/test_summary_nnx.py``: module classes are plain Python classes, so a function put
on one for the trace takes effect for every instance (and is taken off again);
``nnx.merge`` inside a trace builds a model whose Variables hold the traced values;
``nnx.iter_modules`` gives a shared module once, at its first path; and NNX's transforms
(``nnx.remat``, ``nnx.scan``, ``nnx.vmap``) call a copy of the module made inside their own
trace, found again by its class (``_Recorder._path_of``).

A wrapkit.nnx wrapper runs the wrapped module's method on a *view*, a module merged for the
call (``wrapkit/nnx/_wrapper.py``): through ``views_reported`` the view's method runs inside
``_Recorder.view``, which gives the view's modules the paths of the modules they stand for.
The outermost wrapper of a stack applies every wrapper's transform in its one call, so the
inner wrappers get calls of their own, made with the outer one's (``_Recorder._chain``) and
run around the view's call; each ``transform`` runs under its own wrapper's mark
(``_remarked``), and a low-rank delta under the outer wrapper's call: every wrapper's row
holds its own transform, as in Linen. Delegated methods other than ``__call__`` are not
methods of the wrapper's class but come from its ``__getattr__``, which is recorded too
(``_delegating``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import nnx as _wrapkit_nnx  # noqa: F401  (registers flax's NNX wrappers)
from .._name_stack import mark_call
from .._protocol import delegated_methods, is_wrapper
from ..nnx._wrapper import Wrapper as _Wrapper
from ..nnx._wrapper import views_reported
from . import engine
from .data import Summary, VariableStats
from .engine import abstract as _abstract

# Arrays held as plain attributes (``nnx.data``), not in a Variable, are grouped as this.
ARRAY_GROUP = "Array"

# Names that NNX's own base class and containers define (``train``, ``sow``; ``append``,
# ``items`` on an nnx.List / nnx.Dict): not module calls of the model. ``__call__`` always is.
_MODULE_NAMES = frozenset(dir(nnx.Module))
_CONTAINER_NAMES = {nnx.List: frozenset(dir(nnx.List)), nnx.Dict: frozenset(dir(nnx.Dict))}
# A wrapkit.nnx wrapper's hooks and protocol (``transform``, ``own``, ``inner`` ...) are not
# module calls either; ``_patched`` puts ``_WRAPPER_PATCHES`` on wrapper classes instead.
_WRAPPER_NAMES = frozenset(dir(_Wrapper)) - {"__call__"}


@dataclasses.dataclass
class _Call(engine.Call):
    """An NNX module method call."""

    module_id: int = 0
    # Of a wrapkit.nnx wrapper's call: the id of the module at the bottom of its stack, and
    # the calls of the wrappers below it, outermost first (see ``_Recorder.call``).
    base_id: int | None = None
    chain: list[_Call] = dataclasses.field(default_factory=list)


def _key(part: Any) -> str:
    return part if isinstance(part, str) else str(part)


def _path(parts: Sequence[Any]) -> tuple[str, ...]:
    """An NNX path (``('blocks', 0, 'attn')``) in a row's form, ``('blocks', '0', 'attn')``."""
    return tuple(_key(part) for part in parts)


def _group(value: Any) -> str:
    """The column a state leaf counts in: its Variable type (``RngKey`` and ``RngCount`` as
    ``RngState``, as ``nnx.tabulate`` does), or ``Array`` for a plain array attribute."""
    if isinstance(value, nnx.RngState):
        return "RngState"
    if isinstance(value, nnx.Variable):
        return type(value).__name__
    return ARRAY_GROUP


def _stats(values: Sequence[Any]) -> VariableStats:
    """Counts and bytes of arrays (concrete or abstract), PRNG keys included: a key counts
    as one value of its implementation's size, as in ``nnx.tabulate``."""
    count = nbytes = 0
    for value in values:
        size = int(np.prod(np.shape(value), dtype=np.int64))
        count += size
        nbytes += size * value.dtype.itemsize
    return VariableStats(count, nbytes)


def _array_leaves(value: Any) -> list[Any]:
    leaf = value.get_value() if isinstance(value, nnx.Variable) else value
    return [item for item in jax.tree_util.tree_leaves(leaf) if engine.is_array(item)]


def _recorded_methods(cls: type) -> list[str]:
    """The methods of ``cls`` whose calls get recorded: ``__call__`` and the public methods
    the model's classes define (not NNX's own, such as ``train`` or ``sow``)."""
    framework = _MODULE_NAMES.union(
        *(names for container, names in _CONTAINER_NAMES.items() if issubclass(cls, container)),
        _WRAPPER_NAMES if issubclass(cls, _Wrapper) else (),
    )
    names = []
    for name in dir(cls):
        if name != "__call__" and (name.startswith("_") or name in framework):
            continue
        if inspect.isfunction(inspect.getattr_static(cls, name, None)):
            names.append(name)
    return names


class _Recorder(engine.Recorder):
    """Builds the call tree from the recording methods ``_patched`` puts on the classes."""

    def __init__(self, helpers: bool) -> None:
        super().__init__(mark=True)
        self.helpers = helpers
        # id(module) -> its path in the model merged inside the trace.
        self.paths: dict[int, tuple[str, ...]] = {}
        self.modules: list[Any] = []  # kept alive, so that the ids stay unique
        self.by_class: dict[type, list[tuple[str, ...]]] = {}

    def locate(self, model: Any) -> None:
        """Reads the path of every module of ``model``: a shared module's first one."""
        for parts, module in nnx.iter_modules(model):
            if id(module) not in self.paths:
                path = _path(parts)
                self.paths[id(module)] = path
                self.modules.append(module)
                self.by_class.setdefault(type(module), []).append(path)

    def _path_of(self, module: Any, caller: _Call | None) -> tuple[str, ...]:
        """``module``'s path in the model. NNX's transforms (``nnx.remat``, ``nnx.scan``,
        ``nnx.vmap`` ...) call a copy of a module, made inside the transform: it is the
        model's module of its class below the caller, when there is exactly one; otherwise
        it is named after its class, under its caller."""
        path = self.paths.get(id(module))
        if path is not None:
            return path
        above = caller.path if caller is not None else ()
        below = [
            path
            for path in self.by_class.get(type(module), ())
            if len(path) > len(above) and path[: len(above)] == above
        ]
        return below[0] if len(below) == 1 else above + (type(module).__name__,)

    @contextmanager
    def view(self, base: nnx.Module, view: nnx.Module) -> Iterator[None]:
        """A wrapkit.nnx wrapper runs a method on ``view``, which stands for ``base``: the
        view's modules get the paths of ``base``'s, and the call runs inside the calls of
        the wrappers below the one whose call made the view."""
        owner = next(
            (
                call
                for call in reversed(cast("list[_Call]", self.stack))
                if call.base_id == id(base)
            ),
            None,
        )
        chain = owner.chain if owner is not None else []
        root = self._path_of(base, chain[-1] if chain else cast("_Call | None", self.caller))
        for parts, module in nnx.iter_modules(view):
            self.paths[id(module)] = root + _path(parts)
            self.modules.append(module)
        with contextlib.ExitStack() as marks:
            for link in chain:
                self.stack.append(link)
                marks.callback(self.stack.pop)
                marks.enter_context(mark_call(link.id))
            yield

    def marked_as(self, wrapper: Any) -> contextlib.AbstractContextManager[None]:
        """The mark of ``wrapper``'s call: its transform is part of that call, although the
        outermost wrapper of its stack runs it."""
        for call in reversed(cast("list[_Call]", self.stack)):
            for found in (call, *call.chain):
                if found.module_id == id(wrapper):
                    return contextlib.nullcontext() if found.transparent else mark_call(found.id)
        return contextlib.nullcontext()

    def call(
        self, module: Any, method: str, function: Callable[..., Any], args: Any, kwargs: Any
    ) -> Any:
        cls = type(module)
        self.probing = f"{cls.__name__}.{method}"
        wrapper = is_wrapper(module)
        caller = cast("_Call | None", self.caller)  # every call here is an NNX one
        visible = cast("_Call | None", self.visible_caller)
        path = self._path_of(module, caller)
        transparent = (
            # A method the module calls on itself (``super().__call__``, a helper) is part
            # of its caller's work.
            not self.helpers
            and visible is not None
            and visible.module_id == id(module)
            and not (wrapper and method in delegated_methods(module))
        )
        call = _Call(
            id=engine.new_call_id(),
            path=path,
            module_type=cls.__name__,
            method=method,
            wrapper=wrapper,
            inputs=_abstract((args, kwargs)),
            transparent=transparent,
            module_id=id(module),
        )
        self.add(call)
        if isinstance(module, _Wrapper):
            self._chain(call, module, method)
        self.probing = None
        output = self.run(call, function, (module, *args), kwargs)
        for link in call.chain:
            link.outputs = call.outputs
        return output

    def _chain(self, call: _Call, wrapper: _Wrapper, method: str) -> None:
        """The outermost wrapper of a stack applies every wrapper's transform in its one
        call, and the inner wrappers' methods never run; each still gets a call, below the
        one above it, opened around the call of the view (``view``)."""
        above = call
        module = wrapper.layer_instance
        while isinstance(module, _Wrapper):
            link = _Call(
                id=engine.new_call_id(),
                path=self._path_of(module, above),
                module_type=type(module).__name__,
                method=method,
                wrapper=True,
                inputs=call.inputs,
                module_id=id(module),
            )
            above.children.append(link)
            self.ids.add(link.id)
            call.chain.append(link)
            above, module = link, module.layer_instance
        call.base_id = id(module)


@contextmanager
def _patched(classes: Sequence[type], recorder: Callable[[], _Recorder | None]) -> Iterator[None]:
    """Replaces the recorded methods of ``classes`` while the block runs; restores every
    class, attribute by attribute, in ``finally``."""
    saved: list[tuple[type, str, Any]] = []  # (class, name, its own attribute or _ABSENT)
    try:
        for cls in classes:
            for name in _recorded_methods(cls):
                own = vars(cls).get(name, _ABSENT)
                function = inspect.getattr_static(cls, name)
                setattr(cls, name, _recording(function, name, recorder))
                saved.append((cls, name, own))  # only once it is replaced
            for name, patch in _WRAPPER_PATCHES.items() if issubclass(cls, _Wrapper) else ():
                own = vars(cls).get(name, _ABSENT)
                setattr(cls, name, patch(inspect.getattr_static(cls, name), recorder))
                saved.append((cls, name, own))
        yield
    finally:
        for cls, name, attribute in reversed(saved):
            if attribute is _ABSENT:
                delattr(cls, name)
            else:
                setattr(cls, name, attribute)


_ABSENT = object()


def _recording(
    function: Callable[..., Any], name: str, recorder: Callable[[], _Recorder | None]
) -> Callable[..., Any]:
    @functools.wraps(function)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        current = recorder()
        if current is None:  # outside wrapkit's trace (another thread, a closure kept)
            return function(self, *args, **kwargs)
        return current.call(self, name, function, args, kwargs)

    return method


def _remarked(
    function: Callable[..., Any], recorder: Callable[[], _Recorder | None]
) -> Callable[..., Any]:
    """A wrapper's ``transform``, run under the mark of that wrapper's call."""

    @functools.wraps(function)
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        current = recorder()
        if current is None:
            return function(self, *args, **kwargs)
        with current.marked_as(self):
            return function(self, *args, **kwargs)

    return hook


def _delegating(
    function: Callable[..., Any], recorder: Callable[[], _Recorder | None]
) -> Callable[..., Any]:
    """A wrapper's ``__getattr__``, whose delegated methods other than ``__call__`` (not
    methods of its class) are recorded as calls of the wrapper."""

    @functools.wraps(function)
    def getattr_(self: Any, name: str) -> Any:
        bound = function(self, name)
        if name not in self.delegated_methods:
            return bound

        def method(*args: Any, **kwargs: Any) -> Any:
            current = recorder()
            if current is None:
                return bound(*args, **kwargs)
            return current.call(self, name, lambda _, *a, **k: bound(*a, **k), args, kwargs)

        return method

    return getattr_


_WRAPPER_PATCHES = {"transform": _remarked, "__getattr__": _delegating}


class _Nnx:
    """The engine's ``FrontEnd`` for one NNX summary."""

    def __init__(
        self,
        model: Any,
        method: str | Callable[..., Any] | None,
        helpers: bool,
        call: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> None:
        self.model = model
        self.name = type(model).__name__
        self.method = method
        self.helpers = helpers
        self.call = call
        split: Any = nnx.split(model, nnx.Param, ...)
        self.graphdef: Any = split[0]
        params, rest = split[1], split[2]
        self.states = (params, rest)
        param_leaves, self.param_def = jax.tree_util.tree_flatten(params)
        rest_leaves, self.rest_def = jax.tree_util.tree_flatten(rest)
        dynamic, self.rebuild = engine.split_static(call)
        self.inputs = [*param_leaves, *rest_leaves, *dynamic]
        self.sizes = (len(param_leaves), len(rest_leaves))
        # Differentiable: the Params' floating-point leaves and the floating-point inputs.
        self.moves = [
            *(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in param_leaves),
            *(False for _ in rest_leaves),
            *(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in dynamic),
        ]
        self.classes = sorted(
            {type(module) for _, module in nnx.iter_modules(model)},
            key=lambda cls: (cls.__module__, cls.__qualname__),
        )
        self.current: _Recorder | None = None
        self.last: _Recorder | None = None
        self.leaves = self._state_leaves()

    def _state_leaves(self) -> list[tuple[tuple[str, ...], str, list[Any]]]:
        """(path, group, arrays) of every Variable and plain array of the model, once."""
        found = []
        for state in self.states:
            for parts, value in nnx.to_flat_state(state):
                found.append((_path(parts), _group(value), _array_leaves(value)))
        return found

    def recorder(self) -> _Recorder:
        return _Recorder(self.helpers)

    def differentiable(self, leaves: Sequence[Any]) -> list[bool]:
        return list(self.moves)

    def apply(self, recorder: engine.Recorder, *leaves: Any) -> tuple[Any, Any]:
        nnx_recorder = cast(_Recorder, recorder)  # made by self.recorder
        params_count, rest_count = self.sizes
        params = jax.tree_util.tree_unflatten(self.param_def, leaves[:params_count])
        rest = jax.tree_util.tree_unflatten(
            self.rest_def, leaves[params_count : params_count + rest_count]
        )
        call_args, call_kwargs = self.rebuild(list(leaves[params_count + rest_count :]))
        model = nnx.merge(self.graphdef, params, rest)
        nnx_recorder.locate(model)
        self.current, self.last = nnx_recorder, nnx_recorder
        try:
            with _patched(self.classes, lambda: self.current), views_reported(nnx_recorder.view):
                method = self.method
                if method is None or isinstance(method, str):
                    output = getattr(model, method or "__call__")(*call_args, **call_kwargs)
                else:
                    output = method(model, *call_args, **call_kwargs)
        finally:
            self.current = None
        # NNX updates state in place (BatchNorm's statistics, RNG counts): the state after
        # the call is an output, so that the updates are counted, not dropped as dead code.
        return output, nnx.state(model)

    def top(self, calls: list[engine.Call]) -> engine.Call:
        wrapper = is_wrapper(self.model)
        return engine.top_call(self.name, self.method, wrapper, _abstract(self.call), calls)

    def variables(
        self, recorder: engine.Recorder, calls: Sequence[engine.Call]
    ) -> list[Mapping[str, VariableStats]]:
        """Each Variable counts for the deepest module with a row whose path leads to it,
        at that module's first row."""
        first: dict[tuple[str, ...], int] = {}
        for index, call in enumerate(calls):
            first.setdefault(call.path, index)
        grouped: list[dict[str, list[Any]]] = [{} for _ in calls]
        for path, group, arrays in self.leaves:
            for length in range(len(path) - 1, -1, -1):
                owner = first.get(path[:length])
                if owner is not None:
                    grouped[owner].setdefault(group, []).extend(arrays)
                    break
        return [
            MappingProxyType({group: _stats(arrays) for group, arrays in sorted(groups.items())})
            for groups in grouped
        ]

    def totals(self) -> tuple[tuple[str, ...], Mapping[str, VariableStats]]:
        grouped: dict[str, list[Any]] = {}
        for _, group, arrays in self.leaves:
            grouped.setdefault(group, []).extend(arrays)
        names = tuple(sorted(grouped))
        return names, {name: _stats(grouped[name]) for name in names}

    def hint(self, error: Exception) -> str:
        if isinstance(error, TypeError | ValueError):
            return "\nCheck the input shapes and dtypes against what this module expects."
        return ""


def summary(
    module: nnx.Module,
    *args: Any,
    method: str | Callable[..., Any] | None = None,
    vjp: bool = False,
    helpers: bool = False,
    **kwargs: Any,
) -> Summary:
    """The summary of an NNX module call; see [`wrapkit.summary`][wrapkit.summary]."""
    delegated = module.delegated_methods if isinstance(module, _Wrapper) else ()
    if isinstance(method, str) and not (
        inspect.isfunction(inspect.getattr_static(type(module), method, None))
        or method in delegated
    ):
        found = _recorded_methods(type(module))
        methods = ", ".join(found + [name for name in delegated if name not in found])
        raise TypeError(
            f"wrapkit.summary: {type(module).__name__} has no method {method!r}. "
            f"Pass one of: {methods}."
        )
    with engine.cyclic_gc_paused():
        front = _Nnx(module, method, helpers, (args, kwargs))
        return engine.summarise(front, front.inputs, vjp)
