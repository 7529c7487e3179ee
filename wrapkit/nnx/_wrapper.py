"""The NNX wrapper base class: delegation, variable transforms and stacking.

A delegated call never writes a derived value into a Variable. It splits the wrapped
module, computes each selected variable's effective value from the raw one, and merges a
*view* of the module in which the selected Variables are replaced by new Variables holding
the effective values; every other Variable of the view is the module's own object
(``nnx.merge(..., copy=False)``), so batch statistics, RNG counts and other state the inner
call updates land in the real module. The inner method runs on the view; the raw Params
stay bit-identical, eagerly and under every NNX or JAX transform, in graph and tree mode.

Stacked wrappers (``WeightNorm(SpectralNorm(Linear))``) apply the whole stack in one view,
innermost transform first: ``kernel -> SpectralNorm -> WeightNorm -> Linear``. A wrapper
selects only variables of the module at the bottom of its stack; another wrapper's own
variables (its scales, statistics, factors) are never selected, wherever it sits.

A wrapper that adds a low-rank delta (LoRA) runs the inner call in unmerged form through
``_unmerged.call_unmerged``: the call is traced once, as a pure function of the module's
state, and re-evaluated with each linear use of a weight rewritten.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeAlias

import jax
from flax import nnx

from .. import _filters, _wrapping
from .._name_stack import current_name_stack
from .._problems import Unreadable, raise_collected
from .._protocol import check_delegates
from .._unmerged import DeltaSource, LowRank, call_unmerged

_REQUIRED = inspect.Parameter.empty

NnxFilter: TypeAlias = Any
"""A variable filter of an NNX wrapper: one entry or an iterable of entries, ``None`` for all.

