"""Framework-neutral pieces of a wrapper, shared by the Linen and NNX base classes.

Call options, the checks of delegated method names, and the sentences both bases raise when
a call would run on untransformed weights, so that the same mistake reads the same in Linen
and NNX.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


# -- wrap_pretrained's check ----------------------------------------------------------------


def _tolerance(dtype: Any) -> float:
    """How far a weight may be off, relative to its largest magnitude: float32's fold
    tolerance, or two roundings of a lower-precision dtype."""
    return max(1e-5, 2 * float(jnp.finfo(dtype).eps))


def _deviation(got: Any, expected: Any) -> tuple[float, float]:
    """The largest difference relative to the largest magnitude, and the norm ratio."""
    expected = np.asarray(expected)
    expected = expected.astype(np.result_type(expected.dtype, np.float64))
    got = np.asarray(got, expected.dtype)
    tiny = float(np.finfo(np.float64).tiny)
    largest = max(float(np.abs(expected).max(initial=0.0)), tiny)
    off = float(np.abs(got - expected).max(initial=0.0)) / largest
    return off, float(np.linalg.norm(got)) / max(float(np.linalg.norm(expected)), tiny)


def pretrained_mismatch(
    name: str, wrappers: str, got: Any, expected: Any, caveats: Sequence[str]
) -> str | None:
    """Why the wrapped model would not see the pretrained weight ``expected`` (it sees
    ``got`` through ``wrappers``), or ``None`` when it sees it to rounding."""
    if not jnp.issubdtype(jnp.result_type(expected), jnp.inexact):
        return None
    off, ratio = _deviation(got, expected)
    if off <= _tolerance(jnp.result_type(expected)):
        return None
    why = "".join(f" {caveat}" for caveat in caveats)
    return (
        f"{name} (through {wrappers}) would be off by up to {off:.3g} of its "
        f"largest magnitude (norm ratio {ratio:.4g}).{why}"
    )


def raise_not_reproduced(subject: str, problems: Sequence[str]) -> None:
    """wrap_pretrained's error for weights ``exact=True`` would change; nothing if none."""
    if problems:
        count = "it" if len(problems) == 1 else f"{len(problems)} of them"
        raise ValueError(
            f"{subject}: with exact=True the wrapped model must see every pretrained weight "
            f"unchanged, but {count} would change:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\nPass exact=False to accept what the wrappers make of these weights (the "
            "outputs then change), or leave them out of the wrappers' variable_filter."
        )


# -- init_from_data's checks ----------------------------------------------------------------


def transformed_after_weight_norm(where: str, outer: str, outer_class: str, path: str) -> str:
    """init_from_data's sentence for a wrapper outside WeightNorm on the same weight."""
    return (
        f"{where}: {outer} transforms {path} after WeightNorm, so the scale no longer sets "
        f"the output's scale. Put WeightNorm outermost: WeightNorm({outer_class}(...))."
    )


def init_output_problem(where: str, out: Any) -> str | None:
    """Why a WeightNorm'd layer's output cannot be initialised from, or ``None``."""
    if isinstance(out, jax.Array) and out.ndim >= 1 and jnp.issubdtype(out.dtype, jnp.floating):
        return None
    return (
        f"{where}: the data-dependent init needs the layer's output as one real "
        f"floating-point array with the features last, got {type(out).__name__}."
    )
