"""What a wrapper is, independent of Linen or NNX.

A wrapper holds one inner module and delegates some of that module's methods to it. Tools
(the summary engine, users' own code) ask these questions through the functions here rather
than through ``isinstance`` checks, so that wrapper classes from other libraries can join by
registration.

Whether an object is a wrapper is decided without running any of its code: by the registry,
looked up over ``type(obj).__mro__``, or by ``inspect.getattr_static`` finding both protocol
attributes. A ``runtime_checkable`` ``isinstance`` check would call ``getattr`` on the object,
which runs a class's ``__getattr__``; several model libraries define one, and inside the
summary's method interceptor that re-entered the model (a ``RecursionError``). The attributes
are read only once the object is known to be a wrapper.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast, runtime_checkable

from ._problems import raise_collected

_PROTOCOL_ATTRIBUTES = ("inner", "delegated_methods")
_MISSING = object()


@runtime_checkable
class WrapperProtocol(Protocol):
    """The interface of a module that wraps another module.

    Any object whose class (or instance dictionary) defines these two attributes is a
    wrapper; wrapkit's own wrappers implement it directly, and classes that cannot be changed
    join through [`register_wrapper`][wrapkit.register_wrapper]. Use it to annotate types;
    to test an object, call [`is_wrapper`][wrapkit.is_wrapper], which also knows registered
    classes and, unlike ``isinstance(obj, WrapperProtocol)``, never runs the object's
    ``__getattr__``.

    Attributes:
        inner: the wrapped module.
        delegated_methods: names of the inner module's methods that the wrapper delegates,
            e.g. ``("__call__",)`` or ``("encode", "decode")``.
    """

    @property
    def inner(self) -> Any: ...

    @property
    def delegated_methods(self) -> tuple[str, ...]: ...


def check_delegates(delegates: object, owner: str) -> list[str]:
    """Problems with a declared sequence of delegated method names, one sentence each.

    ``delegates`` must be an iterable, not a string, of method names (strings that are
    Python identifiers). ``owner`` is how the sentences name it: a keyword argument's name
    (``"delegates"``), which also spells the fix for a string as ``delegates=('encode',)``,
    or a phrase (``"Pair.delegated_methods"``). ``None`` is a problem too; a caller for
    which ``None`` means a default handles that first. An iterator is consumed: pass a tuple.

    Args:
        delegates: the value to check.
        owner: the name of ``delegates`` in the sentences.

    Returns:
        One sentence per problem, lower-case first word, to follow the caller's own subject
        (``"WeightNorm(Dense_0) "``) or to list; empty when ``delegates`` is fine.

    Examples:
        >>> from wrapkit._protocol import check_delegates
        >>> check_delegates(("encode", "decode"), "delegates")
        []
        >>> print(*check_delegates("encode", "delegates"))
        delegates must be a sequence of method names, got the string 'encode';
        write delegates=('encode',).
        >>> for problem in check_delegates(("encode", 3, "a b"), "delegates"):
        ...     print(problem)
        element 1 of delegates must be a method name (a string), got 3 (int).
        element 2 of delegates must be a method name, got 'a b', which is not a Python identifier.
    """
    expected = f"{owner} must be a sequence of method names"
    if isinstance(delegates, str):
        one = (delegates,)
        fix = f"write {owner}={one!r}" if owner.isidentifier() else f"give {one!r} for one method"
        return [f"{expected}, got the string {delegates!r}; {fix}."]
    if not isinstance(delegates, Iterable):
        example = f"; write e.g. {owner}=('__call__',)" if owner.isidentifier() else ""
        return [f"{expected}, got {delegates!r} ({type(delegates).__name__}){example}."]
    problems = []
    for index, name in enumerate(delegates):
        if not isinstance(name, str):
            problems.append(
                f"element {index} of {owner} must be a method name (a string), got {name!r} "
                f"({type(name).__name__})."
            )
        elif not name.isidentifier():
            problems.append(
                f"element {index} of {owner} must be a method name, got {name!r}, which is "
                "not a Python identifier."
            )
    return problems


def _names(value: object) -> object:
    """``value`` as a tuple when it is a non-string iterable, so that checking it consumes
    no iterator; anything else unchanged, for ``check_delegates`` to describe."""
    if isinstance(value, Iterable) and not isinstance(value, str):
        return tuple(value)
    return value


@dataclasses.dataclass(frozen=True)
class _Registration:
    inner: Callable[[Any], Any]
    delegates: Callable[[Any], tuple[str, ...]]


_REGISTRY: dict[type, _Registration] = {}


if sys.version_info >= (3, 14):
    import annotationlib

    def _annotations(klass: type) -> dict[str, Any]:
        # Annotations are evaluated lazily from 3.14 on; an undefined name must not raise.
        return annotationlib.get_annotations(klass, format=annotationlib.Format.FORWARDREF)

else:

    def _annotations(klass: type) -> dict[str, Any]:
        return inspect.get_annotations(klass)  # the class's own, not evaluated


def _declares(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` can have an attribute ``name``, read from the class only.

    A class attribute or property, a dataclass field, an annotation or a slot anywhere in
    the MRO, or a parameter of the constructor (``self.name = name`` in ``__init__``).
    """
    for klass in cls.__mro__:
        if name in vars(klass) or name in _annotations(klass):
            return True
        slots = vars(klass).get("__slots__", ())
        if name in ((slots,) if isinstance(slots, str) else slots):
            return True
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # builtins and C types without a signature
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(p.name == name and p.kind not in variadic for p in parameters)


