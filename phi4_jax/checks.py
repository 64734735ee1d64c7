"""Argument checks shared by the package: integers, numbers and token ids, with the caller's error class.

Each check raises the error type its caller documents (ConfigError, GenerationError, ModelInputError, ...) with
a message naming the argument and the value. Imports only NumPy, so every layer may use it.
"""

from __future__ import annotations

import numpy as np


def is_integer(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python or NumPy integer or float (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_integer(value, what: str, error: type[Exception], *, minimum: int = 1) -> int:
    """`value` as an int if it is an integer >= `minimum`, else raises `error` naming `what`."""
    if not is_integer(value) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{what} must be {bound}, got {value!r}")
    return int(value)


def first_out_of_range(ids, limit: int) -> int | None:
    """The first of the integer token ids `ids` (any array-like) outside [0, limit), or None if all fit."""
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= limit)
    return int(ids[bad].flat[0]) if bad.any() else None
