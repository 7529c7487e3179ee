"""Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685), both APIs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .._numerics import canonical_axes, dropout
from .._problems import dtype_error, is_bool, is_index


def problems(
    options: Any, initializer_fix: str, *, axes_from_use: bool, deterministic_later: bool
) -> list[str]:
    """Problems with a LoRA's options (``rank``, ``alpha``, ``dropout_rate``,
    ``deterministic``, ``rslora``, ``freeze_base``, ``materialize``, ``a_init``, ``b_init``,
    ``feature_axes``, ``param_dtype``), one sentence each.

    Args:
        options: any object holding the options as attributes.
        initializer_fix: how the framework spells an initializer, for the fix
            (``"nn.initializers.zeros"``).
        axes_from_use: whether ``feature_axes=None`` is allowed, the axes then read from the
            weight's first use (Linen, which makes the factors there); NNX makes them when
            the wrapper is built.
        deterministic_later: whether ``deterministic`` may stay ``None`` with dropout,
            set later (NNX's ``.train()``/``.eval()`` or a call's ``deterministic=``).
    """
    found = []
    if not (is_index(options.rank) and options.rank >= 1):
        found.append(f"rank must be a positive int, got {options.rank!r}. Pass e.g. rank=8.")
    alpha = options.alpha
    if alpha is not None and not ((value := _real(alpha)) is not None and 0 < value < math.inf):
        found.append(
            f"alpha must be a positive number or None (alpha = rank), got {alpha!r}. "
            "Pass e.g. alpha=16."
        )
    rate = options.dropout_rate
    deterministic = options.deterministic
    if (rate_value := _real(rate)) is None or not 0 <= rate_value < 1:
        found.append(
            f"dropout_rate must be a number in [0, 1), got {rate!r}. Pass 0.0 for no "
            "dropout on the adapter path."
        )
    elif rate_value > 0 and not deterministic_later and not is_bool(deterministic):
        found.append(
            f"dropout_rate={rate!r} needs deterministic=True or False (got "
            f"{deterministic!r}): False applies dropout (and needs a 'dropout' "
            "PRNG key), True turns it off for evaluation."
        )
    if deterministic_later and not (deterministic is None or is_bool(deterministic)):
        found.append(
            "deterministic must be True, False or None (then set by .train() and .eval(), "
            f"or per call), got {deterministic!r}."
        )
    for name in ("rslora", "freeze_base", "materialize"):
        if not is_bool(getattr(options, name)):
            found.append(f"{name} must be True or False, got {getattr(options, name)!r}.")
    for name in ("a_init", "b_init"):
        if not callable(getattr(options, name)):
            found.append(
                f"{name} must be an initializer called as {name}(key, shape, dtype), got "
                f"{getattr(options, name)!r}. Pass e.g. {initializer_fix}."
            )
    axes = options.feature_axes
    if not (
        (axes is None and axes_from_use)
        or is_index(axes)
        or (isinstance(axes, Sequence) and axes and all(is_index(axis) for axis in axes))
    ):
        if axes_from_use:
            found.append(
                "feature_axes must be None (inferred), an int or a non-empty tuple of ints, "
                f"got {axes!r}."
            )
        else:
            found.append(
                "feature_axes must be an int or a non-empty tuple of ints (the weight's "
                f"output axes), got {axes!r}: the factors are made when the wrapper is "
                "built, before a use could show the axes. Pass e.g. feature_axes=-1."
            )
    if (error := dtype_error("param_dtype", options.param_dtype, optional=False)) is not None:
        found.append(error)
    return found


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else ``None``."""
    return float(value) if isinstance(value, numbers.Real) and not is_bool(value) else None


def output_axes(
    subject: str, path: str, shape: tuple[int, ...], feature_axes: Any, *, inferable: bool
) -> tuple[int, ...]:
    """``feature_axes`` of a weight of ``shape``, non-negative and sorted; they must leave
    at least one input axis. ``inferable`` adds ``None`` to the fix (Linen)."""
    ndim = len(shape)
    axes = canonical_axes(ndim, feature_axes)
    if axes is None or len(axes) == ndim:
        infer = ", or None to infer" if inferable else ""
        raise ValueError(
            f"{subject}: feature_axes={feature_axes!r} does not leave an input axis of "
            f"{path!r} of shape {shape}. Use output axes in [{-ndim}, {ndim - 1}] that are "
            f"not all of them{infer}."
        )
    return axes


def check_rank(
    subject: str,
    path: str,
    shape: tuple[int, ...],
    rank: int,
    input_axes: tuple[int, ...],
    output_axes: tuple[int, ...],
) -> None:
    """Refuses a rank larger than the weight's input or output size: ``A @ B`` could not
    have that rank, and the extra factor entries would be wasted."""
    fan_in = math.prod(shape[axis] for axis in input_axes)
    fan_out = math.prod(shape[axis] for axis in output_axes)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"{subject}: rank={rank} is larger than {path!r} of shape "
            f"{shape} allows: its input axes {input_axes} hold {fan_in} values and its "
            f"output axes {output_axes} hold {fan_out}. Use rank <= {min(fan_in, fan_out)}."
        )


def factor_shapes(
    shape: tuple[int, ...],
    rank: int,
    input_axes: tuple[int, ...],
    output_axes: tuple[int, ...],
    shared_axes: tuple[int, ...] = (),
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``A`` and ``B`` for a weight of ``shape``: ``(*shared, *input, rank)``
    and ``(*shared, rank, *output)``, as ``_unmerged.LowRank`` takes them."""
    shared = tuple(shape[axis] for axis in shared_axes)
    a_shape = (*shared, *(shape[axis] for axis in input_axes), rank)
    b_shape = (*shared, rank, *(shape[axis] for axis in output_axes))
    return a_shape, b_shape


def dropout_input(rate: float, key: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The ``input_fn`` of a ``LowRank``: dropout of the adapter's input with ``key``."""

    def input_fn(x: jax.Array) -> jax.Array:
        return dropout(x, rate, key)

    return input_fn