def _inner_problems(cls: type | None, inner: object) -> list[str]:
    """Problems with ``register_wrapper``'s ``inner``; an attribute name is looked up only
    when there is a class (``cls`` is ``None`` when that argument was wrong)."""
    if isinstance(inner, str):
        if cls is None or _declares(cls, inner):
            return []
        return [
            f"inner={inner!r}, but {cls.__name__} has no attribute {inner!r} (no class "
            "attribute, property, dataclass field, annotation, slot or constructor parameter "
            "of that name). Name the attribute that holds the inner module, or give a "
            "function: inner=lambda wrapper: ..."
        ]
    if callable(inner):
        return []
    return [
        "inner must be an attribute name (a string) or a function from a wrapper to its inner "
        f"module, got {inner!r} ({type(inner).__name__})."
    ]


def _raise_problems(subject: str, problems: list[str]) -> None:
    raise_collected(subject, problems, TypeError, separator=": ")


def register_wrapper(
    cls: type,
    *,
    inner: Callable[[Any], Any] | str,
    delegates: Callable[[Any], Iterable[str]] | Iterable[str] = ("__call__",),
) -> type:
    """Declares that instances of ``cls`` (and its subclasses) are wrappers.

    Use this for wrapper classes you cannot edit. wrapkit registers flax's
    ``nn.WeightNorm`` and ``nn.SpectralNorm`` this way.

    Args:
        cls: the wrapper class.
        inner: the attribute name holding the inner module (a class attribute or property,
            a dataclass field, an annotation, a slot or a constructor parameter of ``cls``),
            or a function from a wrapper instance to its inner module.
        delegates: the delegated method names (a tuple, not a string), or a function from an
            instance to them; what the function returns is checked each time it is called.

    Returns:
        ``cls`` unchanged, so that this can also be used as a class decorator through
        ``functools.partial``.

    Raises:
        TypeError: listing every problem at once: ``cls`` is not a class, ``inner`` is
            neither a string nor callable or names an attribute ``cls`` does not have,
            ``delegates`` is a string or holds names that are not identifier strings.

    Examples:
        >>> import wrapkit
        >>> class Box:
        ...     def __init__(self, content):
        ...         self.content = content
        >>> _ = wrapkit.register_wrapper(Box, inner="content")
        >>> wrapkit.unwrap(Box(Box("jewel")))
        'jewel'
    """
    if isinstance(cls, type):
        subject = f"register_wrapper({cls.__name__})"
        problems = _inner_problems(cls, inner)
    else:
        subject = f"register_wrapper({cls!r})"
        problems = [
            f"cls must be a class, got {cls!r} ({type(cls).__name__}); pass the wrapper class, "
            "e.g. register_wrapper(type(wrapper), ...)."
        ]
        problems += _inner_problems(None, inner)
    fixed: object = None
    if not callable(delegates):
        fixed = _names(delegates)
        problems += check_delegates(fixed, "delegates")
    _raise_problems(subject, problems)

    get_inner: Callable[[Any], Any]
    if isinstance(inner, str):
        attribute = inner

        def get_inner(wrapper: Any) -> Any:
            return getattr(wrapper, attribute)

    else:
        get_inner = inner
    get_delegates: Callable[[Any], tuple[str, ...]]
    if callable(delegates):
        declared = delegates
        owner = f"the value returned by {cls.__name__}'s registered delegates function"

        def get_delegates(wrapper: Any) -> tuple[str, ...]:
            names = _names(declared(wrapper))
            _raise_problems(
                f"wrapkit.delegated_methods({type(wrapper).__name__})",
                check_delegates(names, owner),
            )
            return cast(tuple[str, ...], names)  # checked just above

    else:
        fixed_names = cast(tuple[str, ...], fixed)  # checked above

        def get_delegates(wrapper: Any) -> tuple[str, ...]:
            return fixed_names

    _REGISTRY[cls] = _Registration(get_inner, get_delegates)
    return cls


def _registration(obj: Any) -> _Registration | None:
    for klass in type(obj).__mro__:
        found = _REGISTRY.get(klass)
        if found is not None:
            return found
    return None


def _implements_protocol(obj: Any) -> bool:
    # getattr_static reads the MRO's and the instance's dictionaries and runs nothing: no
    # __getattr__, no property, no descriptor.
    return all(
        inspect.getattr_static(obj, name, _MISSING) is not _MISSING for name in _PROTOCOL_ATTRIBUTES
    )


