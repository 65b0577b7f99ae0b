"""The one record type every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaptionRecord:
    """One image with its reference captions.

    ``captions`` are raw strings; ``tokens`` the same captions tokenised (by the dataset or by
    :func:`captioning.vocab.tokenize`). ``objects`` holds the ground-truth objects where the
    dataset has them (the synthetic shapes set): dicts with ``shape``, ``color``, ``size`` and
    ``box`` = [x0, y0, x1, y1] in image pixels.
    """

    image_path: Path
    captions: list[str]
    tokens: list[list[str]]
    image_id: str
    split: str
    objects: list[dict] | None = field(default=None)
