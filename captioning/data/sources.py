"""Readers that turn dataset files into :class:`CaptionRecord` lists.

Karpathy JSON is the format of the standard COCO / Flickr8k / Flickr30k splits
(``dataset_coco.json`` ...): ``images[]`` with ``filepath``, ``filename``, ``split``, ``imgid``
and ``sentences[]`` holding ``raw`` and ``tokens``. The built-in shapes set is written in the
same format (plus an ``objects`` list), so this one reader serves all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioning.data.records import CaptionRecord
from captioning.vocab import tokenize


def read_karpathy_json(
    path: str | Path, image_root: str | Path | None = None, restval_to_train: bool = True
) -> list[CaptionRecord]:
    """Read a Karpathy-format JSON; images are resolved as ``image_root/filepath/filename``.

    ``image_root`` defaults to the JSON's folder. With ``restval_to_train`` the COCO ``restval``
    split is merged into ``train`` (the usual Karpathy protocol).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Karpathy JSON not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: not a Karpathy-format file (no 'images' list)")
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for i, img in enumerate(data["images"]):
        try:
            filename = img["filename"]
            sentences = img["sentences"]
        except KeyError as e:
            raise ValueError(f"{path}: images[{i}] has no {e.args[0]!r}") from e
        split = img.get("split", "train")
        if split == "restval" and restval_to_train:
            split = "train"
        raws = [s.get("raw", " ".join(s.get("tokens", []))) for s in sentences]
        toks = [[t.lower() for t in s["tokens"]] if s.get("tokens") else tokenize(r) for s, r in zip(sentences, raws)]
        records.append(
            CaptionRecord(
                image_path=root / img.get("filepath", "") / filename,
                captions=raws,
                tokens=toks,
                image_id=str(img.get("cocoid", img.get("imgid", i))),
                split=split,
                objects=img.get("objects"),
            )
        )
    return records
