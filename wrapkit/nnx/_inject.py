"""Wrapping the submodules of an existing NNX model by pattern, in place.

An NNX model is a graph of objects that exist before any call, so inject needs no
interception (as the Linen one does): it finds the submodules whose paths match, builds a
wrapper around each and puts it where the submodule was, in every place that holds it (a
module held twice, a tied layer, gets one wrapper). This is flax's own model surgery
(``model.layer = LoRA(model.layer)``), done by pattern. The patterns and the report are
Linen's: the same string rules on ``/``-joined paths, and the same
[`InjectReport`][wrapkit.linen.InjectReport].
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import jax.numpy as jnp
from flax import nnx

from .._problems import raise_collected
from ..linen._inject import (
    _LISTED,
    InjectReport,
    _as_tuple,
    _describe_factory,
    _factory_class,
    _listing,
    _string_pattern,
)
from ..linen._inject import _pattern_problems as _string_problems
from ..linen._wrapper import Wrapper as _LinenWrapper
from ._lifecycle import _modules, _Node, _where
from ._wrapper import _REQUIRED, Wrapper, _describe, _owned, _path

ModulePattern: TypeAlias = str | type[nnx.Module] | Callable[[str, nnx.Module], bool]
"""One pattern: a path string, an NNX module class, or a callable ``(path, module) -> bool``."""

WrapperFactory: TypeAlias = Callable[[nnx.Module], Wrapper]
"""Builds a wrapper around the module it is given: ``lambda m: LoRA(m, rank=4, rngs=rngs)``,
``functools.partial(WeightNorm, feature_axes=0)``, or a class that needs no other argument."""

_Matcher: TypeAlias = Callable[[tuple[str, ...], nnx.Module], bool]


# -- arguments ----------------------------------------------------------------------------


def _display(given: Any) -> str:
    if isinstance(given, str):
        return repr(given)
    if isinstance(given, type):
        return given.__qualname__
    return getattr(given, "__name__", repr(given))


def _matcher(given: ModulePattern) -> _Matcher:
    if isinstance(given, str):
        return _string_pattern(given)
    if isinstance(given, type):
        cls = given
        return lambda path, module: isinstance(module, cls)
    decide = given
    return lambda path, module: bool(decide("/".join(path), module))


def _pattern_problems(patterns: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(patterns of the wrong kind, patterns with a bad value), as sentences."""
    strings = [given for given in patterns if isinstance(given, str)]
    bad_value = _string_problems(strings)[1] if strings else []
    wrong_kind = []
    for given in patterns:
        if isinstance(given, type):
            if not issubclass(given, nnx.Module):
                wrong_kind.append(
                    f"pattern {given.__qualname__} is a class but not a flax.nnx.Module "
                    "subclass; pass an NNX module class such as nnx.Linear."
                )
        elif not (isinstance(given, str) or callable(given)):
            wrong_kind.append(
                f"pattern {given!r} ({type(given).__name__}) is neither a path string, an "
                "NNX module class nor a callable (path, module) -> bool."
            )
    if not patterns:
        bad_value.append("no pattern was given; pass e.g. 'linear1', nnx.Linear or a callable.")
    return wrong_kind, bad_value


def _factory_problems(factory: Any) -> list[str]:
    if isinstance(factory, nnx.Module):
        name = type(factory).__name__
        return [
            f"wrapper must build a wrapper around the module it is given, got the module "
            f"{name}(...) itself. Pass a factory: functools.partial({name}, ...) or "
            f"lambda module: {name}(module, ...)."
        ]
    if not callable(factory):
        return [
            f"wrapper must be a wrapper class or a callable module -> wrapper, got "
            f"{factory!r} ({type(factory).__name__})."
        ]
    cls = _factory_class(factory)
    if cls is None or issubclass(cls, Wrapper):
        return []
    hint = ""
    if cls in (nnx.WeightNorm, nnx.SpectralNorm, nnx.LoRA) or issubclass(cls, _LinenWrapper):
        hint = f" Use wrapkit.nnx.{cls.__name__}."
    return [
        f"wrapper {cls.__module__}.{cls.__qualname__} is not a wrapkit.nnx.Wrapper; inject "
        f"builds wrapkit.nnx wrappers, which never write into the module they wrap.{hint}"
    ]