An entry is a string (whole path elements, globs, ``"/"``-runs, as for Linen wrappers), a
``flax.nnx.Variable`` subclass, an ``nnx`` filter object or any callable ``(path, variable)
-> bool`` with ``path`` a tuple of keys (nnx's predicate convention), or ``...``.
"""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One variable of the wrapped module, as an NNX wrapper's hooks see it.

    Attributes:
        path: the variable's path inside the wrapped module, keys joined by ``/``
            (``"kernel"``, ``"layers/0/kernel"``); the key of the wrapper's own variables
            for it (``wrapper.scale["kernel"]``).
        keys: the same path as a tuple of keys, as nnx filters see it.
        value: the variable's value, after the transforms of any wrappers below this one.
        variable: the raw ``nnx.Variable`` (read its metadata; never write to it).
    """

    path: str
    keys: tuple[Any, ...]
    value: Any
    variable: nnx.Variable[Any]

    def metadata(self, axes: Iterable[int]) -> dict[str, Any]:
        """The variable's sharding metadata restricted to ``axes``, for a variable of the
        wrapper's own made from those axes (a scale over the feature axes, a factor).

        Returns ``{}`` for a variable without ``out_sharding``.
        """
        metadata = self.variable.get_metadata()
        names = metadata.get("out_sharding")
        if names is None:
            return {}
        kept = {"out_sharding": tuple(names[axis] for axis in axes)}
        for key in ("mesh", "eager_sharding"):
            if metadata.get(key) is not None:
                kept[key] = metadata[key]
        return kept


@dataclasses.dataclass(frozen=True)
class Inverse:
    """What an NNX wrapper's ``invert`` returns for one variable.

    Attributes:
        value: the raw value to store in the wrapped module's Variable, such that
            ``transform`` of it (with ``variables``) gives back the value ``invert`` got.
        variables: values for the wrapper's own variables of this leaf, by name
            (``{"scale": g}``); own variables left out keep their values.
        caveat: when the inverse can be inexact, one sentence saying why.
    """

    value: Any
    variables: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    caveat: str | None = None


def _describe(wrapper: Any) -> str:
    inner = wrapper.__dict__.get("layer_instance")
    return f"{type(wrapper).__name__}({type(inner).__name__})"


def _delegated(wrapper: Wrapper) -> tuple[str, ...]:
    delegates = wrapper.__dict__.get("delegates")
    return type(wrapper).default_delegates if delegates is None else delegates


def _public_methods(module: nnx.Module) -> list[str]:
    """Methods a user defined on ``module``'s class (not nnx's Module API)."""
    own = [klass for klass in type(module).__mro__ if klass not in (nnx.Module, object)]
    base = dir(nnx.Module)
    names = {
        name
        for klass in own
        for name, value in vars(klass).items()
        if (name == "__call__" or not (name.startswith("_") or name in base))
        and callable(value)
        and not isinstance(value, type | classmethod | staticmethod)
    }
    return sorted(names, key=lambda name: (name != "__call__", name))


def _entries(variable_filter: NnxFilter) -> tuple[Any, ...]:
    if variable_filter is None:
        return ()
    if isinstance(variable_filter, str | type) or callable(variable_filter):
        return (variable_filter,)
    if variable_filter is Ellipsis:
        return ()
    return tuple(variable_filter)


def _filter_problems(variable_filter: NnxFilter) -> list[str]:
    if not (
        variable_filter is None
        or variable_filter is Ellipsis
        or isinstance(variable_filter, str | type)
        or callable(variable_filter)
        or isinstance(variable_filter, Iterable)
    ):
        return [
            "variable_filter must be a string, an nnx.Variable type, a callable (path, "
            "variable) -> bool, an iterable of those, or None; got "
            f"{variable_filter!r} ({type(variable_filter).__name__})."
        ]
    problems = []
    for entry in _entries(variable_filter):
        if isinstance(entry, str):
            problems += _filters.check(entry)
        elif isinstance(entry, type):
            if not issubclass(entry, nnx.Variable):
                problems.append(
                    f"variable_filter entry {entry.__qualname__} is a class but not an "
                    "nnx.Variable type; pass e.g. nnx.Param."
                )
        elif not (callable(entry) or entry is Ellipsis):
            problems.append(
                f"variable_filter entry {entry!r} is neither a string, an nnx.Variable type "
                "nor a callable (path, variable) -> bool."
            )
    return problems


Select: TypeAlias = Callable[[tuple[Any, ...], str, "nnx.Variable[Any]"], bool]


@functools.lru_cache(maxsize=256)
def _compile(entries: tuple[Any, ...], types_: tuple[type, ...]) -> Select:
    strings = tuple(entry for entry in entries if isinstance(entry, str))
    matches = _filters.compile_filter(strings) if strings else None
    others = [nnx.filterlib.to_predicate(e) for e in entries if not isinstance(e, str)]

    def select(keys: tuple[Any, ...], path: str, variable: nnx.Variable[Any]) -> bool:
        if not isinstance(variable, types_):
            return False
        if not entries:
            return True
        if matches is not None and matches(path, variable, False):
            return True
        return any(predicate(keys, variable) for predicate in others)

    return select


def _path(keys: tuple[Any, ...]) -> str:
    return "/".join(str(key) for key in keys)


def _owned_prefixes(module: nnx.Module) -> list[tuple[Any, ...]]:
    """Paths of the wrappers inside ``module`` (below its root), whose own variables are
    everything they hold except their ``layer_instance``."""
    return [path for path, node in nnx.iter_modules(module) if isinstance(node, Wrapper) and path]


def _owned(keys: tuple[Any, ...], prefixes: list[tuple[Any, ...]]) -> bool:
    return any(
        keys[: len(prefix)] == prefix and keys[len(prefix)] != "layer_instance"
        for prefix in prefixes
    )


def _variables(module: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Variable[Any]]]:
    """The variables of ``module`` with their paths, leaving out every wrapper's own."""
    prefixes = _owned_prefixes(module)
    for keys, variable in nnx.to_flat_state(nnx.state(module)):
        if not _owned(keys, prefixes):
            yield keys, variable


ViewListener: TypeAlias = Callable[
    [nnx.Module, nnx.Module], contextlib.AbstractContextManager[None] | None
]

# A view is a new object that stands for the wrapped module; tools that follow calls into it
# (wrapkit.summary gives the view's calls the rows of the modules they stand for) are told
# of each one. Context-local, so that a tool's listener never sees another thread's calls.
_VIEW_LISTENERS: contextvars.ContextVar[tuple[ViewListener, ...]] = contextvars.ContextVar(
    "wrapkit_nnx_view_listeners", default=()
)


