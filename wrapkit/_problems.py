"""Argument problems, collected and raised once (shared by the protocol and the wrappers)."""

from __future__ import annotations

from collections.abc import Sequence


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
