"""Warnings that point at the user's line, however deep in flax and jax they are raised."""

from __future__ import annotations

import sys
import warnings
from types import FrameType

_LIBRARIES = ("wrapkit", "flax", "jax", "jaxlib", "contextlib", "functools")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with ``stacklevel`` at the first frame outside the libraries."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
