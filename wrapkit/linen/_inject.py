"""Wrapping the submodules of an existing Linen model by pattern, without editing its code.

``inject(model, WeightNorm, "attn/c_attn")`` returns an [`Injected`][wrapkit.linen.Injected]
module whose call runs the model's under a method interceptor (``nn.intercept_methods``):
each call of a submodule whose path matches a pattern goes through a wrapper built around
that submodule, there and then. A submodule built in ``@nn.compact`` exists only during its
parent's call, so its call is the one moment it can be wrapped; the interceptor sees it
whether it was built in ``setup`` or ``@nn.compact``, held by an ``nn.Sequential``, or cloned
into the body of a lifted transform.

The model is bound to the Injected module's own scope, so its variables keep their tree and
names. A wrapper's variables go where a wrapper made in the parent's ``@nn.compact`` method
would put them: beside the module, in a scope named after the wrapper (``WeightNorm``, one
per parent, without flax's ``_0``). In an ``nn.scan`` or ``nn.vmap`` body that scope is in
the body, so the wrapper's variables are stacked with the body's: one per layer, one per
expert. The body of a transform itself has no parent inside the transform; its wrapper sits
inside it.

Everything this file knows of flax's private behaviour is in the section "flax internals"
below, and ``tests/test_inject.py`` pins each item (``test_flax_behaviour_*``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import inspect
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import flax.linen as nn
import jax
from flax.core import FrozenDict
from flax.core.scope import Scope
from flax.linen import module as flax_module
from flax.linen.module import wrap_method_once
from flax.traverse_util import flatten_dict

from .. import _calls, _filters
from .._problems import raise_collected
from .._protocol import chain
from ._wrapper import Wrapper, _describe

ModulePattern: TypeAlias = str | type[nn.Module] | Callable[[str, nn.Module], bool]
"""One pattern: a path string, a module class, or a callable ``(path, module) -> bool``."""

WrapperFactory: TypeAlias = Callable[[nn.Module], Wrapper]
"""Builds a wrapper around the module it is given: a wrapper class, a ``functools.partial``
of one, or any function returning a wrapper (``lambda m: WeightNorm(SpectralNorm(m))``)."""

Path: TypeAlias = tuple[str, ...]

# -- flax internals ---------------------------------------------------------------------
# What inject relies on beyond flax's documented API; tests/test_inject.py pins each item
# (test_flax_behaviour_inject_relies_on_*).

# Where flax creates the classes that nn.scan(Cls), nn.remat(Cls), ... return. Inside the
# transform, the body calls the original class on a clone with the module's own path.
_LIFTED_CLASSES_MODULE = "flax.linen.transforms"


@contextlib.contextmanager
def _building_unbound() -> Iterator[None]:
    """Modules made in this context have no parent, whatever module is being called.

    Inside an interceptor the intercepted module is on flax's module stack, so a wrapper
    made there would become its child (renumbering its auto-named children, or failing in
    a ``setup``-based module). ``None`` on top of the stack is what flax has outside any
    module: the factory builds an unbound wrapper, which inject then binds to its scope.
    """
    stack = flax_module._context.module_stack
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def _idle_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that is not in the middle of a call: the one inject wraps.

    The intercepted module is mid-call. Wrapped, it would be called again from inside that
    call: flax would count its auto-named children on from those of the wrapper's first
    (init) pass, and hand that count to the clone ``nn.map_variables`` makes (it exports
    the module's state), which would then look for ``Dense_1`` where ``Dense_0`` is. The
    twin has the same class, fields and path, and a rewound scope: the same variables and
    RNG counters, no names reserved, so its children get their usual names and keys.
    """
    assert module.scope is not None
    return module.clone(parent=module.scope.rewound())


def _is_flax_internal(module: nn.Module, root: Scope) -> bool:
    """A call flax makes for its own checks, or a call of a lifted class.

    Before a transform, flax validates a module's ``setup`` by calling an identity
    ``<lambda>`` method on a clone bound to a throw-away ``TestScope``; nothing there is
    the model's. A lifted class (``nn.scan(Layer)``) is seen only there; were its own call
    seen, it would be on the outer scope with the stacked variables, so inject leaves it
    and wraps the body's call inside the transform, once per slice.
    """
    return (
        isinstance(root, flax_module.TestScope) or type(module).__module__ == _LIFTED_CLASSES_MODULE
    )


def _root(scope: Scope) -> Scope:
    while scope.parent is not None:
        scope = scope.parent
    return scope


