"""The Flickr8k and plain captions-file readers, their splits and their error messages."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from captioning.data.sources import ratio_splits, read_captions_file, read_flickr8k, read_karpathy_json, read_records
from captioning.errors import InputError
from captioning.vocab import tokenize

TOKENS = (
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n"
    "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
    "\n"
    "1001773457_577c3a7d70.jpg#1\tTwo dogs, on pavement\n"
    "2258277193_586949ec62.jpg.1#0\tA dog on a beach .\n"
)


def flickr8k(root: Path, splits: dict[str, str] | None = None, tokens: str = TOKENS) -> Path:
    """A tiny Flickr8k layout in ``root``; returns the token file."""
    root.mkdir(parents=True, exist_ok=True)
    if splits is None:
        splits = {
            "Flickr_8k.trainImages.txt": "1000268201_693b08cb0e.jpg\n",
            "Flickr_8k.devImages.txt": "1001773457_577c3a7d70.jpg\n",
        }
    for name, text in splits.items():
        (root / name).write_text(text)
    token_file = root / "Flickr8k.token.txt"
    token_file.write_text(tokens)
    return token_file


def by_id(records) -> dict:
    return {r.image_id: r for r in records}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- Flickr8k ----------------------------------------------------------------------------------


def test_flickr8k_groups_captions_in_order_and_maps_splits(tmp_path):
    recs = read_flickr8k(flickr8k(tmp_path))
    assert [r.image_id for r in recs] == [
        "1000268201_693b08cb0e.jpg",
        "1001773457_577c3a7d70.jpg",
        "2258277193_586949ec62.jpg.1",
    ]
    child, dogs, odd = recs
    assert child.captions == ["A child in a pink dress .", "A girl going into a wooden building ."]
    assert child.tokens == [
        ["a", "child", "in", "a", "pink", "dress"],
        ["a", "girl", "going", "into", "a", "wooden", "building"],
    ]
    assert dogs.tokens[1] == ["two", "dogs", ",", "on", "pavement"]
    assert (child.split, dogs.split, odd.split) == ("train", "val", "unassigned")
    assert child.image_path == tmp_path / "1000268201_693b08cb0e.jpg"
    assert isinstance(child.image_path, Path) and child.objects is None


def test_flickr8k_image_root_defaults_to_official_folder_and_can_be_given(tmp_path):
    token_file = flickr8k(tmp_path)
    (tmp_path / "Flicker8k_Dataset").mkdir()
    assert read_flickr8k(token_file)[0].image_path == tmp_path / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg"
    assert (
        read_flickr8k(token_file, image_root=tmp_path / "imgs")[0].image_path
        == tmp_path / "imgs" / "1000268201_693b08cb0e.jpg"
    )


def test_flickr8k_keeps_empty_captions_and_reads_splits_dir(tmp_path):
    token_file = flickr8k(tmp_path / "text", splits={}, tokens="a.jpg#0\t\nb.jpg#0\tTwo cats\n")
    flickr8k(tmp_path / "splits", splits={"Flickr_8k.testImages.txt": "b.jpg\n\n"})
    recs = by_id(read_flickr8k(token_file, splits_dir=tmp_path / "splits"))
    assert recs["a.jpg"].captions == [""] and recs["a.jpg"].tokens == [[]]
    assert (recs["a.jpg"].split, recs["b.jpg"].split) == ("unassigned", "test")


def test_flickr8k_image_in_two_split_files_names_both(tmp_path):
    splits = {"Flickr_8k.trainImages.txt": "a.jpg\nb.jpg\n", "Flickr_8k.testImages.txt": "b.jpg\n"}
    token_file = flickr8k(tmp_path, splits=splits, tokens="a.jpg#0\tx\nb.jpg#0\ty\n")
    with pytest.raises(ValueError, match="b.jpg") as e:
        read_flickr8k(token_file)
    assert "Flickr_8k.trainImages.txt" in str(e.value) and "Flickr_8k.testImages.txt" in str(e.value)
    assert str(e.value).startswith(str(tmp_path))


@pytest.mark.parametrize(
    "bad_line",
    ["1000268201_693b08cb0e.jpg#2 no tab here\n", "1000268201_693b08cb0e.jpg\tno index\n"],
    ids=["tab", "hash"],
)
def test_flickr8k_malformed_line_names_file_and_line(tmp_path, bad_line):
    token_file = flickr8k(tmp_path, tokens=TOKENS + bad_line)
    with pytest.raises(ValueError) as e:
        read_flickr8k(token_file)
    assert str(e.value).startswith(f"{token_file}:7: ")


def test_flickr8k_missing_split_files_names_folder_and_expected_files(tmp_path):
    token_file = flickr8k(tmp_path, splits={})
    with pytest.raises(FileNotFoundError) as e:
        read_flickr8k(token_file)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path))
    for name in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"):
        assert name in msg
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        read_flickr8k(tmp_path / "nope.txt")


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_with_splits_merges_repeated_images_and_accepts_single_caption(tmp_path):
    path = write_jsonl(
        tmp_path / "caps.jsonl",
        [
            {"image": "imgs/a.jpg", "captions": ["A Red circle.", "a red ball"], "split": "train"},
            {"image": "imgs/b.jpg", "caption": "Blue square", "split": "dev"},
            {"image": "imgs/a.jpg", "caption": "A third one!"},
            {"image": "imgs/c.jpg", "captions": ["green"]},
            {"image": "imgs/d.jpg", "captions": [""], "split": "restval"},
            {"image": "imgs/e.jpg", "captions": ["e"], "split": "test"},
        ],
    )
    recs = read_captions_file(path)
    assert [r.image_id for r in recs] == ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg", "imgs/e.jpg"]
    a = recs[0]
    assert a.captions == ["A Red circle.", "a red ball", "A third one!"]
    assert a.tokens == [["a", "red", "circle"], ["a", "red", "ball"], ["a", "third", "one"]]
    assert a.image_path == tmp_path / "imgs" / "a.jpg" and a.objects is None
    # c has no split but others do -> train; empty captions are kept for the data module to count
    assert [r.split for r in recs] == ["train", "val", "train", "train", "test"]
    assert recs[3].captions == [""]
    assert read_captions_file(path, image_root="/data")[1].image_path == Path("/data/imgs/b.jpg")


def test_jsonl_without_splits_uses_ratio_split(tmp_path):
    rows = [{"image": f"{i:03d}.jpg", "caption": f"image {i}"} for i in range(40)]
    recs = read_captions_file(write_jsonl(tmp_path / "caps.jsonl", rows), val_fraction=0.1, test_fraction=0.2, seed=3)
    expected = ratio_splits([f"{i:03d}.jpg" for i in range(40)], 0.1, 0.2, seed=3)
    assert {r.image_id: r.split for r in recs} == expected
    assert set(expected.values()) == {"train", "val", "test"}


@pytest.mark.parametrize(
    "line, cause",
    [
        ('{"image": "a.jpg", "captions": ["x"]', "not valid JSON"),
        ('{"captions": ["x"]}', "'image'"),
        ('{"image": "a.jpg"}', "'captions'"),
        ('{"image": "a.jpg", "captions": "not a list"}', "list of strings"),
        ('["a.jpg", "x"]', "JSON object"),
        ('{"image": "a.jpg", "caption": "x", "split": "holdout"}', "unknown split"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, cause):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "ok.jpg", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        read_captions_file(path)
    assert str(e.value).startswith(f"{path}:3: ") and cause in str(e.value)


def test_jsonl_conflicting_splits_for_one_image(tmp_path):
    path = write_jsonl(
        tmp_path / "caps.jsonl",
        [{"image": "a.jpg", "caption": "x", "split": "train"}, {"image": "a.jpg", "caption": "y", "split": "test"}],
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ")):
        read_captions_file(path)


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_quoted_commas_splits_and_merging(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text(
        "image,caption,split\n"
        'a.jpg,"A dog, a cat, and a bird",train\n'
        'b.jpg,"He said ""hi""",dev\n'
        "a.jpg,Second caption,\n"
        "c.jpg,no split here,\n"
    )
    recs = by_id(read_captions_file(path))
    assert recs["a.jpg"].captions == ["A dog, a cat, and a bird", "Second caption"]
    assert recs["a.jpg"].tokens[0] == ["a", "dog", ",", "a", "cat", ",", "and", "a", "bird"]
    assert recs["b.jpg"].captions == ['He said "hi"']
    assert {k: r.split for k, r in recs.items()} == {"a.jpg": "train", "b.jpg": "val", "c.jpg": "train"}
    assert recs["c.jpg"].image_path == tmp_path / "c.jpg"


