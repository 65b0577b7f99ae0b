"""Bad data never stops training: records are checked once at set-up and bad ones left out, counted.

- Images: a missing, zero-byte, non-image, truncated or oversized file is left out and counted
  by reason (:func:`captioning.data.images.check_image`, run over a thread pool: JPEG and PNG by
  their headers and end markers, other formats by a full decode). Above ``max_bad_fraction`` of
  bad images the run stops: that many bad files means a wrong path or a broken download, not a
  few odd images.
- Captions: empty or punctuation-only captions are dropped and counted; an image left with no
  caption is left out.
- Ids: a second record with an image id already seen in its split is left out and counted.
- The same image file in two splits is an error (a test image seen in training would inflate
  every metric).
- Records in no split (Flickr8k names absent from every split file) are counted.

The counts are printed once, after set-up, by :meth:`DataReport.summary`.
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from captioning.data.images import MAX_PIXELS, check_image
from captioning.data.records import CaptionRecord, real_paths
from captioning.errors import InputError

SPLITS = ("train", "val", "test")
_WORD = re.compile(r"\w")


@dataclass
class DataReport:
    """What set-up kept and what it left out, and why."""

    images: dict[str, int] = field(default_factory=dict)  # split -> images kept
    captions: dict[str, int] = field(default_factory=dict)  # split -> captions kept
    bad_images: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few paths
    empty_captions: int = 0
    images_without_captions: int = 0
    duplicate_ids: int = 0
    duplicate_files: int = 0
    unassigned: int = 0
    total_images: int = 0

    @property
    def bad_fraction(self) -> float:
        return sum(self.bad_images.values()) / max(self.total_images, 1)

    def summary(self, source: str | Path) -> str:
        kept = ", ".join(f"{s} {self.images.get(s, 0)} images / {self.captions.get(s, 0)} captions" for s in SPLITS)
        lines = [f"data {source}: {kept}"]
        bad = sum(self.bad_images.values())
        if bad:
            reasons = ", ".join(f"{r} {n}" for r, n in self.bad_images.most_common())
            lines.append(f"  skipped {bad} bad images of {self.total_images} ({reasons})")
            for reason, paths in self.examples.items():
                more = " ..." if self.bad_images[reason] > len(paths) else ""
                lines.append(f"    {reason}: {', '.join(paths)}{more}")
        for count, what in (
            (self.empty_captions, "empty or punctuation-only captions dropped"),
            (self.images_without_captions, "images without a usable caption skipped"),
            (self.duplicate_ids, "records with a duplicate image id skipped"),
            (self.duplicate_files, "records of an image file already in their split skipped"),
            (self.unassigned, "images in no split ignored"),
        ):
            if count:
                lines.append(f"  {count} {what}")
        if len(lines) == 1:
            lines.append("  no bad images or captions found")
        return "\n".join(lines)

    def empty_splits(self) -> list[str]:
        """A line for each empty split, for the set-up print (not for errors, where every split of a wrong
        image_root is empty): Lightning's own word would come after the first epoch, as a missing monitored
        key. An empty train split gets here only where a vocabulary is given; otherwise it is an error."""
        lines = []
        if not self.images.get("train", 0):
            lines.append("  the 'train' split is empty: a model can be scored on this data, not trained on it")
        if not self.images.get("val", 0):
            lines.append("  the 'val' split is empty: no validation runs, so no best.ckpt is written (last.ckpt is)")
        if not self.images.get("test", 0):
            lines.append("  the 'test' split is empty: there is nothing to test")
        return lines


def clean_records(
    records: list[CaptionRecord],
    source: str | Path,
    check_images: bool = True,
    max_pixels: int = MAX_PIXELS,
    max_bad_fraction: float = 0.01,
    workers: int | None = None,
    require_train: bool = True,
) -> tuple[dict[str, list[CaptionRecord]], DataReport]:
    """Split ``records`` by split, leaving bad data out (see the module docstring).

    ``require_train``: an empty training split is an error (see :func:`check_train_split`); False where the
    training split is not needed (scoring a model, with its own vocabulary, on another data set's test split).

    ``workers`` threads scan the images (default: the thread pool's, min(32, CPUs + 4)).
    Raises ValueError, naming ``source``, for an image in two splits, an empty training split (with
    ``require_train``) or too many bad images.
    """
    report = DataReport()
    # keyed by the file, not by its path as written: imgs/a.jpg, imgs/sub/../a.jpg and its absolute path are one
    # image, which the test split must not share with the training split
    split_of: dict[str, tuple[str, Path]] = {}  # file -> (split, path as first written)
    ids: dict[str, set[str]] = {}
    files: dict[str, set[str]] = {}  # split -> image files kept: one listed twice (under two ids) counted twice
    candidates: list[CaptionRecord] = []
    for r, file in zip(records, real_paths(r.image_path for r in records)):
        if r.split not in SPLITS:
            report.unassigned += 1
            continue
        other, path = split_of.setdefault(file, (r.split, r.image_path))
        if other != r.split:
            also = f" (as {path})" if path != r.image_path else ""
            raise InputError(f"{source}: image {r.image_path} is in both the '{other}'{also} and the '{r.split}' split")
        seen = ids.setdefault(r.split, set())
        if r.image_id in seen:
            report.duplicate_ids += 1
            continue
        kept_files = files.setdefault(r.split, set())
        if file in kept_files:
            report.duplicate_files += 1
            continue
        # a word in the tokens and in the raw text, which scoring reads: a Karpathy entry with given tokens and an
        # empty (or "...") raw was kept, and scored against as a reference
        usable = [
            i
            for i, t in enumerate(r.tokens)
            if any(_WORD.search(w) for w in t) and any(ch.isalnum() for ch in r.captions[i])
        ]
        report.empty_captions += len(r.tokens) - len(usable)
        if not usable:
            report.images_without_captions += 1
            continue  # before taking the id: a later record of the image with captions is not a duplicate
        seen.add(r.image_id)
        kept_files.add(file)
        if len(usable) < len(r.tokens):
            r = replace(r, captions=[r.captions[i] for i in usable], tokens=[r.tokens[i] for i in usable])
        candidates.append(r)
    report.total_images = len(candidates)

    reasons: list[str | None] = [None] * len(candidates)
    if check_images and candidates:
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=workers) as pool:
            scan = pool.map(lambda r: check_image(r.image_path, max_pixels), candidates, chunksize=64)
            bar = tqdm(scan, total=len(candidates), desc="checking images", unit="img", disable=len(candidates) < 5000)
            reasons = list(bar)
    split: dict[str, list[CaptionRecord]] = {s: [] for s in SPLITS}
    for r, reason in zip(candidates, reasons):
        if reason is None:
            split[r.split].append(r)
            continue
        report.bad_images[reason] += 1
        examples = report.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(str(r.image_path))
    for s in SPLITS:
        report.images[s] = len(split[s])
        report.captions[s] = sum(len(r.tokens) for r in split[s])
    if report.bad_fraction > max_bad_fraction:
        raise InputError(
            f"{source}: {sum(report.bad_images.values())} of {report.total_images} images are bad "
            f"({report.bad_fraction:.1%} > data.max_bad_fraction {max_bad_fraction:.1%}); is data.image_root right?\n"
            + report.summary(source)
        )
    if require_train:
        check_train_split(split, report, source)
    return split, report


def check_train_split(split: dict[str, list[CaptionRecord]], report: DataReport, source: str | Path) -> None:
    """Raise ValueError, naming ``source`` and with the data summary, when the training split is empty."""
    if not split["train"]:
        raise InputError(f"{source}: no usable images in the 'train' split\n" + report.summary(source))