def _is_apply_root(scope: Scope) -> bool:
    """A root scope made by ``Module.apply``/``init``, not by a lifted transform.

    Lifted transforms give their body a new root scope that keeps the module's path and a
    debug path naming the transform (``scan(layers)``); a ``Module.apply`` starts at path
    ``()`` with an empty debug path.
    """
    return scope.parent is None and not tuple(scope.path) and not tuple(scope.debug_path)


# -- patterns ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pattern:
    given: ModulePattern
    matches: Callable[[Path, nn.Module], bool]

    def __str__(self) -> str:
        if isinstance(self.given, str):
            return repr(self.given)
        if isinstance(self.given, type):
            return self.given.__qualname__
        return getattr(self.given, "__name__", repr(self.given))


def _string_pattern(text: str) -> Callable[[Path, Any], bool]:
    # Element rules are the variable filters' (whole elements, Name -> Name_<n>, globs); a
    # module pattern is anchored at the end of the path, as PEFT's target_modules, so that
    # "attn" does not also match everything below attn. A leading "/" anchors the start.
    anchored = text.startswith("/")
    parts = [_filters._element_matcher(part) for part in text.strip("/").split("/")]

    # The module is not read: wrapkit.nnx.inject matches NNX modules' paths with it too.
    def matches(path: Path, module: Any) -> bool:
        if len(path) < len(parts) or (anchored and len(path) != len(parts)):
            return False
        tail = path[len(path) - len(parts) :]
        return all(part(element) for part, element in zip(parts, tail, strict=True))

    return matches