def test_csv_with_a_space_before_a_quoted_caption_is_refused_saying_so(tmp_path):
    """'image, caption, split' rows with a space after each comma: CSV reads the quote after the space as a character,
    so the quoted caption was cut at its comma and the row refused, the message blaming missing quotes. It says what
    to change now. (Reading such quotes as quotes instead let one stray quote swallow the rows after it, unsaid.)"""
    path = tmp_path / "caps.csv"
    path.write_text('image, caption, split\na.jpg, "a red, square", train\nb.jpg, a circle, val\n')
    with pytest.raises(
        InputError, match=r"caps.csv:2: 4 fields, header has 3; a quoted caption must start right after"
    ):
        read_captions_file(path)
    path.write_text('image, caption, split\na.jpg,"a red, square", train\nb.jpg, a 12" circle, val\n')
    recs = by_id(read_captions_file(path))  # spaces elsewhere, and a quote inside a caption, read as before
    assert recs["a.jpg"].captions == ["a red, square"] and recs["a.jpg"].split == "train"
    assert recs["b.jpg"].captions == ['a 12" circle'] and recs["b.jpg"].split == "val"


def test_csv_without_split_column_uses_ratio_split_and_any_column_order(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("caption,image\n" + "".join(f"cap {i},{i}.png\n" for i in range(20)))
    recs = read_captions_file(path, val_fraction=0.25, test_fraction=0.25)
    assert {r.image_id: r.split for r in recs} == ratio_splits([f"{i}.png" for i in range(20)], 0.25, 0.25)
    assert recs[3].image_id == "3.png" and recs[3].captions == ["cap 3"]


def test_csv_missing_column_names_file_and_columns_found(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("filename,caption\na.jpg,x\n")
    with pytest.raises(ValueError) as e:
        read_captions_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "'image'" in msg and "'filename'" in msg


def test_csv_short_row_names_line(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text('image,caption\na.jpg,"two\nlines"\nb.jpg\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: ")):
        read_captions_file(path)


def test_csv_row_with_more_fields_than_the_header_or_a_repeated_column_is_refused_naming_it(tmp_path):
    # an unquoted comma in a caption: the caption was cut at the comma and the rest dropped, unsaid
    path = tmp_path / "caps.csv"
    path.write_text("image,caption\na.jpg,a red circle\nb.jpg,a dog, a cat and a bird\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: 3 fields, header has 2") + ".*double quotes"):
        read_captions_file(path)
    # a "wide" file, one column per caption: only the first caption of each row was read
    path.write_text("image,caption,caption\na.jpg,a dog,a brown dog\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: column 'caption' appears more than once")):
        read_captions_file(path)
    # empty trailing cells (spreadsheet exports) are no caption text: read as before
    path.write_text("image,caption\na.jpg,a red circle,,\n")
    assert [r.captions for r in read_captions_file(path)] == [["a red circle"]]


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"\.txt"):
        read_captions_file(tmp_path / "caps.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "caps.jsonl"))):
        read_captions_file(tmp_path / "caps.jsonl")


# --- ratio splits ------------------------------------------------------------------------------


def test_ratio_split_is_reproducible_and_independent_of_line_order(tmp_path):
    names = [f"img_{i}.jpg" for i in range(101)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    a = write_jsonl(tmp_path / "a.jsonl", [{"image": n, "caption": "x"} for n in names])
    b = write_jsonl(tmp_path / "b.jsonl", [{"image": n, "caption": "x"} for n in shuffled])
    split_a = {r.image_id: r.split for r in read_captions_file(a, val_fraction=0.1, test_fraction=0.15, seed=7)}
    split_b = {r.image_id: r.split for r in read_captions_file(b, val_fraction=0.1, test_fraction=0.15, seed=7)}
    assert split_a == split_b
    assert split_a == {r.image_id: r.split for r in read_captions_file(a, val_fraction=0.1, test_fraction=0.15, seed=7)}
    assert set(split_a.values()) == {"train", "val", "test"}
    other = {r.image_id: r.split for r in read_captions_file(a, val_fraction=0.1, test_fraction=0.15, seed=8)}
    assert other != split_a


def test_adding_or_removing_images_never_moves_another_between_splits():
    names = [f"COCO_{i:06d}.jpg" for i in range(400)]
    before = ratio_splits(names, 0.1, 0.1, seed=5)
    grown = ratio_splits(names + ["new.jpg"], 0.1, 0.1, seed=5)
    assert {n: grown[n] for n in names} == before
    changed = ratio_splits(names[50:] + [f"extra_{i}.jpg" for i in range(120)], 0.1, 0.1, seed=5)
    assert {n: changed[n] for n in names[50:]} == {n: before[n] for n in names[50:]}
    # a larger val fraction only moves images out of train; test is unchanged
    wider = ratio_splits(names, 0.2, 0.1, seed=5)
    assert all(wider[n] == s or (s, wider[n]) == ("train", "val") for n, s in before.items())
    moved = sum(s != wider[n] for n, s in before.items())
    assert 20 <= moved <= 60, moved  # about a tenth of the 400 moved


def test_ratio_split_sizes_are_close_to_the_fractions():
    n = 5000
    counts = Counter(ratio_splits([f"{i}.jpg" for i in range(n)], 0.1, 0.2, seed=0).values())
    for split, fraction in [("val", 0.1), ("test", 0.2), ("train", 0.7)]:
        sigma = (n * fraction * (1 - fraction)) ** 0.5
        assert abs(counts[split] - n * fraction) < 4 * sigma, (split, counts)


def test_ratio_split_defaults_and_zero_fractions(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": f"{i}.jpg", "caption": "x"} for i in range(60)])
    defaults = ratio_splits([f"{i}.jpg" for i in range(60)], val_fraction=0.05, test_fraction=0.05, seed=0)
    assert {r.image_id: r.split for r in read_captions_file(path)} == defaults
    assert {r.split for r in read_captions_file(path, val_fraction=0, test_fraction=0)} == {"train"}


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.1, -0.01), (0.5, 0.5), (0.7, 0.4), (float("nan"), 0.1)])
def test_fraction_validation(tmp_path, val, test):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match="val_fraction"):
        read_captions_file(path, val_fraction=val, test_fraction=test)


