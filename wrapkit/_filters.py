"""Variable filters: which of the inner module's variables a wrapper transforms.

A variable is named by its path inside the wrapped module, prefixed by that module's name,
e.g. ``"Dense_1/kernel"`` or ``"Bar_0/Baz_1/Dense_0/bias"``. A filter entry selects it when

* a string without ``/`` equals one path element (``"kernel"``), or is a bare module name
  whose auto-numbered instances it then matches (``"Baz"`` selects ``Baz_0`` and ``Baz_1``),
  or is a glob matched against one element (``"Dense_*"``);
* a string with ``/`` matches a run of consecutive elements, each by the rule above
  (``"Baz_0/Dense_0"``, ``"Dense_*/kernel"``);
* a callable returns true for ``(path, value)``.

Flax matches a filter string as a substring of the path, so ``"d1"`` also selects ``d10``;
matching whole elements is wrapkit's deliberate deviation.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

FilterEntry: TypeAlias = str | Callable[[str, Any], bool]
VariableFilter: TypeAlias = FilterEntry | Iterable[FilterEntry] | None
"""A filter: one entry, an iterable of entries, or ``None`` for every variable."""

_GLOB_CHARS = frozenset("*?[")
_MODULE_INSTANCE = re.compile(r"_\d+")


def _element_matcher(pattern: str) -> Callable[[str], bool]:
    if _GLOB_CHARS & set(pattern):
        return lambda element: fnmatch.fnmatchcase(element, pattern)
    instance = re.compile(re.escape(pattern) + _MODULE_INSTANCE.pattern)
    return lambda element: element == pattern or instance.fullmatch(element) is not None


def _string_matcher(entry: str) -> Callable[[str, Any], bool]:
    parts = [_element_matcher(part) for part in entry.split("/")]
    width = len(parts)

    def matches(path: str, value: Any) -> bool:
        elements = path.split("/")
        return any(
            all(part(element) for part, element in zip(parts, elements[start:], strict=False))
            for start in range(len(elements) - width + 1)
        )

    return matches


def entries(variable_filter: VariableFilter) -> tuple[FilterEntry, ...]:
    """The filter's entries as a tuple; empty means every variable (flax's convention)."""
    if variable_filter is None:
        return ()
    if isinstance(variable_filter, str) or callable(variable_filter):
        return (variable_filter,)
    return tuple(variable_filter)


def check(variable_filter: VariableFilter) -> list[str]:
    """Problems with a filter's entries, as sentences; empty when the filter is valid."""
    try:
        items = entries(variable_filter)
    except TypeError:
        return [
            f"variable_filter must be a string, a callable, an iterable of those, or None; "
            f"got {variable_filter!r}."
        ]
    return [
        f"variable_filter entry {item!r} is neither a string nor a callable (path, value) -> bool."
        for item in items
        if not (isinstance(item, str) or callable(item))
    ] + [
        f"variable_filter entry {item!r} has an empty path element."
        for item in items
        if isinstance(item, str) and "" in item.split("/")
    ]


def compile_filter(variable_filter: VariableFilter) -> Callable[[str, Any, bool], bool]:
    """A predicate ``(path, value, owned) -> bool`` for the filter (module docstring).

    ``owned`` says the variable is another wrapper's own (a scale or statistic named
    ``"<module>/<path>/scale"``): string entries and ``None`` never select those, so a
    wrapper around a block that contains a wrapper leaves that wrapper's variables alone.
    A callable entry sees them, and decides.
    """
    items = entries(variable_filter)
    if not items:
        return lambda path, value, owned: not owned
    strings = [_string_matcher(item) for item in items if isinstance(item, str)]
    callables = [item for item in items if not isinstance(item, str)]

    def select(path: str, value: Any, owned: bool) -> bool:
        return any(match(path, value) for match in callables) or (
            not owned and any(match(path, value) for match in strings)
        )

    return select


def describe(variable_filter: VariableFilter) -> str:
    """The filter as users wrote it, sorted when it is a set, for error messages."""
    items = entries(variable_filter)
    if isinstance(variable_filter, set | frozenset):
        items = tuple(sorted(items, key=repr))
    return "{" + ", ".join(getattr(item, "__name__", repr(item)) for item in items) + "}"
