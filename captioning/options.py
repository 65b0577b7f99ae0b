"""Range checks of typed options, shared by the model (``model.*``) and the data module (``data.*``)."""

from __future__ import annotations

import numbers
from typing import Any

from captioning.errors import InputError


def check_ranges(section: str, **options: tuple[Any, bool, str]) -> None:
    """Raise one ValueError naming every ``<section>.<name>`` whose value is out of range: each option is
    (value, in range, the range in words)."""
    bad = [f"{section}.{name} must be {rule}, got {value!r}" for name, (value, ok, rule) in options.items() if not ok]
    if bad:
        raise InputError("; ".join(bad))


#: The largest |length_penalty|: GNMT's ((5 + len) / 6) ** alpha overflows a float once alpha * ln((5 + len) / 6)
#: passes ~709 (alpha 1e308 raised OverflowError at the end of the search, -2000 ZeroDivisionError); 100 keeps it
#: finite and above 0 for captions of up to 7,000 words (beam_search checks it with its max_len). GNMT's own values
#: are 0.6-1.
MAX_LENGTH_PENALTY = 100.0
LENGTH_PENALTY_RANGE = f"a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}]"


def length_penalty_ok(alpha: float) -> bool:
    """Whether ``alpha`` is a length penalty the search can apply (see :data:`MAX_LENGTH_PENALTY`): a real number,
    not NaN (the beam search also checks it against its max_len)."""
    return isinstance(alpha, numbers.Real) and abs(alpha) <= MAX_LENGTH_PENALTY