# --- Karpathy JSON ------------------------------------------------------------------------------

GOOD_IMAGE = {
    "filename": "ok.jpg",
    "split": "train",
    "imgid": 0,
    "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}],
}


@pytest.mark.parametrize(
    "second, where, cause",
    [
        ("b.jpg", "images[1]", "must be an object with 'filename' and 'sentences', got str 'b.jpg'"),
        ({"sentences": []}, "images[1]", "has no 'filename'"),
        ({"filename": "b.jpg"}, "images[1]", "has no 'sentences'"),
        ({"filename": 7, "sentences": []}, "images[1]", "'filename' must be a non-empty string, got int 7"),
        ({"filename": "b.jpg", "filepath": 3, "sentences": []}, "images[1] (b.jpg)", "'filepath' must be a string"),
        ({"filename": "b.jpg", "split": ["val"], "sentences": []}, "images[1] (b.jpg)", "'split' must be a string"),
        # was counted among "images in no split" and left out: a file whose validation images say "valid" had
        # no validation split at all
        (
            {"filename": "b.jpg", "split": "valid", "sentences": []},
            "images[1] (b.jpg)",
            "unknown split 'valid', expected one of train, val, test, restval",
        ),
        (
            {"filename": "b.jpg", "sentences": "a dog"},
            "images[1] (b.jpg)",
            "'sentences' must be a list, got str 'a dog'",
        ),
        ({"filename": "b.jpg", "sentences": ["a dog"]}, "images[1] (b.jpg): sentences[0]", "must be an object"),
        (
            {"filename": "b.jpg", "sentences": [{"raw": "x"}, {}]},
            "images[1] (b.jpg): sentences[1]",
            "neither 'raw' nor 'tokens'",
        ),
        ({"filename": "b.jpg", "sentences": [{"raw": 5}]}, "images[1] (b.jpg): sentences[0]", "'raw' must be a string"),
        (
            {"filename": "b.jpg", "sentences": [{"tokens": [1, 2]}]},
            "images[1] (b.jpg): sentences[0]",
            "list of strings",
        ),
        # a string would be split into characters; it is refused, with the list it may have meant
        (
            {"filename": "b.jpg", "sentences": [{"raw": "A dog.", "tokens": "a dog"}]},
            "images[1] (b.jpg): sentences[0]",
            "'tokens' must be a list of strings (a list such as ['a', 'dog']), got str 'a dog'",
        ),
    ],
)
def test_karpathy_malformed_entry_names_file_image_and_cause(tmp_path, second, where, cause):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [GOOD_IMAGE, second]}))
    with pytest.raises(ValueError) as e:
        read_karpathy_json(path)
    assert str(e.value).startswith(f"{path}: {where}") and cause in str(e.value), str(e.value)