@contextlib.contextmanager
def views_reported(listener: ViewListener) -> Iterator[None]:
    """While the block runs, ``listener(base, view)`` is called for every view a delegated
    call merges, before the method runs on it; when it returns a context manager, the
    method runs inside it. ``base`` is the module at the bottom of the stack, and each
    module of ``view`` stands for ``base``'s module at the same path."""
    token = _VIEW_LISTENERS.set((*_VIEW_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _VIEW_LISTENERS.reset(token)


def _call_view(
    base: nnx.Module, view: nnx.Module, method: str, args: tuple[Any, ...], kwargs: Any
) -> Any:
    listeners = _VIEW_LISTENERS.get()
    if not listeners:
        return getattr(view, method)(*args, **kwargs)
    with contextlib.ExitStack() as contexts:
        for listener in listeners:
            context = listener(base, view)
            if context is not None:
                contexts.enter_context(context)
        return getattr(view, method)(*args, **kwargs)


def _view_variable(variable: nnx.Variable[Any], value: Any) -> nnx.Variable[Any]:
    """A new Variable like ``variable`` (type, metadata) holding ``value``."""
    return type(variable).from_metadata(value, variable.get_metadata())


class Wrapper(nnx.Module):
    """Base class of NNX wrappers: holds an inner module and delegates methods to it.

    A delegated call runs the inner module's method on a view of it in which each variable
    selected by ``variable_filter`` (among ``variable_types``) is replaced by
    ``transform(leaf)``; the module's own Variables are never written. A subclass sets its
    options as attributes, then calls ``super().__init__``, and defines:

    * ``transform(leaf)``: the value the inner module sees; keyword-only parameters after
      ``leaf`` become keyword arguments of every delegated call (``update_stats`` of
      SpectralNorm), taken by the wrapper and not passed on;
    * optionally ``create(leaf, rngs)``: the wrapper's own Variables for one selected
      variable, by name; each name becomes an ``nnx.Dict`` attribute keyed by the leaf's
      path (``self.scale["kernel"]``), read back with ``self.own(name, leaf)``;
    * optionally ``argument_errors()``, ``invert(leaf)``, or instead of ``transform``,
      ``low_rank(leaf, input_axes, output_axes, shared_axes)`` (see LoRA).

    Args:
        layer_instance: the wrapped module.
        variable_filter: which variables to transform (see ``NnxFilter``); the class's
            ``default_filter`` when not given. A filter that selects nothing is an error.
        delegates: per-instance override of the delegated methods; ``None`` uses the
            class's ``default_delegates``.
        rngs: passed to ``create``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import Wrapper
        >>> class Doubled(Wrapper):
        ...     default_filter = "kernel"
        ...     def transform(self, leaf):
        ...         return 2 * leaf.value
        >>> layer = nnx.Linear(3, 1, use_bias=False, kernel_init=nnx.initializers.ones,
        ...                    rngs=nnx.Rngs(0))
        >>> Doubled(layer)(jnp.ones((1, 3)))
        Array([[6.]], dtype=float32)
        >>> layer.kernel[...].ravel()  # the raw weight, untouched
        Array([1., 1., 1.], dtype=float32)
    """

    default_delegates: ClassVar[tuple[str, ...]] = ("__call__",)
    default_filter: ClassVar[NnxFilter] = None
    variable_types: ClassVar[tuple[type, ...]] = (nnx.Param,)
    materialize: bool = False
    freeze_base: bool = False
    # Options used only to build the wrapper's own variables (initialisers). They are
    # dropped once ``create`` has run, as nnx.Linear keeps no kernel_init: a closure (most
    # jax initialisers are) would make the model impossible to pickle.
    construction_only: ClassVar[tuple[str, ...]] = ()
    _call_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = cls.low_rank if _adds_low_rank(cls) else cls.transform
        cls._call_options = _wrapping.call_options(hook)

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        variable_filter: NnxFilter = _REQUIRED,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.layer_instance = layer_instance
        if variable_filter is _REQUIRED:
            variable_filter = type(self).default_filter
        if isinstance(variable_filter, set | frozenset):
            # Static attributes are part of the graph definition, which must hash.
            variable_filter = tuple(sorted(variable_filter, key=repr))
        self.variable_filter = variable_filter
        problems = check_delegates(delegates, "delegates") if delegates is not None else []
        self.delegates = None if delegates is None or problems else tuple(delegates)
        self._check_arguments(problems)
        self._create(rngs)
        for name in type(self).construction_only:
            delattr(self, name)

    # -- the protocol ---------------------------------------------------------------------

    @property
    def inner(self) -> nnx.Module:
        """The wrapped module (``layer_instance``)."""
        return self.layer_instance

    @property
    def delegated_methods(self) -> tuple[str, ...]:
        """The inner module's methods this wrapper delegates."""
        return _delegated(self)

    # -- hooks for subclasses -------------------------------------------------------------

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        """The wrapper's own Variables for one selected variable, by name (none by default)."""
        return {}

    def transform(self, leaf: Leaf) -> Any:
        """Returns the value the inner module sees for one selected variable."""
        raise NotImplementedError(f"{type(self).__name__} must define transform(self, leaf).")

    def argument_errors(self) -> list[str]:
        """Problems with the wrapper's own settings, one sentence each (none by default)."""
        return []

    def invert(self, leaf: Leaf) -> Inverse:
        """The raw value and own variable values for which ``transform`` gives
        ``leaf.value`` (used by ``wrap_pretrained``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be inverted: it defines no invert(self, leaf) "
            "returning the raw value (and its own variables) for which transform gives "
            "leaf.value."
        )

    def low_rank(
        self,
        leaf: Leaf,
        input_axes: tuple[int, ...],
        output_axes: tuple[int, ...],
        shared_axes: tuple[int, ...] = (),
    ) -> LowRank:
        """The low-rank delta ``s * A @ B`` this wrapper adds to one selected variable,
        computed unmerged (see the Linen ``Wrapper.low_rank``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define low_rank.")

    def delta_feature_axes(self, leaf: Leaf) -> tuple[int, ...] | None:
        """The output axes of ``leaf`` for ``low_rank``, or ``None`` to infer them."""
        return None

    # -- own variables --------------------------------------------------------------------

    def own(self, name: str, leaf: Leaf) -> nnx.Variable[Any]:
        """This wrapper's own Variable ``name`` for ``leaf`` (made by ``create``)."""
        found = self.__dict__.get(name)
        if isinstance(found, nnx.Dict) and leaf.path in found:
            return found[leaf.path]  # type: ignore[no-any-return]
        raise ValueError(
            f"{_describe(self)} has no {name!r} for {leaf.path!r}: the wrapped module's "
            "variables changed after the wrapper was built (it makes its own variables for "
            "the variables it selects then). Build the wrapper again around the module."
        )

    def _create(self, rngs: nnx.Rngs | None) -> None:
        made: dict[str, dict[str, nnx.Variable[Any]]] = {}
        for leaf in self._selected_leaves():
            for name, variable in self.create(leaf, rngs).items():
                made.setdefault(name, {})[leaf.path] = variable
        for name, variables in made.items():
            if name in self.__dict__ or hasattr(type(self), name):
                raise TypeError(
                    f"{type(self).__name__}.create returns variables named {name!r}, which "
                    f"is already an attribute of {type(self).__name__}; choose another name."
                )
            setattr(self, name, nnx.Dict(variables))

    def _selected(self) -> list[Leaf]:
        """The leaves this wrapper selects, from the module at the bottom of its stack."""
        select = self._select()
        return [
            Leaf(_path(keys), keys, variable.get_value(), variable)
            for keys, variable in _variables(_base(self))
            if select(keys, _path(keys), variable)
        ]

    def _selected_leaves(self) -> list[Leaf]:
        """``_selected()``, which may not be empty: a filter selecting nothing is an error."""
        leaves = self._selected()
        if not leaves:
            base = _base(self)
            found = ", ".join(
                f"{_path(keys)} {type(v).__name__}{tuple(jax.numpy.shape(v.get_value()))}"
                for keys, v in _variables(base)
            )
            raise ValueError(
                f"{_describe(self)}: variable_filter "
                f"{_filters.describe(_entries(self.variable_filter))} selects none of the "
                f"{'/'.join(t.__name__ for t in self.variable_types)} variables of "
                f"{type(base).__name__}: {found or 'it has none'}. Filter strings match "
                "whole path elements ('kernel'), globs ('layers/*/kernel'); types and nnx "
                "filters (nnx.PathContains('kernel')) select as in nnx."
            )
        return leaves

    def _select(self) -> Select:
        return _compile(_entries(self.variable_filter), type(self).variable_types)

    def _check_arguments(self, problems: list[str]) -> None:
        inner = self.layer_instance
        if isinstance(inner, type):
            raise TypeError(
                f"{type(self).__name__} expects a flax.nnx.Module instance to wrap, got the "
                f"class {inner.__module__}.{inner.__qualname__}. Build the module first: "
                f"{type(self).__name__}({inner.__name__}(..., rngs=nnx.Rngs(0)))."
            )
        if not isinstance(inner, nnx.Module):
            hint = (
                " wrapkit.nnx wrappers wrap NNX modules; this is a Linen module: use "
                f"wrapkit.linen.{type(self).__name__}."
                if type(inner).__module__.startswith("flax.linen")
                or any(k.__module__ == "flax.linen.module" for k in type(inner).__mro__)
                else ""
            )
            raise TypeError(
                f"{type(self).__name__} expects a flax.nnx.Module to wrap, got "
                f"{type(inner).__module__}.{type(inner).__qualname__}.{hint}"
            )
        if isinstance(inner, nnx.WeightNorm | nnx.SpectralNorm):
            raise TypeError(
                f"{_describe(self)} cannot wrap flax.nnx.{type(inner).__name__}: it writes "
                "the weights it normalises into its inner module on every call, so another "
                f"wrapper would see them already changed. Use wrapkit.nnx.{type(inner).__name__}."
            )
        if not problems:
            available = _delegated(inner) if isinstance(inner, Wrapper) else _public_methods(inner)
            problems += _wrapping.delegation_problems(
                type(self), _delegated(self), type(inner).__name__, available
            )
        problems += _filter_problems(self.variable_filter)
        problems += self.argument_errors()
        raise_collected(_describe(self), problems, ValueError)

    def _read_options(self, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """This wrapper's call options, read (not removed) from the call's keywords."""
        return _wrapping.read_options(
            _describe(self),
            type(self).__name__,
            type(_base(self)).__name__,
            self._call_options,
            method,
            kwargs,
        )

    # -- delegation -----------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the inner module with transformed variables (when ``__call__`` is delegated)."""
        return _delegate(self, "__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper itself lacks. nnx.view calls set_view on every
        # module it visits, the inner one too: forwarded, it would run on a throw-away view.
        if name.startswith("_") or name == "set_view" or "layer_instance" not in self.__dict__:
            raise AttributeError(name)
        inner = self.__dict__["layer_instance"]
        if name in _delegated(self):
            return _bound(self, name)
        try:
            value = getattr(inner, name)
        except AttributeError:
            raise _wrapping.no_attribute(_describe(self), name, type(inner).__name__) from None
        if inspect.ismethod(value) and isinstance(value.__self__, nnx.Module):
            # Not delegated: run on a view with every variable this wrapper would
            # transform unreadable, so a method that needs none of them (an RNN cell's
            # initialize_carry) works and one that reads them raises.
            return _bound(self, name)
        if any(
            isinstance(leaf, nnx.Module | nnx.Variable)
            for leaf in jax.tree_util.tree_leaves(
                value, is_leaf=lambda x: isinstance(x, nnx.Module | nnx.Variable)
            )
        ):
            raise AttributeError(
                f"{_describe(self)}: {name!r} holds a submodule or variable of the "
                f"{type(inner).__name__} it wraps; used through the wrapper it would run on "
                "untransformed weights. Delegate a method of "
                f"{type(inner).__name__} that uses it (delegates=...), or wrap it itself."
            )
        return value


def _bound(wrapper: Wrapper, method: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return _delegate(wrapper, method, args, kwargs)

    call.__name__ = call.__qualname__ = method
    return call


def _adds_low_rank(cls: type) -> bool:
    return getattr(cls, "low_rank", None) is not Wrapper.low_rank


def _stack(wrapper: Wrapper) -> list[Wrapper]:
    """The wrappers from ``wrapper`` down, innermost first."""
    stack = []
    module: nnx.Module = wrapper
    while isinstance(module, Wrapper):
        stack.append(module)
        module = module.layer_instance
    return stack[::-1]


def _base(wrapper: Wrapper) -> nnx.Module:
    """The module at the bottom of ``wrapper``'s stack."""
    return _stack(wrapper)[0].layer_instance


@dataclasses.dataclass(frozen=True)
class _Applied:
    wrapper: Wrapper
    options: dict[str, Any]
    delegated: bool
    select: Select


# Set by init_from_data (wrapkit.nnx._lifecycle) for its one forward pass: it sees the
# result of every delegated call and returns what the caller gets instead.
_OBSERVE: contextvars.ContextVar[Callable[[Wrapper, str, Any], Any] | None] = (
    contextvars.ContextVar("wrapkit_nnx_observe", default=None)
)


def _delegate(outer: Wrapper, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = _delegate_call(outer, method, args, kwargs)
    observe = _OBSERVE.get()
    return result if observe is None else observe(outer, method, result)


def _delegate_call(
    outer: Wrapper, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    base = _base(outer)
    stack = [
        _Applied(w, w._read_options(method, kwargs), method in _delegated(w), w._select())
        for w in _stack(outer)
    ]
    if not callable(getattr(type(base), method, None)):
        raise AttributeError(f"{_describe(outer)}: {type(base).__name__} has no method {method!r}.")
    taken = {name for applied in stack for name in applied.options}
    kwargs = {name: value for name, value in kwargs.items() if name not in taken}
    _check_arguments_hold_no_selected(outer, stack, method, (args, kwargs))

    graphdef, state = nnx.split(base)
    flat = list(nnx.to_flat_state(state))
    prefixes = _owned_prefixes(base)
    views: dict[tuple[Any, ...], Any] = {}
    sources: dict[int, DeltaSource] = {}
    for keys, variable in flat:
        if _owned(keys, prefixes):
            continue
        path = _path(keys)
        value: Any = variable.get_value()
        selecting = [applied for applied in stack if applied.select(keys, path, variable)]
        if not selecting:
            continue
        blocked = next((i for i, a in enumerate(selecting) if not a.delegated), len(selecting))
        value, factored = _apply_stack(selecting[:blocked], keys, variable, value)
        if blocked < len(selecting):
            refused = selecting[blocked].wrapper
            value = Unreadable(
                _wrapping.not_delegated(
                    _describe(refused),
                    type(refused).__name__,
                    method,
                    type(base).__name__,
                    path,
                    refused.delegated_methods,
                )
            )
        if factored is not None:
            value = jax.numpy.asarray(value)
            sources[id(value)] = _delta_source(factored, Leaf(path, keys, value, variable))
        views[keys] = value
    if sources:
        return _call_unmerged(outer, base, method, graphdef, flat, views, sources, args, kwargs)
    view_flat = [
        (keys, _view_variable(variable, views[keys]) if keys in views else variable)
        for keys, variable in flat
    ]
    module = nnx.merge(graphdef, nnx.from_flat_state(view_flat))
    result = _call_view(base, module, method, args, kwargs)
    for (keys, view), (_, variable) in zip(view_flat, flat, strict=True):
        if view is not variable and view.get_raw_value() is not views[keys]:
            raise _written(outer, base, method, _path(keys))
    return result


def _apply_stack(
    selecting: list[_Applied], keys: tuple[Any, ...], variable: nnx.Variable[Any], value: Any
) -> tuple[Any, _Applied | None]:
    """``value`` through the transforms of the wrappers that select it, innermost first,
    and the low-rank wrapper among them (its delta is added by the caller, unmerged in a
    call, merged by fold), or ``None``."""
    path = _path(keys)
    factored: _Applied | None = None
    for applied in selecting:
        if factored is not None:
            raise ValueError(
                f"{_describe(applied.wrapper)} transforms {path} after "
                f"{_describe(factored.wrapper)} has added its low-rank delta to it: "
                f"{type(applied.wrapper).__name__} of W + s * A @ B has no unmerged form. "
                f"Put {type(factored.wrapper).__name__} outermost, or leave the variable "
                "out of one of the two filters."
            )
        if _adds_low_rank(type(applied.wrapper)):
            factored = applied
            continue
        value = applied.wrapper.transform(Leaf(path, keys, value, variable), **applied.options)
    return value, factored


def _written(outer: Wrapper, base: nnx.Module, method: str, path: str) -> ValueError:
    return ValueError(
        f"{_describe(outer)}: {type(base).__name__}.{method} wrote to {path}, a variable the "
        "wrapper transforms; the write would be lost (the wrapper never changes the raw "
        "weights). Leave it out of variable_filter, or update it outside the wrapped call."
    )


def _check_arguments_hold_no_selected(
    outer: Wrapper, stack: list[_Applied], method: str, arguments: Any
) -> None:
    """Refuses a module argument of the call that holds variables the stack would transform:
    the view covers the wrapped module, not modules passed in."""
    for node in jax.tree_util.tree_leaves(
        arguments, is_leaf=lambda x: isinstance(x, nnx.Module | nnx.Variable)
    ):
        if not isinstance(node, nnx.Module):
            continue
        for keys, variable in _variables(node):
            path = _path(keys)
            if any(applied.select(keys, path, variable) for applied in stack):
                raise TypeError(
                    f"{_describe(outer)}.{method} was passed a {type(node).__name__} whose "
                    f"{path} the wrapper would transform, but a wrapper transforms only the "
                    "module it wraps. Make it part of the wrapped module (an attribute) or "
                    "wrap it itself."
                )


def _delta_source(applied: _Applied, leaf: Leaf) -> DeltaSource:
    wrapper = applied.wrapper
    return DeltaSource(
        describe=f"{_describe(wrapper)}: {leaf.path}",
        make=lambda input_axes, output_axes, shared_axes: wrapper.low_rank(
            leaf, input_axes, output_axes, shared_axes, **applied.options
        ),
        # The wrapper's own call (the scope tools mark it with), as in Linen: the delta's
        # operations are the wrapper's, wherever the interpreter meets the weight's use.
        name_stack=current_name_stack(),
        materialize=wrapper.materialize,
        feature_axes=wrapper.delta_feature_axes(leaf),
        freeze=wrapper.freeze_base,
    )


def _call_unmerged(
    outer: Wrapper,
    base: nnx.Module,
    method: str,
    graphdef: Any,
    flat: list[tuple[tuple[Any, ...], Any]],
    views: dict[tuple[Any, ...], Any],
    sources: dict[int, DeltaSource],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The delegated call as a pure function of the module's state, evaluated unmerged."""
    values = [views[keys] if keys in views else v.get_raw_value() for keys, v in flat]
    written: list[tuple[Any, ...]] = []

    def pure(values: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rebuilt = [
            (keys, _view_variable(variable, value))
            for (keys, variable), value in zip(flat, values, strict=True)
        ]
        module = nnx.merge(graphdef, nnx.from_flat_state(rebuilt))
        result = _call_view(base, module, method, args, kwargs)
        after = []
        for (keys, variable), value in zip(rebuilt, values, strict=True):
            now = variable.get_raw_value()
            if keys in views:
                # Checked here, not returned: returning a weight would be a use of it
                # (with no unmerged form).
                if now is not value:
                    written.append(keys)
                now = None
            after.append(now)
        return result, after

    result, after = call_unmerged(pure, [values, args, kwargs], sources)
    if written:
        raise _written(outer, base, method, _path(written[0]))
    for (keys, variable), before, now in zip(flat, values, after, strict=True):
        if keys not in views and now is not before:
            variable.set_value(now)
    return result