def is_wrapper(obj: Any) -> bool:
    """Whether ``obj`` wraps another module (by the protocol or by registration).

    Decided from ``obj``'s class and instance dictionary alone: no attribute hook
    (``__getattr__``, a property) of ``obj`` runs. A class is not a wrapper; its instances
    may be.

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapped = wrapkit.linen.WeightNorm(nn.Dense(4))
        >>> wrapkit.is_wrapper(wrapped), wrapkit.is_wrapper(nn.Dense(4))
        (True, False)
        >>> wrapkit.is_wrapper(wrapkit.linen.WeightNorm)
        False
    """
    if isinstance(obj, type):
        return False
    return _registration(obj) is not None or _implements_protocol(obj)


def _require_instance(obj: Any, what: str) -> None:
    if isinstance(obj, type):
        raise TypeError(
            f"wrapkit.{what}: got the class {obj.__name__}, not an instance. Pass a "
            f"module, e.g. wrapkit.{what}({obj.__name__}(...))."
        )


def _require_wrapper(obj: Any, what: str) -> _Registration | None:
    """``obj``'s registration, ``None`` for a protocol wrapper; raises for anything else."""
    _require_instance(obj, what)
    found = _registration(obj)
    if found is None and not _implements_protocol(obj):
        raise TypeError(
            f"wrapkit.{what}: {type(obj).__name__} is not a wrapper. Wrappers implement "
            "wrapkit.WrapperProtocol (attributes inner and delegated_methods) or are "
            "registered with wrapkit.register_wrapper."
        )
    return found


def inner(wrapper: Any) -> Any:
    """The module that ``wrapper`` wraps, one level down.

    Raises:
        TypeError: ``wrapper`` is not a wrapper, or is a class rather than an instance.

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapkit.inner(nn.WeightNorm(nn.Dense(4))).features
        4
    """
    found = _require_wrapper(wrapper, "inner")
    return found.inner(wrapper) if found is not None else wrapper.inner


def delegated_methods(wrapper: Any) -> tuple[str, ...]:
    """The names of the inner module's methods that ``wrapper`` delegates.

    Raises:
        TypeError: ``wrapper`` is not a wrapper, or is a class rather than an instance, or
            its delegates are not a sequence of method names (a string, say).

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapkit.delegated_methods(nn.SpectralNorm(nn.Dense(4)))
        ('__call__',)
    """
    found = _require_wrapper(wrapper, "delegated_methods")
    if found is not None:
        return found.delegates(wrapper)
    names = _names(wrapper.delegated_methods)
    _raise_problems(
        f"wrapkit.delegated_methods({type(wrapper).__name__})",
        check_delegates(names, f"{type(wrapper).__name__}.delegated_methods"),
    )
    return cast(tuple[str, ...], names)  # checked just above


def chain(module: Any) -> tuple[Any, ...]:
    """``module`` followed by each module it wraps, down to the innermost.

    A module that is not a wrapper gives a one-element tuple.

    Raises:
        TypeError: ``module`` is a class rather than an instance.
        ValueError: the wrappers form a cycle (a wrapper is its own inner module, or
            wraps a module that wraps it back).

    Examples:
        >>> import flax.linen as nn
        >>> from wrapkit import chain
        >>> from wrapkit.linen import SpectralNorm, WeightNorm
        >>> " -> ".join(type(m).__name__ for m in chain(WeightNorm(SpectralNorm(nn.Dense(4)))))
        'WeightNorm -> SpectralNorm -> Dense'
    """
    _require_instance(module, "chain")
    modules = [module]
    seen = {id(module): 0}
    while is_wrapper(modules[-1]):
        below = inner(modules[-1])
        start = seen.get(id(below))
        if start is not None:
            cycle = " -> ".join(type(m).__name__ for m in [*modules[start:], below])
            raise ValueError(
                f"wrapkit.chain: the wrappers form a cycle, {cycle}, so there is no innermost "
                "module. A wrapper's inner module must not be the wrapper itself or wrap it "
                "back; check the inner attribute or function given to register_wrapper."
            )
        seen[id(below)] = len(modules)
        modules.append(below)
    return tuple(modules)


def unwrap(module: Any) -> Any:
    """The innermost module under any number of wrappers (``module`` itself if unwrapped).

    Raises:
        TypeError: ``module`` is a class rather than an instance.
        ValueError: the wrappers form a cycle (see [`chain`][wrapkit.chain]).

    Examples:
        >>> import flax.linen as nn
        >>> from wrapkit import unwrap
        >>> from wrapkit.linen import SpectralNorm, WeightNorm
        >>> unwrap(WeightNorm(SpectralNorm(nn.Dense(4)))).features
        4
    """
    _require_instance(module, "unwrap")
    return chain(module)[-1]