@pytest.mark.parametrize("images", [{"0": GOOD_IMAGE}, "ok.jpg", None])
def test_karpathy_images_that_are_not_a_list(tmp_path, images):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: 'images' must be a list of image entries, got ")):
        read_karpathy_json(path)


def test_karpathy_sentence_with_only_raw_or_only_tokens(tmp_path):
    path = tmp_path / "dataset.json"
    img = {
        "filename": "a.jpg",
        "sentences": [{"raw": "A Dog, running."}, {"tokens": ["A", "cat"]}, {"raw": "x", "tokens": []}],
    }
    path.write_text(json.dumps({"images": [img]}))
    (rec,) = read_karpathy_json(path)
    assert rec.captions == ["A Dog, running.", "A cat", "x"]
    assert rec.tokens == [tokenize("A Dog, running."), ["a", "cat"], ["x"]]


# --- dispatcher --------------------------------------------------------------------------------


def test_read_records_dispatches_and_passes_kwargs(tmp_path):
    token_file = flickr8k(tmp_path / "f8k", splits={})
    flickr8k(tmp_path / "splits", splits={"Flickr_8k.testImages.txt": "1000268201_693b08cb0e.jpg\n"}, tokens="")
    recs = read_records("flickr8k", token_file, splits_dir=tmp_path / "splits")
    assert by_id(recs)["1000268201_693b08cb0e.jpg"].split == "test"

    caps = write_jsonl(tmp_path / "caps.jsonl", [{"image": f"{i}.jpg", "caption": "x"} for i in range(10)])
    recs = read_records("captions", caps, image_root=tmp_path / "imgs", val_fraction=0.3, test_fraction=0.2, seed=1)
    assert {r.image_id: r.split for r in recs} == ratio_splits([f"{i}.jpg" for i in range(10)], 0.3, 0.2, seed=1)
    assert {r.image_id: r.split for r in recs} != ratio_splits([f"{i}.jpg" for i in range(10)], 0.3, 0.2, seed=0)
    assert recs[0].image_path == tmp_path / "imgs" / "0.jpg"

    karpathy = tmp_path / "dataset.json"
    img = {
        "filename": "k.jpg",
        "split": "restval",
        "imgid": 5,
        "sentences": [{"raw": "A cat.", "tokens": ["A", "cat"]}],
    }
    karpathy.write_text(json.dumps({"images": [img]}))
    via = read_records("karpathy", karpathy, restval_to_train=False)
    assert via == read_karpathy_json(karpathy, restval_to_train=False) and via[0].split == "restval"

    with pytest.raises(ValueError, match="karpathy.*flickr8k.*captions"):
        read_records("coco", karpathy)


