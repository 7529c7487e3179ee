"""Argument problems: checks of common options, collected and raised once.

Shared by the protocol and by the Linen (and NNX) wrappers, so that the same bad value gets
the same sentence everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._numerics import reduction_axes


def raise_collected(
    subject: str, problems: Sequence[str], error: type[Exception], separator: str = " "
) -> None:
    """Raises ``error`` naming ``subject`` and every problem; does nothing without problems.

    One problem reads ``"<subject><separator><problem>"``; several are listed, one a line.

    Examples:
        >>> raise_collected("WeightNorm(Dense)", [], ValueError)
        >>> raise_collected("WeightNorm(Dense)", ["a.", "b."], ValueError)
        Traceback (most recent call last):
        ...
        ValueError: WeightNorm(Dense) has 2 problems:
          - a.
          - b.
    """
    if len(problems) == 1:
        raise error(f"{subject}{separator}{problems[0]}")
    if problems:
        raise error(
            f"{subject} has {len(problems)} problems:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


def epsilon_error(eps: Any) -> str | None:
    """Why ``eps`` is not a valid epsilon (a finite non-negative real number), or ``None``."""
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool | np.bool_):
        if math.isfinite(eps) and float(eps) >= 0:
            return None
        return f"epsilon must be a finite non-negative number, got {eps!r}. The default is 1e-12."
    return (
        f"epsilon must be a finite non-negative number, got {eps!r} "
        f"({type(eps).__name__}). Pass a float, e.g. epsilon=1e-12."
    )


def dtype_error(name: str, value: Any, *, optional: bool) -> str | None:
    """Why ``value`` is not a floating-point or complex dtype (or ``None`` if ``optional``)."""
    if value is None and optional:
        return None
    try:
        dtype = None if value is None else jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
        return None
    expected = "None or a" if optional else "a"
    got = f"the dtype {dtype}" if dtype is not None else repr(value)
    return (
        f"{name} must be {expected} floating-point or complex dtype, got {got}. Pass e.g. "
        f"{name}=jnp.float32 or {name}=jnp.bfloat16."
    )


def is_index(value: Any) -> bool:
    """``value`` is a Python or numpy integer, and not a bool (bool is an int subclass)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_bool(value: Any) -> bool:
    """``value`` is True or False (a Python or numpy bool)."""
    return isinstance(value, bool | np.bool_)


def feature_axes_error(axes: Any, none_means: str) -> str | None:
    """Why ``axes`` is not an int, a tuple of ints or ``None``, or ``None`` if it is.

    ``none_means`` says what ``None`` does for the wrapper ("one norm over all axes").
    """
    if (
        axes is None
        or is_index(axes)
        or (isinstance(axes, Sequence) and all(is_index(axis) for axis in axes))
    ):
        return None
    return (
        f"feature_axes must be an int, a tuple of ints or None, got {axes!r} "
        f"({type(axes).__name__}). Pass e.g. feature_axes=-1 (the last axis, a kernel's "
        f"output features), feature_axes=(0, -1), or None for {none_means}."
    )


def reduction_axes_checked(
    subject: str,
    path: str,
    shape: tuple[int, ...],
    feature_axes: Any,
    *,
    over: str,
    otherwise: str,
    none_gives: str,
    none_fix: str,
) -> tuple[int, ...]:
    """The axes of a variable a wrapper reduces over: all but ``feature_axes``.

    Raises, naming ``subject`` and the variable, when ``feature_axes`` is out of range for
    ``shape``, or leaves no axis to reduce (a scalar; ``feature_axes`` covering every axis),
    where the wrapper would silently do nothing useful: ``over`` says what the wrapper does
    over the axes (``"standardise over"``), ``otherwise`` what would happen instead, and
    ``none_gives`` / ``none_fix`` what ``feature_axes=None`` gives for a variable and for
    this one (``"one grid per variable"``, ``"one grid over it"``).
    """
    ndim = len(shape)
    axes = reduction_axes(ndim, feature_axes)
    if axes is None:
        raise ValueError(
            f"{subject}: feature_axes={feature_axes!r} is out of range for {path!r} of shape "
            f"{shape}. Use axes in [{-ndim}, {ndim - 1}], or feature_axes=None for "
            f"{none_gives}."
        )
    if not axes:
        covered, other_fix = "", ""
        if ndim:
            covered = f" (feature_axes={feature_axes!r} covers all its axes)"
            other_fix = f", or use feature_axes=None for {none_fix}"
        raise ValueError(
            f"{subject}: {path!r} of shape {shape} has no axis to {over}{covered}, "
            f"{otherwise}. Leave it out of variable_filter (e.g. {{'kernel'}}){other_fix}."
        )
    return axes


@jax.tree_util.register_pytree_node_class
class Unreadable:
    """Stands for a variable that a method which is not delegated must not read.

    It is a pytree with no leaves, so it passes through flax's lifting and jax transforms
    untouched; using it as an array raises the error that names the fix.
    """

    def __init__(self, message: str) -> None:
        self.message = message

    def tree_flatten(self) -> tuple[tuple[()], str]:
        return (), self.message

    @classmethod
    def tree_unflatten(cls, message: str, children: Any) -> Unreadable:
        return cls(message)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(self.message)

    # __getitem__: an NNX Variable's value is read as variable[...].
    __jax_array__ = __array__ = __getitem__ = _refuse

    @property
    def shape(self) -> Any:
        return self._refuse()

    @property
    def dtype(self) -> Any:
        return self._refuse()