def _pattern_problems(patterns: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(patterns of the wrong kind, patterns with a bad value), as sentences."""
    wrong_kind: list[str] = []
    bad_value: list[str] = []
    for given in patterns:
        if isinstance(given, str):
            if given in ("", "/") or "" in given.removeprefix("/").split("/"):
                bad_value.append(
                    f"pattern {given!r} has an empty path element. Write module names "
                    "separated by '/', e.g. 'attn/c_attn'; a leading '/' anchors at the "
                    "model's root."
                )
        elif isinstance(given, type):
            if not issubclass(given, nn.Module):
                wrong_kind.append(
                    f"pattern {given.__qualname__} is a class but not a flax.linen.Module "
                    "subclass; pass a Linen module class such as nn.Dense."
                )
        elif not callable(given):
            wrong_kind.append(
                f"pattern {given!r} ({type(given).__name__}) is neither a path string, a "
                "Linen module class nor a callable (path, module) -> bool."
            )
    if not patterns:
        bad_value.append("no pattern was given; pass e.g. 'Dense_0', nn.Dense or a callable.")
    return wrong_kind, bad_value


def _compile(patterns: Sequence[ModulePattern]) -> tuple[_Pattern, ...]:
    return tuple(_Pattern(given, _matcher(given)) for given in patterns)


def _matcher(given: ModulePattern) -> Callable[[Path, nn.Module], bool]:
    if isinstance(given, str):
        return _string_pattern(given)
    if isinstance(given, type):
        cls = given

        def is_instance(path: Path, module: nn.Module) -> bool:
            return isinstance(module, cls)

        return is_instance
    decide = given

    def decides(path: Path, module: nn.Module) -> bool:
        return bool(decide("/".join(path), module))

    return decides


def _as_tuple(pattern: ModulePattern | Sequence[ModulePattern]) -> tuple[Any, ...]:
    if isinstance(pattern, str | type) or callable(pattern):
        return (pattern,)
    try:
        return tuple(pattern)
    except TypeError:
        return (pattern,)


# -- the factory ------------------------------------------------------------------------


def _factory_class(factory: Any) -> Any:
    """The class a factory builds when it can be told without calling it, else ``None``."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory if isinstance(factory, type) else None


def _factory_problems(factory: Any) -> list[str]:
    if isinstance(factory, nn.Module):
        return [
            f"wrapper must build a wrapper around the module it is given, got the module "
            f"{type(factory).__name__}(...) itself. Pass the class or a factory: "
            f"{type(factory).__name__}, functools.partial({type(factory).__name__}, ...) or "
            "lambda module: ...."
        ]
    if not callable(factory):
        return [
            f"wrapper must be a wrapper class or a callable module -> wrapper, got "
            f"{factory!r} ({type(factory).__name__})."
        ]
    cls = _factory_class(factory)
    if cls is not None and not (issubclass(cls, Wrapper)):
        hint = (
            f" Use wrapkit.linen.{cls.__name__}, a drop-in with the same arguments."
            if cls in (nn.WeightNorm, nn.SpectralNorm)
            else ""
        )
        return [
            f"wrapper {cls.__module__}.{cls.__qualname__} is not a wrapkit.linen.Wrapper; "
            f"inject builds wrapkit wrappers, which keep the wrapped module's variables "
            f"where they are.{hint}"
        ]
    return []


def _describe_factory(factory: Any) -> str:
    cls = _factory_class(factory)
    if cls is not None:
        return cls.__name__
    return getattr(factory, "__name__", repr(factory))


def _option_problems(classes: Sequence[type], options: Mapping[str, Any]) -> list[str]:
    """Options no wrapper takes, and options a wrapper needs that are not given.

    A wrapper's call options are the keyword-only parameters of its ``transform``; the
    model's code never passes them, so inject gives them to every wrapped call.
    """
    wrappers = [cls for cls in classes if isinstance(cls, type) and issubclass(cls, Wrapper)]
    taken: dict[str, Any] = {}
    for cls in wrappers:
        for parameter in inspect.signature(cls.transform).parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                taken.setdefault(parameter.name, parameter.default)
    names = " and ".join(cls.__name__ for cls in wrappers)
    takes = "takes" if len(wrappers) == 1 else "take"
    problems = [
        f"option {name!r} is a call option of no wrapper: {names} {takes} "
        f"{', '.join(map(repr, sorted(taken))) or 'none'}."
        for name in options
        if name not in taken
    ]
    problems += [
        f"{names} needs the call option {name!r} on every call, and the model's code does "
        f"not pass it: give it to inject, options={{{name!r}: ...}}."
        for name, default in taken.items()
        if default is inspect.Parameter.empty and name not in options
    ]
    return problems


# -- the injected module ----------------------------------------------------------------


@functools.cache
def _forwarding_method(name: str) -> Callable[..., Any]:
    """A Module method named ``name`` that runs the model's ``name`` with injection."""

    def method(self: Injected, *args: Any, **kwargs: Any) -> Any:
        return self._run(name, args, kwargs)

    method.__name__ = method.__qualname__ = name
    return wrap_method_once(method)


@dataclasses.dataclass(frozen=True, eq=False)
class _Held:
    """The model, out of flax's sight.

    A module in a dataclass field is adopted when its holder is bound: bound as a child
    named after the field, one level down. ``nn.share_scope`` would move it back to the
    holder's scope, but leaves the paths of the modules the model holds in its own fields
    (an ``nn.Sequential``'s layers) one level down (flax 0.12.8), and inject matches paths.
    So the model is held here and bound in each call, straight to the holder's scope.
    """

    module: nn.Module


@_calls.transparent  # a summary's root row is the model's
class Injected(nn.Module):
    """A model whose submodules matching ``patterns`` are wrapped in each call; see
    [`inject`][wrapkit.linen.inject], which builds it.

    Its variables are the model's, under the same names (an unbound model is bound to the
    Injected module's own scope; a model already bound, built in a parent's
    ``@nn.compact`` method, keeps its place), plus each wrapper's own, beside the module
    it wraps: ``<parent path>/<name>/<module name>/<path>``. Calling it, or a public method
    of the model through it (``injected.apply(variables, x, method="encode")``), runs the
    model's method with the matching submodules wrapped.

    Attributes:
        held: the model (use [`model`][wrapkit.linen.Injected.model]).
        wrapper: the wrapper factory, called with each matching submodule.
        patterns: the patterns, as given.
        strict: whether a pattern that matches nothing in a call is an error.
        wrapper_name: the name of the wrappers' scope beside the modules they wrap;
            ``None`` takes the wrapper's class name.
        options: call options given to every wrapped call (``update_stats`` of
            [`SpectralNorm`][wrapkit.linen.SpectralNorm]): the model's code does not pass
            them. For another value, ``injected.clone(options={...})``; the variables
            stay the same.
    """

    held: _Held
    wrapper: WrapperFactory
    patterns: tuple[ModulePattern, ...]
    strict: bool = True
    wrapper_name: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        # Hashable, as a module's fields should be, also after clone(options={...}).
        object.__setattr__(self, "options", FrozenDict(self.options))
        super().__post_init__()

    @property
    def model(self) -> nn.Module:
        """The model whose submodules are wrapped, as given to ``inject``."""
        return self.held.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the model with the matching submodules wrapped."""
        return self._run("__call__", args, kwargs)

    @nn.nowrap
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "held" not in self.__dict__:
                raise
        model = self.__dict__["held"].module
        if not callable(getattr(type(model), name, None)):
            raise AttributeError(
                f"Injected({type(model).__name__}) has no attribute {name!r}, and "
                f"{type(model).__name__} has no method of that name."
            ) from None
        return types.MethodType(_forwarding_method(name), self)

    @nn.nowrap
    def _run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        model = self.model
        if model.scope is None:
            assert self.scope is not None  # a wrapped method runs bound
            model = model.clone(parent=self.scope)
        assert model.scope is not None
        session = _Session(
            patterns=_compile(self.patterns),
            factory=self.wrapper,
            wrapper_name=self.wrapper_name,
            options=dict(self.options),
            root_path=tuple(model.scope.path),
            root_scope=_root(model.scope),
        )
        with nn.intercept_methods(session.intercept):
            result = getattr(model, method)(*args, **kwargs)
        session.finish(self.strict, _describe_factory(self.wrapper))
        return result

    @nn.nowrap
    def report(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        method: str = "__call__",
        rngs: Any = None,
        freeze_original: bool = False,
        **kwargs: Any,
    ) -> InjectReport:
        """What one call matched and wrapped, and the parameter counts, from a trace.

        The call ``self.apply(variables, *args, method=method, rngs=rngs, **kwargs)`` is
        traced abstractly (``jax.eval_shape``: nothing is computed), without raising for
        patterns that match nothing: the report lists them.

        Args:
            variables: the injected model's variables (concrete, or abstract from
                ``jax.eval_shape(injected.init, ...)``).
            *args: the call's positional arguments, arrays or ``jax.ShapeDtypeStruct``.
            method: the name of the model's method to call.
            rngs: PRNG keys the call needs (dropout), as for ``Module.apply``.
            freeze_original: count only the wrappers' parameters as trainable (as when
                training adapters over a frozen model); by default all are.
            **kwargs: the call's keyword arguments, passed as they are (not traced).

        Returns:
            An [`InjectReport`][wrapkit.linen.InjectReport].
        """
        recorder: list[_Record] = []
        token = _REPORT.set(recorder)
        try:

            def run(variables: Any, args: Any) -> Any:
                return self.apply(variables, *args, method=method, rngs=rngs, **kwargs)

            jax.eval_shape(run, variables, args)
        finally:
            _REPORT.reset(token)
        patterns = _compile(self.patterns)
        record = _Record.merge(recorder, len(patterns))
        return _report(
            record, patterns, variables, _describe_factory(self.wrapper), freeze_original
        )


def inject(
    model: nn.Module,
    wrapper: WrapperFactory,
    pattern: ModulePattern | Sequence[ModulePattern],
    *,
    strict: bool = True,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Injected:
    """Wraps the submodules of ``model`` whose path matches ``pattern``, without editing it.

    Each call of a matching submodule (its ``__call__`` and public methods) goes through
    ``wrapper(submodule)``, built when the submodule is called: submodules built in
    ``@nn.compact`` or ``setup``, members of an ``nn.Sequential``, and the bodies of
    ``nn.scan``, ``nn.vmap`` and ``nn.remat``, where the wrapper's variables are made per
    slice (one per layer, one per expert). The model's variables keep their tree and
    names; each wrapper adds its own beside the submodule it wraps, where a wrapper made
    in the parent's ``@nn.compact`` method would (``WeightNorm_0``), in a scope named
    ``name``: ``params/h/0/attn/WeightNorm/c_attn/kernel/scale``. The body of a
    transform, matched as a whole, has no parent inside the transform: its wrapper's
    variables are inside it, ``params/layers/WeightNorm/layers/Dense_0/kernel/scale``.

    Args:
        model: the Linen model, unbound.
        wrapper: a wrapkit wrapper class, a ``functools.partial`` of one, or a callable
            ``module -> wrapper`` (a stack: ``lambda m: WeightNorm(SpectralNorm(m))``).
        pattern: one pattern or a sequence of them. A string matches the end of a
            submodule's path, element by element, with the rules of variable filters:
            ``"c_attn"``, ``"attn/c_*"``, ``"Dense"`` (also ``Dense_0``, ``Dense_1``); a
            leading ``/`` anchors it at the model's root. A Linen module class matches its
            instances; a callable ``(path, module) -> bool`` decides (path ``"h/0/attn"``).
        strict: each pattern must match a submodule in every call; otherwise the call
            raises a ``ValueError`` naming the pattern and listing the submodules the call
            reached. Pass ``False`` to allow patterns that match nothing.
        name: the name of the wrappers' scope (default: the wrapper's class name).
        options: call options for every wrapped call, which the model's code does not
            pass: ``{"update_stats": True}`` for
            [`SpectralNorm`][wrapkit.linen.SpectralNorm].

    Returns:
        An [`Injected`][wrapkit.linen.Injected] module: ``init`` and ``apply`` it as the
        model; [`Injected.report`][wrapkit.linen.Injected.report] says what was wrapped.

    Raises:
        TypeError: for a model or wrapper of the wrong kind; when the wrapper is built, for
            a factory that does not return a wrapkit wrapper around the module it is given.
        ValueError: for invalid patterns; in a call, for a pattern that matches nothing
            (with ``strict``), or for a matching submodule that cannot be wrapped, whatever
            ``strict`` says (one run by a ``Module.apply`` of its own, such as GPT-2's tied
            LM head; a private method called from outside; a transform's body with a
            wrapper that keeps statistics): inject never wraps part of a model silently.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightNorm, inject
        >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
        >>> injected = inject(model, WeightNorm, "layers_2")
        >>> variables = injected.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> jax.tree_util.tree_map(jnp.shape, variables["params"])
        {'WeightNorm': {'layers_2/kernel/scale': (2,)},
         'layers_0': {'bias': (4,), 'kernel': (3, 4)},
         'layers_2': {'bias': (2,), 'kernel': (4, 2)}}
        >>> print(injected.report(variables, jnp.ones((1, 3))))
        inject WeightNorm: 1 module wrapped
          'layers_2' -> layers_2 (Dense)
        trainable params: 28 || all params: 28 || trainable%: 100.00
          original 26 + WeightNorm's own 2
    """
    problems = []  # of the wrong kind: TypeError
    if isinstance(model, type):
        problems.append(
            f"model must be a flax.linen.Module instance, got the class {model.__qualname__}; "
            f"build it first: inject({model.__qualname__}(...), ...)."
        )
    elif not isinstance(model, nn.Module):
        problems.append(
            f"model must be a flax.linen.Module, got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )
    problems += _factory_problems(wrapper)
    if not isinstance(strict, bool):
        problems.append(f"strict must be True or False, got {strict!r}.")
    patterns = _as_tuple(pattern)
    wrong_kind, bad_value = _pattern_problems(patterns)
    problems += wrong_kind
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        bad_value.append(f"name must be a non-empty string without '/', or None; got {name!r}.")
    options = FrozenDict(options or {})
    known = _factory_class(wrapper)
    if known is not None and issubclass(known, Wrapper):
        problems += _option_problems([known], options)
    # Every problem is listed once; the error's type is that of the worst.
    raise_collected(
        "inject", problems + bad_value, TypeError if problems else ValueError, separator=": "
    )
    return Injected(
        _Held(model), wrapper, patterns, strict=strict, wrapper_name=name, options=options
    )


def _check_kept_inside(wrapper: Wrapper, text: str, module: nn.Module) -> None:
    """Refuses a wrapper inside the module it wraps that keeps variables it does not map.

    ``nn.map_variables`` writes back every collection it does not map (``batch_stats``
    when the wrapper maps ``params``), as it was when the call began: inside the wrapped
    module, the wrapper's own updates there (SpectralNorm's ``u``) would be overwritten.
    """
    mapped = {c for w in chain(wrapper) if isinstance(w, Wrapper) for c in w.collections}
    assert wrapper.scope is not None
    kept = sorted(
        collection
        for collection, tree in wrapper.scope.variables().items()
        if collection not in mapped and tree and wrapper.scope.is_mutable_collection(collection)
    )
    if kept:
        raise ValueError(
            f"inject: {text} ({type(module).__name__}) is the body of a lifted transform "
            f"(nn.scan, nn.vmap, nn.remat, ...), so {_describe(wrapper)} has to sit inside "
            f"it, and it keeps variables in {', '.join(map(repr, kept))}: there the wrapped "
            "call would write back their old values over the wrapper's updates (flax's "
            "map_variables returns every collection it does not map). Match the modules "
            f"inside {text} instead, or wrap {type(module).__name__} in the model's code."
        )


# -- one call ---------------------------------------------------------------------------

# Set by Injected.report around its trace: each session of the trace appends its record.
_REPORT: contextvars.ContextVar[list[_Record] | None] = contextvars.ContextVar(
    "wrapkit_inject_report", default=None
)
# Scopes of the wrappers being called, by path: their modules (the wrapper, and the inner
# wrappers of a stack) are inject's own, never matched, by any Injected.
_WRAPPER_SCOPES: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar(
    "wrapkit_inject_wrapper_scopes", default=frozenset()
)


@dataclasses.dataclass
class _Record:
    """What one call reached and wrapped (paths relative to the injected model)."""

    reached: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> type
    matched: list[dict[str, None]] = dataclasses.field(default_factory=list)  # per pattern
    wrapped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> type
    wrapper_scopes: dict[Path, None] = dataclasses.field(default_factory=dict)
    unwrappable: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why

    @classmethod
    def merge(cls, records: Sequence[_Record], patterns: int) -> _Record:
        merged = cls(matched=[{} for _ in range(patterns)])
        for record in records:
            merged.reached.update(record.reached)
            for into, found in zip(merged.matched, record.matched, strict=True):
                into.update(found)
            merged.wrapped.update(record.wrapped)
            merged.wrapper_scopes.update(record.wrapper_scopes)
            merged.unwrappable.update(record.unwrappable)
        return merged


class _Session:
    """The interceptor of one call of an Injected module, and what it saw."""

    def __init__(
        self,
        patterns: tuple[_Pattern, ...],
        factory: WrapperFactory,
        wrapper_name: str | None,
        options: dict[str, Any],
        root_path: Path,
        root_scope: Scope,
    ) -> None:
        self.patterns, self.factory, self.wrapper_name = patterns, factory, wrapper_name
        self.options = options
        self.root_path, self.root_scope = root_path, root_scope
        self.record = _Record(matched=[{} for _ in patterns])
        self.active: set[Path] = set()  # absolute paths of the modules being wrapped
        self.callers: list[Path] = []  # display paths of the calls in progress
        self.nested: dict[int, Path] = {}  # id of a Module.apply's root -> display prefix
        self.homes: set[tuple[int, str]] = set()  # (id of a parent scope, wrapper name)

    # -- where a module is --------------------------------------------------------------

    def _place(self, module: nn.Module) -> tuple[Path, bool] | None:
        """(path relative to the model, whether it is in the model's variables), or None
        for a module outside the model."""
        scope = module.scope
        assert scope is not None
        path = tuple(scope.path)
        root = _root(scope)
        if root is not self.root_scope and _is_apply_root(root):
            # A Module.apply made inside the model (a tied head): its variables are the
            # ones passed to that apply, not the model's. Placed under its caller.
            prefix = self.nested.setdefault(
                id(root), (self.callers[-1] if self.callers else ()) + (module.name or "",)
            )
            return prefix + path, False
        if path[: len(self.root_path)] != self.root_path:
            return None
        return path[len(self.root_path) :], True

    def intercept(
        self,
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: nn.module.InterceptorContext,
    ) -> Any:
        module, method = context.module, context.method_name
        # setup builds submodules: their calls are what is wrapped.
        if module.scope is None or method == "setup":
            return next_fun(*args, **kwargs)
        absolute = tuple(module.scope.path)
        if (
            _is_flax_internal(module, _root(module.scope))
            or absolute in self.active
            or any(absolute[: len(scope)] == scope for scope in _WRAPPER_SCOPES.get())
        ):
            return next_fun(*args, **kwargs)
        place = self._place(module)
        if place is None:
            return next_fun(*args, **kwargs)
        path, in_model = place
        text = "/".join(path)
        if path:
            self.record.reached.setdefault(text, type(module).__name__)
        hits = [i for i, p in enumerate(self.patterns) if p.matches(path, module)]
        for index in hits:
            self.record.matched[index].setdefault(text)
        self.callers.append(path)
        try:
            if not hits:
                return next_fun(*args, **kwargs)
            if not in_model:
                self.record.unwrappable.setdefault(
                    text,
                    f"{text} ({type(module).__name__}) runs in a Module.apply of its own "
                    "(as a tied LM head does), on variables passed to that apply rather "
                    "than the model's, so a wrapper's variables would have nowhere to live. "
                    "Leave it out of the pattern (a callable pattern can reject its path), "
                    "or wrap it in the model's code",
                )
                return next_fun(*args, **kwargs)
            if method != "__call__" and method.startswith("_"):
                self.record.unwrappable.setdefault(
                    text,
                    f"{text} ({type(module).__name__}) has its private method {method!r} "
                    "called from outside it, and wrappers delegate only __call__ and "
                    "public methods, so that call would skip the wrapper",
                )
                return next_fun(*args, **kwargs)
            # Tools recording calls (the summary) show the wrapper's call, not this one.
            _calls.diverted(module)
            return self._wrapped(module, method, path, args, kwargs)
        finally:
            self.callers.pop()

    def _wrapped(
        self,
        module: nn.Module,
        method: str,
        path: Path,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        text = "/".join(path)
        clash = sorted(set(kwargs) & set(self.options))
        if clash:
            raise TypeError(
                f"inject: {text}.{method} is called with {', '.join(clash)}, which inject's "
                "options also give the wrapper; leave them out of options."
            )
        wrapper, inside = self._build(module, path)
        assert wrapper.scope is not None and module.scope is not None
        self.record.wrapped.setdefault(text, type(module).__name__)
        home = path if inside else path[:-1]
        self.record.wrapper_scopes.setdefault(home + (wrapper.scope.name or "",))
        absolute = tuple(module.scope.path)
        token = _WRAPPER_SCOPES.set(_WRAPPER_SCOPES.get() | {tuple(wrapper.scope.path)})
        self.active.add(absolute)
        try:
            if method == "__call__":
                result = wrapper(*args, **kwargs, **self.options)
            else:
                result = getattr(wrapper, method)(*args, **kwargs, **self.options)
        finally:
            self.active.discard(absolute)
            _WRAPPER_SCOPES.reset(token)
        if inside:
            _check_kept_inside(wrapper, text, module)
        return result

    def _build(self, module: nn.Module, path: Path) -> tuple[Wrapper, bool]:
        """The wrapper around (a twin of) ``module``, bound; and whether it sits inside."""
        text = "/".join(path) or "(the model)"
        assert module.scope is not None
        twin = _idle_twin(module)
        with _building_unbound():
            built = self.factory(twin)
        if not isinstance(built, Wrapper):
            raise TypeError(
                f"inject: the wrapper factory {_describe_factory(self.factory)} returned "
                f"{type(built).__module__}.{type(built).__qualname__} for {text} "
                f"({type(module).__name__}); it must return a wrapkit.linen.Wrapper around "
                "the module it is given."
            )
        if chain(built)[-1] is not twin:
            raise TypeError(
                f"inject: the wrapper factory {_describe_factory(self.factory)} returned "
                f"{_describe(built)}, which does not wrap the {type(module).__name__} at "
                f"{text} it was given; build the wrapper around the factory's argument."
            )
        problems = _option_problems([type(m) for m in chain(built)], self.options)
        raise_collected(f"inject({_describe(built)})", problems, TypeError, separator=": ")
        name = self.wrapper_name or type(built).__name__
        home = module.scope.parent
        if home is None:
            # The body of a lifted transform (or the model itself): no parent scope inside
            # the transform, so the wrapper sits inside the module, per slice.
            assert twin.scope is not None
            return built.clone(parent=twin.scope.push(name)), True
        # Beside the module, as a wrapper made in a parent's @nn.compact method, in one
        # scope per parent and wrapper name: each wrapper's variables are named after the
        # module it wraps. A name the parent reserved itself is one of its own children.
        key = (id(home), name)
        if key not in self.homes and home.name_reserved(name):
            raise ValueError(
                f"inject: the parent of {text} ({type(module).__name__}) already has a "
                f"submodule or variable named {name!r}, where inject would put the "
                "wrapper's variables; pass name=... to inject."
            )
        self.homes.add(key)
        return built.clone(parent=home.push(name, reuse=True)), False

    # -- the end of the call ------------------------------------------------------------

    def finish(self, strict: bool, wrapper: str) -> None:
        recorder = _REPORT.get()
        if recorder is not None:
            recorder.append(self.record)
            return
        problems = list(self.record.unwrappable.values())
        if strict:
            problems += [
                self._unmatched(pattern)
                for pattern, found in zip(self.patterns, self.record.matched, strict=True)
                if not found
            ]
        if problems:
            raise_collected(
                f"inject({wrapper})", [p + "." for p in problems], ValueError, separator=": "
            )

    def _unmatched(self, pattern: _Pattern) -> str:
        reached = self.record.reached
        listed = _listing(reached)
        shown = ", ".join(listed[:_LISTED]) or "none"
        more = f", and {len(listed) - _LISTED} more" if len(listed) > _LISTED else ""
        hint = ""
        if isinstance(pattern.given, str):
            last = pattern.given.rstrip("/").rsplit("/", 1)[-1]
            names = sorted({path.rsplit("/", 1)[-1] for path in reached})
            close = difflib.get_close_matches(last, names, n=3)
            if close:
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
        return (
            f"pattern {pattern} matches none of the {len(reached)} submodules this call "
            f"reached: {shown}{more}.{hint} Pass strict=False to allow a pattern that "
            "matches nothing"
        )


def _listing(reached: Mapping[str, str]) -> list[str]:
    """``path (type)`` for each submodule, layers that differ only by index on one line.

    ``h/0/attn`` and ``h/1/attn`` read ``h/{0,1}/attn (Attention)``; a 12-layer model
    lists one block's modules, not twelve.
    """
    groups: dict[tuple[tuple[str, ...], str], list[tuple[int, ...]]] = {}
    for path, kind in reached.items():
        elements = path.split("/")
        shape = tuple("#" if element.isdigit() else element for element in elements)
        numbers = tuple(int(element) for element in elements if element.isdigit())
        groups.setdefault((shape, kind), []).append(numbers)
    lines = []
    for (shape, kind), indices in groups.items():
        columns = iter(zip(*indices, strict=True))
        elements = [_indices(next(columns)) if e == "#" else e for e in shape]
        lines.append(f"{'/'.join(elements)} ({kind})")
    return lines


def _indices(values: tuple[int, ...]) -> str:
    unique = sorted(set(values))
    if len(unique) == 1:
        return str(unique[0])
    if len(unique) > 2 and unique == list(range(unique[0], unique[-1] + 1)):
        return f"{{{unique[0]}..{unique[-1]}}}"
    return "{" + ",".join(map(str, unique)) + "}"


_LISTED = 40  # submodules listed in an error; a large model reaches hundreds


# -- the report -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InjectReport:
    """What an injected call wrapped, and the parameter counts; ``print`` it.

    Attributes:
        wrapper: the wrapper's name, e.g. ``"WeightNorm"``.
        matched: each pattern (as written in messages) and the paths of the submodules it
            matched, in call order.
        wrapped: the paths of the wrapped submodules and their types.
        unwrappable: submodules that matched but cannot be wrapped, and why.
        added: the keys of the wrappers' own variables, as ``flax.traverse_util.flatten_dict``
            gives them (``("params", "h", "0", "attn", "WeightNorm", "c_attn/kernel/scale")``):
            merge these into a checkpoint of the model. From
            [`wrapkit.nnx.inject`][wrapkit.nnx.inject], their paths in
            ``nnx.state(model)`` (``("h", 0, "attn", "c_attn", "scale", "kernel")``).
        original_params: parameters of the model itself (collection ``params``).
        added_params: parameters the wrappers add.
        trainable_params: ``original_params + added_params``, or only ``added_params`` for
            a report made with ``freeze_original=True``.
    """

    wrapper: str
    matched: Mapping[str, tuple[str, ...]]
    wrapped: Mapping[str, str]
    unwrappable: Mapping[str, str]
    added: tuple[tuple[Any, ...], ...]  # NNX paths hold list indices too
    original_params: int
    added_params: int
    trainable_params: int

    @property
    def unmatched(self) -> tuple[str, ...]:
        """The patterns that matched no submodule."""
        return tuple(pattern for pattern, paths in self.matched.items() if not paths)

    @property
    def total_params(self) -> int:
        """All parameters: the model's and the wrappers'."""
        return self.original_params + self.added_params

    def __str__(self) -> str:
        return _render(self)


def _size(leaf: Any) -> int:
    return math.prod(jax.numpy.shape(leaf))


def _report(
    record: _Record,
    patterns: Sequence[_Pattern],
    variables: Mapping[str, Any],
    wrapper: str,
    freeze_original: bool,
) -> InjectReport:
    # Boxed variables (nn.with_partitioning) are counted by their values.
    flat = flatten_dict({c: dict(tree) for c, tree in dict(nn.unbox(variables)).items()})
    scopes = tuple(record.wrapper_scopes)

    def is_added(key: tuple[str, ...]) -> bool:
        return any(key[1 : 1 + len(scope)] == scope for scope in scopes)

    added = tuple(key for key in flat if is_added(key))
    params = {key: leaf for key, leaf in flat.items() if key[0] == "params"}
    added_params = sum(_size(leaf) for key, leaf in params.items() if is_added(key))
    original = sum(_size(leaf) for leaf in params.values()) - added_params
    return InjectReport(
        wrapper=wrapper,
        matched={
            str(pattern): tuple(found)
            for pattern, found in zip(patterns, record.matched, strict=True)
        },
        wrapped=dict(record.wrapped),
        unwrappable=dict(record.unwrappable),
        added=added,
        original_params=original,
        added_params=added_params,
        trainable_params=added_params if freeze_original else original + added_params,
    )


def _render(report: InjectReport) -> str:
    """The report as text, in the spirit of PEFT's ``print_trainable_parameters``."""
    count = len(report.wrapped)
    lines = [f"inject {report.wrapper}: {count} module{'' if count == 1 else 's'} wrapped"]
    for pattern, paths in report.matched.items():
        found = ", ".join(f"{path} ({report.wrapped.get(path, '?')})" for path in paths)
        lines.append(f"  {pattern} -> {found or 'nothing matched'}")
    lines += [f"  not wrapped: {why}" for why in report.unwrappable.values()]
    share = 100 * report.trainable_params / report.total_params if report.total_params else 0.0
    lines.append(
        f"trainable params: {report.trainable_params:,} || all params: "
        f"{report.total_params:,} || trainable%: {share:.2f}"
    )
    lines.append(
        f"  original {report.original_params:,} + {report.wrapper}'s own {report.added_params:,}"
    )
    return "\n".join(lines)