# --- encodings ---------------------------------------------------------------------------------


def _latin1_files(root: Path) -> dict[str, tuple[str, Path, int]]:
    """Each reader's file with "café" in Latin-1 on its line 2 (byte 0xe9): reader -> (reader, file, line)."""
    root.mkdir()
    caps = [{"raw": "A dog.", "tokens": ["a", "dog"]}]
    karpathy = json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": caps}]}, indent=0)
    karpathy = karpathy.replace("A dog.", "Un café")  # indent=0: one key a line
    jsonl = '{"image": "a.jpg", "caption": "A dog", "split": "train"}\n{"image": "b.jpg", "caption": "Un café"}\n'
    files = {
        "karpathy": ("dataset.json", karpathy, karpathy[: karpathy.index("café")].count("\n") + 1),
        "flickr8k": ("Flickr8k.token.txt", "a.jpg#0\tA dog .\na.jpg#1\tUn café .\n", 2),
        "jsonl": ("caps.jsonl", jsonl, 2),
        "csv": ("caps.csv", "image,caption,split\nb.jpg,Un café,train\n", 2),
    }
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    out = {}
    for kind, (name, text, line) in files.items():
        (root / name).write_bytes(text.encode("latin-1"))
        out[kind] = ("captions" if kind in ("jsonl", "csv") else kind, root / name, line)
    return out


