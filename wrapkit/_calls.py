"""What call-recording tools (the summary) need to know from tools that reroute module calls.

``inject`` runs each matched submodule's call through a wrapper instead, from inside an
interceptor. A recorder that intercepts calls too has recorded the original call by then,
so the wrapper would appear between two rows of the same module. Two signals avoid that:

* a class marked with ``transparent`` (``Injected``) is not a call of its own: its row is
  its callees';
* ``diverted(module)``, said by the rerouting interceptor before it calls the wrapper, tells
  each listening recorder that the call it is recording for ``module`` is not the module's
  own work: the wrapper's call (and the module's call inside it) are.

Framework-neutral: modules are any objects.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T", bound=type)
_TRANSPARENT: set[type] = set()
_LISTENERS: contextvars.ContextVar[tuple[Callable[[Any], None], ...]] = contextvars.ContextVar(
    "wrapkit_call_listeners", default=()
)


def transparent(cls: _T) -> _T:
    """Marks ``cls`` (and its subclasses) as a module whose calls are its callees' rows."""
    _TRANSPARENT.add(cls)
    return cls


def is_transparent(cls: type) -> bool:
    return any(issubclass(cls, marked) for marked in _TRANSPARENT)


def diverted(module: Any) -> None:
    """Says that the call of ``module`` now being intercepted runs another module instead."""
    for listener in _LISTENERS.get():
        listener(module)


@contextlib.contextmanager
def listening(listener: Callable[[Any], None]) -> Iterator[None]:
    """Calls ``listener(module)`` for every ``diverted(module)`` said inside the block."""
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(token)
