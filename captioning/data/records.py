"""The one record type every dataset reader produces."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
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


def scene_objects(value: object) -> list[dict] | None:
    """``value`` (an image's ``objects`` in an annotation file) where it is the shapes set's ground truth: a
    non-empty list of dicts with string ``shape``, ``color`` and ``size`` and a ``box`` of 4 numbers; otherwise None.

    Why: captions are scored for objects and grounding wherever every record has objects, and a field of that
    name from elsewhere (a detector's output, ``{"name", "bbox", "score"}``) stopped a run's first validation
    with a KeyError, or, empty, scored every caption as naming all of its (no) objects."""

    def is_object(o: object) -> bool:
        if not (isinstance(o, dict) and all(isinstance(o.get(k), str) for k in ("shape", "color", "size"))):
            return False
        box = o.get("box")
        return isinstance(box, list) and len(box) == 4 and all(type(x) in (int, float) for x in box)

    if isinstance(value, list) and value and all(is_object(o) for o in value):
        return value
    return None


def real_paths(paths: Iterable[Path | str]) -> Iterator[str]:
    """Each path with its folder resolved (symlinks, ``..``, a relative path from the working directory) and its
    file name as written: one file reached by two spellings (``data/coco/a.jpg``, its absolute path, a symlinked
    folder) comes out the same. Each folder is resolved once, so a data set of one or two folders costs a few
    system calls, not one per image."""
    folders: dict[str, str] = {}
    for p in paths:
        folder, name = os.path.split(os.fspath(p))
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder or ".")
        yield os.path.join(real, name)
