"""Framework-neutral pieces of a wrapper, shared by the Linen and NNX base classes.

Call options, the checks of delegated method names, and the sentences both bases raise when
a call would run on untransformed weights, so that the same mistake reads the same in Linen
and NNX.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

REQUIRED = inspect.Parameter.empty


def call_options(hook: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of a wrapper's hook, with their defaults (``REQUIRED``
    for none): the keyword arguments every delegated call takes for the wrapper."""
    parameters = inspect.signature(hook).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def read_options(
    subject: str,
    wrapper_class: str,
    base_class: str,
    options: dict[str, Any],
    method: str,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """A wrapper's call options, read (not removed) from the call's keywords.

    In a stack every wrapper reads its own options from the same keywords, so two wrappers
    taking ``update_stats`` both receive it; the call of the wrapped module removes all of
    them. ``subject`` describes the wrapper (``"SpectralNorm(Dense_0)"``), ``base_class``
    names the module at the bottom of its stack.
    """
    found = {}
    for name, default in options.items():
        if name in kwargs:
            found[name] = kwargs[name]
        elif default is REQUIRED:
            raise TypeError(
                f"{subject}.{method}() needs the keyword argument {name!r}: "
                f"{wrapper_class} takes it on every delegated call (it is not "
                f"passed to {base_class})."
            )
        else:
            found[name] = default
    return found


def delegation_problems(
    wrapper_type: type, delegated: Sequence[str], inner_class: str, available: Sequence[str]
) -> list[str]:
    """Problems with a wrapper's delegated methods, given the methods the inner module
    offers (a wrapper offers the methods it delegates, whatever its class defines)."""
    problems = []
    for name in delegated:
        if name != "__call__" and hasattr(wrapper_type, name):
            problems.append(
                f"cannot delegate {name!r}: {wrapper_type.__name__} has an attribute "
                f"of that name itself."
            )
        elif name not in available:
            problems.append(
                f"delegates {name!r}, but {inner_class} has no method "
                f"{name!r}. Delegate one of: {', '.join(available) or '(none)'}."
            )
    return problems


def no_attribute(subject: str, name: str, inner_class: str) -> AttributeError:
    return AttributeError(
        f"{subject} has no attribute {name!r}, and neither has the {inner_class} it wraps."
    )


def not_delegated(
    subject: str,
    wrapper_class: str,
    method: str,
    base_class: str,
    variable: str,
    delegated: Sequence[str],
) -> str:
    """Why a method the wrapper does not delegate may not read ``variable``."""
    return (
        f"{subject} does not delegate {method!r}, and {base_class}.{method} reads {variable}, "
        f"which {wrapper_class} transforms: run on the raw value it would skip the wrapper. "
        f"Build the wrapper with delegates={(*delegated, method)!r}."
    )
