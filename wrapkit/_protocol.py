"""What a wrapper is, independent of Linen or NNX.

A wrapper holds one inner module and delegates some of that module's methods to it. Tools
(the summary engine, users' own code) ask these questions through the functions here rather
than through ``isinstance`` checks, so that wrapper classes from other libraries can join by
registration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class WrapperProtocol(Protocol):
    """The interface of a module that wraps another module.

    Any object with these two attributes is a wrapper; wrapkit's own wrappers implement it
    directly, and classes that cannot be changed join through
    [`register_wrapper`][wrapkit.register_wrapper].

    Attributes:
        inner: the wrapped module.
        delegated_methods: names of the inner module's methods that the wrapper delegates,
            e.g. ``("__call__",)`` or ``("encode", "decode")``.
    """

    @property
    def inner(self) -> Any: ...

    @property
    def delegated_methods(self) -> tuple[str, ...]: ...


@dataclasses.dataclass(frozen=True)
class _Registration:
    inner: Callable[[Any], Any]
    delegates: Callable[[Any], tuple[str, ...]]


_REGISTRY: dict[type, _Registration] = {}


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
        inner: the attribute name holding the inner module, or a function from a wrapper
            instance to its inner module.
        delegates: the delegated method names, or a function from an instance to them.

    Returns:
        ``cls`` unchanged, so that this can also be used as a class decorator through
        ``functools.partial``.

    Raises:
        TypeError: ``cls`` is not a class, or ``inner`` is neither a string nor callable.

    Examples:
        >>> import wrapkit
        >>> class Box:
        ...     def __init__(self, content):
        ...         self.content = content
        >>> _ = wrapkit.register_wrapper(Box, inner="content")
        >>> wrapkit.unwrap(Box(Box("jewel")))
        'jewel'
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_wrapper expects a class, got {cls!r}.")
    get_inner: Callable[[Any], Any]
    if isinstance(inner, str):
        attribute = inner

        def get_inner(wrapper: Any) -> Any:
            return getattr(wrapper, attribute)

    elif callable(inner):
        get_inner = inner
    else:
        raise TypeError(
            f"register_wrapper({cls.__name__}): inner must be an attribute name or a "
            f"function from a wrapper to its inner module, got {inner!r}."
        )
    if callable(delegates):
        declared = delegates

        def get_delegates(wrapper: Any) -> tuple[str, ...]:
            return tuple(declared(wrapper))

    else:
        fixed = tuple(delegates)

        def get_delegates(wrapper: Any) -> tuple[str, ...]:
            return fixed

    _REGISTRY[cls] = _Registration(get_inner, get_delegates)
    return cls


def _registration(obj: Any) -> _Registration | None:
    for klass in type(obj).__mro__:
        found = _REGISTRY.get(klass)
        if found is not None:
            return found
    return None


def is_wrapper(obj: Any) -> bool:
    """Whether ``obj`` wraps another module (by the protocol or by registration).

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapped = wrapkit.linen.WeightNorm(nn.Dense(4))
        >>> wrapkit.is_wrapper(wrapped), wrapkit.is_wrapper(nn.Dense(4))
        (True, False)
    """
    return _registration(obj) is not None or isinstance(obj, WrapperProtocol)


def _require_wrapper(obj: Any, what: str) -> None:
    if not is_wrapper(obj):
        raise TypeError(
            f"wrapkit.{what}: {type(obj).__name__} is not a wrapper. Wrappers implement "
            "wrapkit.WrapperProtocol (attributes inner and delegated_methods) or are "
            "registered with wrapkit.register_wrapper."
        )


def inner(wrapper: Any) -> Any:
    """The module that ``wrapper`` wraps, one level down.

    Raises:
        TypeError: ``wrapper`` is not a wrapper.

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapkit.inner(nn.WeightNorm(nn.Dense(4))).features
        4
    """
    _require_wrapper(wrapper, "inner")
    found = _registration(wrapper)
    return found.inner(wrapper) if found is not None else wrapper.inner


def delegated_methods(wrapper: Any) -> tuple[str, ...]:
    """The names of the inner module's methods that ``wrapper`` delegates.

    Raises:
        TypeError: ``wrapper`` is not a wrapper.

    Examples:
        >>> import flax.linen as nn, wrapkit
        >>> wrapkit.delegated_methods(nn.SpectralNorm(nn.Dense(4)))
        ('__call__',)
    """
    _require_wrapper(wrapper, "delegated_methods")
    found = _registration(wrapper)
    return found.delegates(wrapper) if found is not None else tuple(wrapper.delegated_methods)


def chain(module: Any) -> tuple[Any, ...]:
    """``module`` followed by each module it wraps, down to the innermost.

    A module that is not a wrapper gives a one-element tuple.

    Examples:
        >>> import flax.linen as nn
        >>> from wrapkit import chain
        >>> from wrapkit.linen import SpectralNorm, WeightNorm
        >>> " -> ".join(type(m).__name__ for m in chain(WeightNorm(SpectralNorm(nn.Dense(4)))))
        'WeightNorm -> SpectralNorm -> Dense'
    """
    modules = [module]
    while is_wrapper(modules[-1]):
        modules.append(inner(modules[-1]))
    return tuple(modules)


def unwrap(module: Any) -> Any:
    """The innermost module under any number of wrappers (``module`` itself if unwrapped).

    Examples:
        >>> import flax.linen as nn
        >>> from wrapkit import unwrap
        >>> from wrapkit.linen import SpectralNorm, WeightNorm
        >>> unwrap(WeightNorm(SpectralNorm(nn.Dense(4)))).features
        4
    """
    return chain(module)[-1]
