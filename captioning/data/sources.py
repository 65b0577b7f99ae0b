"""Readers that turn dataset files into :class:`CaptionRecord` lists.

Three formats, one record type (:func:`read_records` picks the reader by name):

- ``karpathy`` (:func:`read_karpathy_json`): the standard COCO / Flickr8k / Flickr30k splits
  (``dataset_coco.json`` ...): ``images[]`` with ``filepath``, ``filename``, ``split``, ``imgid``
  and ``sentences[]`` holding ``raw`` and ``tokens``. The built-in shapes set is written in the
  same format (plus an ``objects`` list).
- ``flickr8k`` (:func:`read_flickr8k`): Flickr8k's native files, ``Flickr8k.token.txt``
  (``name.jpg#i<TAB>caption`` per line) and ``Flickr_8k.{train,dev,test}Images.txt``; images
  named in no split file get the split ``"unassigned"``.
- ``captions`` (:func:`read_captions_file`): a plain folder of images plus a ``.jsonl``
  (``{"image": ..., "captions": [...], "split": ...}`` per line) or ``.csv`` (``image``,
  ``caption``, optional ``split`` columns) file; without splits, images are split by ratio with a
  fixed seed, each by a hash of its name (adding images never moves others between splits).

Readers are deliberately dumb: they neither check that image files exist nor drop empty
captions (the data module's validation counts those), but a malformed file raises
``FileNotFoundError`` / ``ValueError`` whose message starts with ``path:line:`` (a Karpathy JSON:
``path: images[i] (filename):``) and says what is wrong. Every file is read as UTF-8 (a leading
byte-order mark, as Windows editors write, is skipped); a file in another encoding is such a
``ValueError`` naming the line of the first byte that is not UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from captioning.data.records import CaptionRecord, scene_objects
from captioning.errors import InputError, InputFileNotFoundError
from captioning.vocab import END, PAD, START, tokenize

CONTROL = (PAD, START, END)  # never a word of a caption

#: The split names of Karpathy's files; restval (COCO's images beyond the 5,000 val and test) joins train
#: unless ``restval_to_train`` is false, and is then left out
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def read_karpathy_json(
    path: str | Path, image_root: str | Path | None = None, restval_to_train: bool = True
) -> list[CaptionRecord]:
    """Read a Karpathy-format JSON; images are resolved as ``image_root/filepath/filename``.

    ``image_root`` defaults to the JSON's folder. With ``restval_to_train`` the COCO ``restval``
    split is merged into ``train`` (the usual Karpathy protocol).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: Karpathy JSON not found")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "images" not in data:
        raise InputError(f"{path}: not a Karpathy-format file (no 'images' list)")
    if not isinstance(data["images"], list):
        raise InputError(f"{path}: 'images' must be a list of image entries, got {_kind(data['images'])}")
    first = data["images"][0] if data["images"] else None
    if "annotations" in data and isinstance(first, dict) and "sentences" not in first:
        # COCO's own captions_*.json also has an 'images' list, so without this its first entry would only be
        # said to lack 'filename' (it has 'file_name'), which reads as a typo to fix rather than the wrong file
        raise InputError(
            f"{path}: a COCO annotation file ('images' and 'annotations', such as captions_train2014.json), not a "
            "Karpathy-format file: use dataset_coco.json from Karpathy's caption_datasets.zip (see data/README.md)"
        )
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict):
            raise InputError(f"{where} must be an object with 'filename' and 'sentences', got {_kind(img)}")
        for key in ("filename", "sentences"):
            if key not in img:
                raise InputError(f"{where} has no {key!r}")
        filename = img["filename"]
        if not isinstance(filename, str) or not filename:
            raise InputError(f"{where}: 'filename' must be a non-empty string, got {_kind(filename)}")
        where = f"{where} ({filename})"
        for key in ("filepath", "split"):
            if not isinstance(img.get(key, ""), str):
                raise InputError(f"{where}: {key!r} must be a string, got {_kind(img[key])}")
        split = img.get("split", "train")
        if split not in KARPATHY_SPLITS:  # it was left out with the "in no split" count, unseen
            raise InputError(f"{where}: unknown split {split!r}, expected one of {', '.join(KARPATHY_SPLITS)}")
        if split == "restval" and restval_to_train:
            split = "train"
        raws, toks = _karpathy_sentences(where, img["sentences"])
        records.append(
            CaptionRecord(
                image_path=root / img.get("filepath", "") / filename,
                captions=raws,
                tokens=toks,
                image_id=_image_id(where, img, i),
                split=split,
                objects=scene_objects(img.get("objects")),  # the shapes set's, not a foreign field
            )
        )
    return records


