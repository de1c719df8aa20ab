"""What every entry point accepts as an integer or a number, and the one-line error when it gets something else.

``bool`` is an ``int`` to Python, but ``batch_size=True`` is a mistake, never a
batch of one, so neither test accepts it.
"""

from __future__ import annotations

import math
import numbers

from .errors import ParameterError


def is_integer(value) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number that is not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer_range(low: int, high: int | None = None) -> str:
    """How a message names the integers in [low, high] (no upper end when ``high`` is None)."""
    return f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"


def check_integer(value, name: str, low: int, high: int | None = None, *, error: type[Exception] = ParameterError,
                  example: str = ""):
    """``value`` if it is an integer in [low, high]; else ``error`` saying what would work."""
    if not is_integer(value) or value < low or (high is not None and value > high):
        raise error(f"{name} must be {integer_range(low, high)}{example}, got {value!r}")
    return value
