"""Range checks of typed options, shared by the model (``model.*``) and the data module (``data.*``)."""

from __future__ import annotations

from typing import Any

from captioning.errors import InputError


def check_ranges(section: str, **options: tuple[Any, bool, str]) -> None:
    """Raise one ValueError naming every ``<section>.<name>`` whose value is out of range: each option is
    (value, in range, the range in words)."""
    bad = [f"{section}.{name} must be {rule}, got {value!r}" for name, (value, ok, rule) in options.items() if not ok]
    if bad:
        raise InputError("; ".join(bad))