def _model_problems(model: Any) -> list[str]:
    if isinstance(model, type):
        return [
            f"model must be a flax.nnx.Module instance, got the class {model.__qualname__}; "
            f"build it first: inject({model.__qualname__}(..., rngs=nnx.Rngs(0)), ...)."
        ]
    if not isinstance(model, nnx.Module):
        linen = type(model).__module__.startswith("flax.linen") or any(
            klass.__module__ == "flax.linen.module" for klass in type(model).__mro__
        )
        hint = " For a Linen model, use wrapkit.linen.inject." if linen else ""
        return [
            f"model must be a flax.nnx.Module, got {type(model).__module__}."
            f"{type(model).__qualname__}.{hint}"
        ]
    return []


# -- in place -----------------------------------------------------------------------------


def _put(parent: Any, key: Any, value: Any) -> None:
    """``value`` where ``parent`` holds ``key``: an attribute of a module, an item of an
    ``nnx.List``, ``nnx.Dict``, list or dict."""
    if isinstance(parent, nnx.Module) and not isinstance(parent, nnx.List | nnx.Dict):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _selection(wrapper: Wrapper) -> tuple[str, ...]:
    """The paths of the variables a wrapper selects, in the module at the bottom of its stack."""
    return tuple(leaf.path for leaf in wrapper._selected())


class _Injection:
    """The wrappers put into one model, and how to take them out again."""

    def __init__(self, subject: str, factory: WrapperFactory) -> None:
        self.subject, self.factory = subject, factory
        self.undo: list[tuple[Any, Any, Any]] = []  # (parent, key, what it held)
        self.built: set[int] = set()  # ids of the wrappers inject made
        self.wrapped: dict[str, str] = {}

    def wrap(self, node: _Node, text: str) -> None:
        try:
            built = self.factory(node.module)
        except Exception as error:
            error.add_note(f"inject: building the wrapper around {text} ({_kind(node)})")
            raise
        made = self._check(built, node, text)
        for _, parent, key in node.references:
            self.undo.append((parent, key, node.module))
            _put(parent, key, built)
        self.built.update(id(w) for w in made)
        self.wrapped[text] = _kind(node)

    def _check(self, built: Any, node: _Node, text: str) -> list[Wrapper]:
        """The wrappers of the stack ``built`` down to the module; refuses anything else."""
        name = _describe_factory(self.factory)
        if not isinstance(built, Wrapper):
            raise TypeError(
                f"{self.subject}: the wrapper factory {name} returned "
                f"{type(built).__module__}.{type(built).__qualname__} for {text} "
                f"({_kind(node)}); it must return a wrapkit.nnx.Wrapper around the module it "
                "is given."
            )
        made: list[Wrapper] = []
        inner: Any = built
        while isinstance(inner, Wrapper) and inner is not node.module:
            made.append(inner)
            inner = inner.layer_instance
        if inner is not node.module:
            raise TypeError(
                f"{self.subject}: the wrapper factory {name} returned {_describe(built)}, "
                f"which does not wrap the {_kind(node)} at {text} it was given; build the "
                "wrapper around the factory's argument."
            )
        for wrapper in made:
            for option, default in wrapper._call_options.items():
                if default is _REQUIRED:
                    raise TypeError(
                        f"{self.subject}: {_describe(wrapper)} takes the call option "
                        f"{option!r} on every call, with no default, and the model's code "
                        f"does not pass it. Wrap {text} in the model's code, where its "
                        "calls can pass it."
                    )
        return made

    def roll_back(self) -> None:
        for parent, key, held in reversed(self.undo):
            _put(parent, key, held)


def _kind(node: _Node) -> str:
    return type(node.module).__name__


# -- inject -------------------------------------------------------------------------------