def _image_id(where: str, img: dict, index: int) -> str:
    """An image's id: its ``cocoid``, else its ``imgid``, else its index in the file; a null id counts as absent
    (as ``str(None)`` it gave every such image the one id "None", and all but the first were dropped as
    duplicates). Refused, naming the entry, where it is neither an integer (an integral float is one) nor a
    non-empty string."""
    key = next((k for k in ("cocoid", "imgid") if img.get(k) is not None), None)
    if key is None:
        return str(index)
    value = img[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise InputError(f"{where}: {key!r} must be an integer or a non-empty string, got {_kind(value)}")
    return str(value)


def _read_text(path: Path) -> str:
    """The text of ``path`` decoded as UTF-8 without a leading byte-order mark, or ``ValueError`` naming
    the file, the line and the byte that is not UTF-8.

    Read whole, not line by line: a stream's decoding error points into a buffered chunk, not at the
    line to fix. The encoding is always UTF-8, never the locale's, so a file reads the same everywhere;
    the mark is dropped because it would otherwise become part of the first image name (that image
    then in no split) or of the first JSON value.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + len(data) - len(e.object)  # e.start counts from after a byte-order mark
        line = data.count(b"\n", 0, at) + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); save the file as UTF-8"
        ) from None


def _kind(value: Any) -> str:
    """A JSON value's type and a glimpse of it, for error messages: ``str 'a dog'``."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _karpathy_sentences(where: str, sentences: Any) -> tuple[list[str], list[list[str]]]:
    """(raw captions, lower-cased tokens) of one image's ``sentences``; a sentence needs ``raw`` or
    ``tokens`` (the one missing is made from the other), ``tokens`` a list of strings.

    A string ``tokens`` is refused rather than guessed at: split on spaces it would keep punctuation
    on words ("dog."), read as a sentence it would be tokenised again, and nothing says which it is.
    """
    if not isinstance(sentences, list):
        raise InputError(f"{where}: 'sentences' must be a list, got {_kind(sentences)}")
    raws, toks = [], []
    for j, s in enumerate(sentences):
        here = f"{where}: sentences[{j}]"
        if not isinstance(s, dict):
            raise InputError(f"{here} must be an object with 'raw' and/or 'tokens', got {_kind(s)}")
        if "raw" not in s and "tokens" not in s:
            raise InputError(f"{here} has neither 'raw' nor 'tokens'")
        raw, tokens = s.get("raw"), s.get("tokens")
        if raw is not None and not isinstance(raw, str):
            raise InputError(f"{here}: 'raw' must be a string, got {_kind(raw)}")
        if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            hint = f" (a list such as {tokens.split()!r})" if isinstance(tokens, str) else ""
            raise InputError(f"{here}: 'tokens' must be a list of strings{hint}, got {_kind(tokens)}")
        if raw is None:
            raw = " ".join(tokens or [])
        raws.append(raw)
        # a given token list is used as it is, lowercased, but for the search's control tokens and empty strings:
        # <pad>, <start> or <end> (raw text never tokenises to them) became those ids inside the caption
        toks.append([t for t in map(str.lower, tokens) if t and t not in CONTROL] if tokens else tokenize(raw))
    return raws, toks


FLICKR8K_SPLIT_FILES = {
    "Flickr_8k.trainImages.txt": "train",
    "Flickr_8k.devImages.txt": "val",
    "Flickr_8k.testImages.txt": "test",
}
FLICKR8K_IMAGE_DIR = "Flicker8k_Dataset"  # sic: the official zip's spelling
UNASSIGNED = "unassigned"

_SPLIT_ALIASES = {"train": "train", "val": "val", "test": "test", "dev": "val", "restval": "train"}


def _records(image_root: Path, captions: dict[str, list[str]], splits: dict[str, str]) -> list[CaptionRecord]:
    """One record per image, in order of first appearance; ``image_id`` is the name as written."""
    return [
        CaptionRecord(
            image_path=image_root / name,
            captions=caps,
            tokens=[tokenize(c) for c in caps],
            image_id=name,
            split=splits[name],
        )
        for name, caps in captions.items()
    ]


def _flickr8k_splits(splits_dir: Path) -> dict[str, str]:
    """Image name -> split from whichever of the three Flickr8k split files exist."""
    found = [(splits_dir / f, split) for f, split in FLICKR8K_SPLIT_FILES.items() if (splits_dir / f).is_file()]
    if not found:
        raise InputFileNotFoundError(
            f"{splits_dir}: no Flickr8k split file, expected {', '.join(FLICKR8K_SPLIT_FILES)}"
        )
    splits: dict[str, str] = {}
    source: dict[str, Path] = {}
    for f, split in found:
        for line in _read_text(f).splitlines():
            name = line.strip()
            if not name or source.get(name) == f:
                continue
            if name in source:
                raise InputError(f"{f}: {name} is also listed in {source[name]}")
            splits[name], source[name] = split, f
    return splits


def read_flickr8k(
    token_file: str | Path, image_root: str | Path | None = None, splits_dir: str | Path | None = None
) -> list[CaptionRecord]:
    """Read Flickr8k's ``Flickr8k.token.txt`` plus its ``Flickr_8k.*Images.txt`` split files.

    Captions of one image are kept in order of appearance; ``dev`` becomes ``val`` and an image in
    no split file gets the split ``"unassigned"``. ``splits_dir`` defaults to the token file's
    folder, ``image_root`` to ``Flicker8k_Dataset`` beside the token file if it exists, else the
    token file's folder.
    """
    token_file = Path(token_file)
    if not token_file.is_file():
        raise InputFileNotFoundError(f"{token_file}: Flickr8k token file not found")
    captions: dict[str, list[str]] = {}
    # newline=None: lines end at \n, \r\n or \r, as in a file opened in text mode
    with io.StringIO(_read_text(token_file), newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\r\n").partition("\t")
            if not tab:
                raise InputError(f"{token_file}:{lineno}: no tab between image#index and caption")
            name, hash_, _ = key.strip().rpartition("#")
            if not hash_ or not name:
                raise InputError(f"{token_file}:{lineno}: expected 'image.jpg#index', got {key!r}")
            captions.setdefault(name, []).append(caption.strip())
    folder = Path(splits_dir) if splits_dir is not None else token_file.parent
    splits = _flickr8k_splits(folder)
    if image_root is None:
        default = token_file.parent / FLICKR8K_IMAGE_DIR
        image_root = default if default.is_dir() else token_file.parent
    return _records(Path(image_root), captions, {name: splits.get(name, UNASSIGNED) for name in captions})


def _split_name(path: Path, lineno: int, value: Any) -> str | None:
    """Normalise an explicit split (``dev`` -> ``val``, ``restval`` -> ``train``); empty -> None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.strip().lower() not in _SPLIT_ALIASES:
        raise InputError(f"{path}:{lineno}: unknown split {value!r}, expected one of {', '.join(_SPLIT_ALIASES)}")
    return _SPLIT_ALIASES[value.strip().lower()]


def _read_jsonl(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    """``(line, image, captions, split)`` per non-blank line of a JSONL captions file."""
    rows = []
    with io.StringIO(_read_text(path), newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            image = obj.get("image")
            image = image.strip() if isinstance(image, str) else image  # as the CSV reader: "a.jpg " is a.jpg
            if not isinstance(image, str) or not image:
                raise InputError(f"{path}:{lineno}: missing or empty 'image'")
            if "captions" in obj and "caption" in obj:
                raise InputError(f"{path}:{lineno}: give either 'captions' or 'caption', not both")
            if "captions" in obj:
                caps = obj["captions"]
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise InputError(f"{path}:{lineno}: 'captions' must be a list of strings")
            elif "caption" in obj:
                if not isinstance(obj["caption"], str):
                    raise InputError(f"{path}:{lineno}: 'caption' must be a string")
                caps = [obj["caption"]]
            else:
                raise InputError(f"{path}:{lineno}: missing 'captions' (or 'caption')")
            rows.append((lineno, image, caps, _split_name(path, lineno, obj.get("split"))))
    return rows


class _StrictRows:
    """A strict ``csv.reader``'s rows, its ``csv.Error`` raised as InputError naming the line its row starts on."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    @property
    def line_num(self) -> int:
        return self.reader.line_num

    def __iter__(self):
        return self

    def __next__(self) -> list[str]:
        start = self.reader.line_num + 1
        try:
            return next(self.reader)
        except csv.Error as e:
            raise InputError(
                f"{self.path}:{start}: {e}: a caption in double quotes must end with one (a quote inside a caption "
                'is doubled: "a ""big"" dog")'
            ) from None


def _read_csv(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    """``(line, image, [caption], split)`` per row of a CSV captions file with a header row."""
    rows = []
    # _read_text drops the byte-order mark spreadsheet exports often start with (it would rename 'image');
    # newline="": the csv module finds the line ends itself (a quoted caption may span lines)
    with io.StringIO(_read_text(path), newline="") as f:
        # strict: a quoted caption whose closing quote is missing ran to the end of the file, taking every row after
        # it into that caption, unsaid; strict mode raises there (a quote inside an unquoted cell, 'a 12" pizza',
        # and doubled quotes still read as before)
        reader = _StrictRows(csv.reader(f, strict=True), path)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path}: empty file, expected a header row with columns 'image' and 'caption'")
        columns = [c.strip() for c in header]
        if "image" not in columns or "caption" not in columns:
            raise InputError(f"{path}: needs columns 'image' and 'caption' (optional 'split'), found {columns}")
        # a repeated column (a "wide" file with one caption column per caption) would be read by its first
        # copy only, the other captions lost unsaid: one row per caption is the format
        repeated = sorted({c for c in ("image", "caption", "split") if columns.count(c) > 1})
        if repeated:
            raise InputError(
                f"{path}: column {', '.join(map(repr, repeated))} appears more than once in the header; "
                "give one row per caption (image,caption[,split])"
            )
        col = {name: columns.index(name) for name in ("image", "caption", "split") if name in columns}
        for row in reader:
            lineno = reader.line_num  # the physical line a row ends on (quoted captions may span lines)
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(col.values()):
                raise InputError(f"{path}:{lineno}: {len(row)} fields, header has {len(columns)}")
            if any(cell.strip() for cell in row[len(columns) :]):
                # most often an unquoted comma in a caption: read by its columns, the caption would be cut
                # at the comma and the rest dropped, unsaid (empty trailing cells, as spreadsheets write, pass)
                hint = 'a caption with a comma must be in double quotes ("a dog, a cat")'
                if any(cell[:1].isspace() and cell.lstrip().startswith('"') for cell in row):
                    # a space before the opening quote makes it a character of an unquoted cell (CSV's rule; reading
                    # it as a quote instead let one stray quote swallow the rows after it, unsaid)
                    hint = 'a quoted caption must start right after its comma: a.jpg,"a dog, a cat" (no space before)'
                raise InputError(f"{path}:{lineno}: {len(row)} fields, header has {len(columns)}; {hint}")
            image = row[col["image"]].strip()
            if not image:
                raise InputError(f"{path}:{lineno}: empty 'image'")
            split = _split_name(path, lineno, row[col["split"]]) if "split" in col else None
            rows.append((lineno, image, [row[col["caption"]].strip()], split))
    return rows


def ratio_splits(image_ids: list[str], val_fraction: float, test_fraction: float, seed: int = 0) -> dict[str, str]:
    """Assign ids to train/val/test by ratio, each id by itself: its split depends only on the id and
    ``seed``, never on which other ids there are or their order.

    A seeded hash of the id, read as a number ``u`` in [0, 1), puts it in test when
    ``u < test_fraction``, in val when ``u < test_fraction + val_fraction``, else in train. So adding
    or removing images never moves another image between splits (no test image ever leaks into train
    when a dataset grows), and raising a fraction only moves images out of train. The sizes are right
    on average: with n images a split gets about ``n * fraction`` (binomial, give or take
    ``sqrt(n * fraction)``), so a split of a tiny dataset can come out empty.
    """
    _check_fractions(val_fraction, test_fraction)
    splits = {}
    for name in image_ids:
        u = _unit_hash(f"{seed}\0{name}")
        splits[name] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return splits


def _unit_hash(text: str) -> float:
    """``text`` hashed to a number in [0, 1), the same in every run and on every machine (Python's own
    ``hash`` of a string changes from run to run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    # `not x >= 0` also rejects NaN
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise InputError(
            f"need 0 <= val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1, "
            f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def read_captions_file(
    path: str | Path,
    image_root: str | Path | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> list[CaptionRecord]:
    """Read a ``.jsonl`` or ``.csv`` captions file for a plain folder of images.

    Lines (rows) of the same image are merged in order. If any line gives a split, images without
    one go to ``train``; if none does, images are split by ratio (:func:`ratio_splits`).
    ``image_root`` defaults to the file's folder; ``image_id`` is the image as written in the file.
    """
    _check_fractions(val_fraction, test_fraction)
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise InputError(f"{path}: unsupported captions file suffix {path.suffix!r}, expected .jsonl or .csv")
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: captions file not found")
    captions: dict[str, list[str]] = {}
    explicit: dict[str, str] = {}
    for lineno, image, caps, split in readers[suffix](path):
        captions.setdefault(image, []).extend(caps)
        if split is None:
            continue
        if explicit.setdefault(image, split) != split:
            raise InputError(f"{path}:{lineno}: {image} has split {split!r} here but {explicit[image]!r} earlier")
    if explicit:
        splits = {name: explicit.get(name, "train") for name in captions}
    else:
        splits = ratio_splits(list(captions), val_fraction, test_fraction, seed)
    root = Path(image_root) if image_root is not None else path.parent
    return _records(root, captions, splits)


READERS = {"karpathy": read_karpathy_json, "flickr8k": read_flickr8k, "captions": read_captions_file}


def read_records(
    source: str, path: str | Path, image_root: str | Path | None = None, **kwargs: Any
) -> list[CaptionRecord]:
    """Read ``path`` with the reader named by ``source`` (``karpathy``, ``flickr8k`` or ``captions``).

    ``kwargs`` go to that reader: ``restval_to_train`` (karpathy), ``splits_dir`` (flickr8k),
    ``val_fraction``, ``test_fraction``, ``seed`` (captions).
    """
    if source not in READERS:
        raise InputError(f"unknown caption source {source!r}, expected one of {', '.join(READERS)}")
    return READERS[source](path, image_root=image_root, **kwargs)