@pytest.mark.parametrize("kind", ["karpathy", "flickr8k", "jsonl", "csv"])
def test_a_file_that_is_not_utf8_is_a_value_error_naming_the_file_and_line(tmp_path, kind):
    """A Latin-1 file used to end in a bare UnicodeDecodeError naming neither the file nor the line."""
    reader, path, line = _latin1_files(tmp_path / "files")[kind]
    with pytest.raises(ValueError) as e:
        read_records(reader, path)
    # not the UnicodeDecodeError subclass: the input error train.py prints as one line
    assert type(e.value) is InputError, repr(e.value)
    assert str(e.value).startswith(f"{path}:{line}: not UTF-8 text (byte 0xe9 at offset "), str(e.value)
    # the same file behind a byte-order mark: the same line and byte, the offset 3 further on (the decoder
    # counts from after the mark, which gave the byte 3 before the bad one, and on a line break the line before)
    offset = path.read_bytes().index(b"\xe9")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    with pytest.raises(ValueError) as e:
        read_records(reader, path)
    assert str(e.value).startswith(f"{path}:{line}: not UTF-8 text (byte 0xe9 at offset {offset + 3});"), str(e.value)


@pytest.mark.parametrize("kind", ["karpathy", "flickr8k", "jsonl", "csv"])
def test_a_byte_order_mark_is_skipped(tmp_path, kind):
    """Windows editors start UTF-8 files with a byte-order mark: it is not part of the first image name
    (which would put that Flickr8k image in no split) nor a JSON error."""
    reader, path, _ = _latin1_files(tmp_path / "files")[kind]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().decode("latin-1").encode("utf-8"))
    splits_file = tmp_path / "files" / "Flickr_8k.trainImages.txt"
    splits_file.write_bytes(b"\xef\xbb\xbfa.jpg\n")
    records = read_records(reader, path)
    first = records[0]
    assert first.image_path.name == ("b.jpg" if kind == "csv" else "a.jpg") and first.split == "train", first
    assert any("café" in c for r in records for c in r.captions)


def test_a_coco_annotation_file_given_as_karpathy_json_is_named_as_such(tmp_path):
    """COCO's captions_train2014.json also has an 'images' list; it used to be refused only as an entry
    without 'filename' (it has 'file_name'), which does not say that the file is the wrong one."""
    path = tmp_path / "captions_train2014.json"
    images = [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 480, "width": 640}]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": [{"image_id": 9, "caption": "A cat."}]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: a COCO annotation file")) as e:
        read_karpathy_json(path)
    assert "dataset_coco.json" in str(e.value)


def test_a_csv_caption_whose_quote_never_closes_is_refused_at_its_line_not_read_into_the_rows_after(tmp_path):
    """CSV's lenient mode let the open quote run to the end of the file: b.jpg and c.jpg became part of a.jpg's
    caption, unsaid. Quotes inside a caption, doubled quotes and captions over two lines still read."""
    bad = tmp_path / "unclosed.csv"
    bad.write_text('image,caption\na.jpg,"A dog runs\nb.jpg,A cat\nc.jpg,A bird\n')
    with pytest.raises(InputError, match=rf"^{re.escape(str(bad))}:2: unexpected end of data: a caption in double"):
        read_captions_file(bad)
    good = tmp_path / "quotes.csv"
    good.write_text('image,caption\na.jpg,"A ""big"" dog"\nb.jpg,A 12" pizza\nc.jpg,"two\nlines"\n')
    assert [(r.image_id, r.captions) for r in read_captions_file(good)] == [
        ("a.jpg", ['A "big" dog']),
        ("b.jpg", ['A 12" pizza']),
        ("c.jpg", ["two\nlines"]),
    ]


def test_a_jsonl_image_name_with_spaces_around_it_is_the_same_image_as_in_csv(tmp_path):
    """The CSV reader stripped "a.jpg ", the JSONL reader kept it: two images, the second a missing file."""
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg ", "caption": "A dog"}\n{"image": "a.jpg", "caption": "A cat"}\n')
    assert [(r.image_id, r.captions) for r in read_captions_file(path)] == [("a.jpg", ["A dog", "A cat"])]