def inject(
    model: nnx.Module,
    wrapper: WrapperFactory,
    pattern: ModulePattern | Sequence[ModulePattern],
    *,
    strict: bool = True,
    freeze_original: bool = False,
) -> InjectReport:
    """Wraps the submodules of ``model`` whose path matches ``pattern``, in place.

    Each matching submodule, wherever the model holds it (an attribute, an ``nnx.List``
    or ``nnx.Sequential``, a list or dict), is replaced by ``wrapper(submodule)``; a
    submodule held in several places (a tied layer) gets one wrapper, put in each. Nested
    matches (a block and a layer in it) wrap both, the inner first, as explicit nesting
    would. The model's own variables stay where they were, one ``layer_instance`` down:
    ``h/0/attn/c_attn/kernel`` becomes ``h/0/attn/c_attn/layer_instance/kernel``, and the
    wrapper's own are beside it (``h/0/attn/c_attn/scale/kernel``).

    NNX models are mutable and flax's model surgery is in place, so inject changes
    ``model`` and returns what it did; an optimizer made before must be made again. It is
    all or nothing: a pattern that matches nothing (``strict``), a submodule that cannot be
    wrapped, or a factory that fails leaves the model as it was.

    Args:
        model: the NNX model.
        wrapper: a callable ``module -> wrapper``: ``lambda m: LoRA(m, rank=4,
            rngs=rngs)``, ``functools.partial(WeightNorm, feature_axes=0)``, a stack
            (``lambda m: WeightNorm(SpectralNorm(m, rngs=rngs))``), or a wrapkit.nnx
            wrapper class that needs no other argument.
        pattern: one pattern or a sequence of them, with the rules of
            [`wrapkit.linen.inject`][wrapkit.linen.inject] on the ``/``-joined NNX path
            (``"h/0/attn/c_attn"``, list indices as numbers): a string matches the end of
            the path element by element (``"c_attn"``, ``"attn/c_*"``, ``"layers/0"``),
            a leading ``/`` anchors it at the model's root; an NNX module class matches
            its instances; a callable ``(path, module) -> bool`` decides.
        strict: each pattern must match a submodule; otherwise a ``ValueError`` names it
            and lists the submodules of the model. Pass ``False`` to allow patterns that
            match nothing (the report lists them under ``unmatched``).
        freeze_original: count only the wrappers' parameters as trainable in the report
            (adapters over a frozen model); by default all are.

    Returns:
        An [`InjectReport`][wrapkit.linen.InjectReport]: what each pattern matched, what
        was wrapped, the keys of the wrappers' own variables in ``nnx.state(model)``, and
        the parameter counts (``nnx.Param`` variables). Its ``unwrappable`` is empty: what
        cannot be wrapped is an error.

    Raises:
        TypeError: for a model, wrapper or pattern of the wrong kind; for a factory that
            does not return a wrapkit.nnx wrapper around the module it is given, or one
            that needs a call option the model's code does not pass.
        ValueError: for invalid patterns; for a pattern that matches nothing (with
            ``strict``); for a match that cannot be wrapped in place, whatever ``strict``
            says (the model itself, a submodule held in a tuple, a module inside one that a
            wrapper already wraps and selects variables of).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm, inject
        >>> rngs = nnx.Rngs(0)
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu,
        ...                        nnx.Linear(4, 2, rngs=rngs))
        >>> report = inject(model, WeightNorm, "layers/2")
        >>> type(model.layers[2]).__name__
        'WeightNorm'
        >>> print(report)
        inject WeightNorm: 1 module wrapped
          'layers/2' -> layers/2 (Linear)
        trainable params: 28 || all params: 28 || trainable%: 100.00
          original 26 + WeightNorm's own 2
        >>> report.added
        (('layers', 2, 'scale', 'kernel'),)
    """
    problems = _model_problems(model) + _factory_problems(wrapper)
    for name, value in (("strict", strict), ("freeze_original", freeze_original)):
        if not isinstance(value, bool):
            problems.append(f"{name} must be True or False, got {value!r}.")
    patterns = _as_tuple(cast(Any, pattern))  # Linen's, typed for Linen patterns
    wrong_kind, bad_value = _pattern_problems(patterns)
    problems += wrong_kind
    raise_collected(
        "inject", problems + bad_value, TypeError if problems else ValueError, separator=": "
    )
    name = _describe_factory(wrapper)
    subject = f"inject({name})"
    matchers = [_matcher(given) for given in patterns]
    nodes = _modules(model)
    # Containers are not modules one wraps; their items are.
    candidates = [n for n in nodes.values() if not isinstance(n.module, nnx.List | nnx.Dict)]
    # A module held in several places (a tied layer) is reached, and matched, by each path.
    places = {id(n.module): [path for path, _, _ in n.references] or [()] for n in candidates}
    reached = {_path(p): _kind(n) for n in candidates for p in places[id(n.module)] if p}
    matched: list[list[str]] = [[] for _ in patterns]
    hits: list[tuple[_Node, str]] = []  # with the path it is named by
    unwrappable: dict[str, str] = {}
    for node in candidates:
        found: dict[int, tuple[Any, ...]] = {}
        for path in places[id(node.module)]:
            for index, matches in enumerate(matchers):
                if matches(_texts(path), node.module):
                    found.setdefault(index, path)
        if not found:
            continue
        text = _path(next(iter(found.values())))
        if not node.path:
            unwrappable[text] = (
                f"the model itself ({_kind(node)}) matches, but inject wraps submodules in "
                "place and cannot replace the model it is given; wrap it directly, "
                f"Wrapper({_kind(node)}(...))"
            )
            continue
        for index in found:
            matched[index].append(text)
        in_tuple = [path for path, parent, _ in node.references if isinstance(parent, tuple)]
        if in_tuple:
            unwrappable[text] = (
                f"{text} ({_kind(node)}) is held in a tuple at {_path(in_tuple[0][:-1])!r}, "
                "which cannot be changed in place; hold it in an nnx.List or a list"
            )
            continue
        hits.append((node, text))
    problems = list(unwrappable.values())
    if strict:
        problems += [
            _unmatched(_display(given), reached, type(model).__name__)
            for given, found in zip(patterns, matched, strict=True)
            if not found
        ]
    raise_collected(subject, [p + "." for p in problems], ValueError, separator=": ")

    existing = {
        id(n.module): (n, _selection(n.module)) for n in candidates if isinstance(n.module, Wrapper)
    }
    injection = _Injection(subject, wrapper)
    try:
        # The deepest first: a block's wrapper is built around the wrappers inside it.
        for node, text in sorted(hits, key=lambda hit: -len(hit[0].path)):
            injection.wrap(node, text)
        _check_kept(subject, existing)
    except Exception:
        injection.roll_back()
        raise
    wrapped = {text: injection.wrapped[text] for text in reached if text in injection.wrapped}
    return _report(model, name, patterns, matched, wrapped, injection.built, freeze_original)


