"""Range checks of typed options, shared by the model (``model.*``) and the data module (``data.*``)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from captioning.errors import InputError


def check_ranges(section: str, **options: tuple[Any, bool, str]) -> None:
    """Raise one ValueError naming every ``<section>.<name>`` whose value is out of range: each option is
    (value, in range, the range in words)."""
    bad = [f"{section}.{name} must be {rule}, got {value!r}" for name, (value, ok, rule) in options.items() if not ok]
    if bad:
        raise InputError("; ".join(bad))


#: What a length penalty (GNMT's alpha) may be: any finite real number; the search ranks in logs where
#: ((5 + len) / 6) ** alpha leaves a float's range (see decoding._length_normalised)
LENGTH_PENALTY_RANGE = "a finite number"


def length_penalty_ok(alpha: float) -> bool:
    """Whether ``alpha`` is a length penalty the search can apply: a finite real number (a NaN made every final score
    NaN, and the order arbitrary), not a bool or a string."""
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        return False
    try:
        return math.isfinite(alpha)
    except OverflowError:  # an int past a float's range (10 ** 400)
        return False