def _texts(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(key) for key in path)


def _check_kept(subject: str, existing: dict[int, tuple[_Node, tuple[str, ...]]]) -> None:
    """Refuses a change inside a module that a wrapper of the model already wraps, where it
    moves the variables that wrapper selects: it keys its own variables by their paths."""
    problems = []
    for node, before in existing.values():
        assert isinstance(node.module, Wrapper)
        after = _selection(node.module)
        if after != before:
            problems.append(
                f"{_describe(node.module)} {_where(node.path)} selects {', '.join(before)} "
                f"of the module it wraps, and wrapping a module inside it would make them "
                f"{', '.join(after) or 'none'}: a wrapper keys its own variables by those "
                "paths, fixed when it was built. Match that module as a whole, or inject "
                f"before building the {type(node.module).__name__}."
            )
    raise_collected(subject, problems, ValueError, separator=": ")


def _unmatched(pattern: str, reached: dict[str, str], model: str) -> str:
    listed = _listing(reached)
    shown = ", ".join(listed[:_LISTED]) or "none"
    more = f", and {len(listed) - _LISTED} more" if len(listed) > _LISTED else ""
    hint = ""
    if pattern.startswith("'"):
        last = pattern.strip("'").rstrip("/").rsplit("/", 1)[-1]
        # Every element: an nnx.List (``layers``) is no submodule, but is in paths.
        names = sorted({element for path in reached for element in path.split("/")})
        close = difflib.get_close_matches(last, names, n=3)
        if close:
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
    return (
        f"pattern {pattern} matches none of the {len(reached)} submodules of {model}: "
        f"{shown}{more}.{hint} Pass strict=False to allow a pattern that matches nothing"
    )


def _report(
    model: nnx.Module,
    name: str,
    patterns: Sequence[Any],
    matched: list[list[str]],
    wrapped: dict[str, str],
    built: set[int],
    freeze_original: bool,
) -> InjectReport:
    prefixes = [n.path for n in _modules(model).values() if id(n.module) in built]
    flat = list(nnx.to_flat_state(nnx.state(model)))
    added = tuple(keys for keys, _ in flat if _owned(keys, prefixes))
    sizes = {
        keys: math.prod(jnp.shape(v.get_value())) for keys, v in flat if isinstance(v, nnx.Param)
    }
    own = set(added)
    added_params = sum(size for keys, size in sizes.items() if keys in own)
    original = sum(sizes.values()) - added_params
    return InjectReport(
        wrapper=name,
        matched={
            _display(given): tuple(found) for given, found in zip(patterns, matched, strict=True)
        },
        wrapped=wrapped,
        unwrappable={},
        added=added,
        original_params=original,
        added_params=added_params,
        trainable_params=added_params if freeze_original else original + added_params,
    )
