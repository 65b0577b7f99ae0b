"""Real-format data: a tiny COCO-style Karpathy JSON and a tiny Flickr8k token file over real image
files of many modes plus broken ones; bad data is left out and counted, training still runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captioning.data.cleaning import clean_records
from captioning.data.datamodule import CaptionDataModule, collate_train
from captioning.data.images import check_image, load_image
from captioning.data.sources import read_flickr8k, read_karpathy_json
from captioning.lit_module import CaptionModule

from conftest import ROOT, run_script

W, H = 40, 32  # stored image size (width, height)
RED, BLUE = (255, 0, 0), (0, 0, 255)


# --- the files ---------------------------------------------------------------------------------


def _halves(mode: str, left, right) -> Image.Image:
    """A W x H image of ``mode``: left half ``left``, right half ``right``."""
    img = Image.new(mode, (W, H), left)
    img.paste(right, (W // 2, 0, W, H))
    return img


def _jpeg_with_orientation_6(path: Path) -> None:
    """Stored 40x32, red left / blue right; EXIF Orientation 6 = shown rotated 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves("RGB", RED, BLUE).save(path, exif=exif.tobytes(), quality=95)


def _palette_with_transparency(path: Path) -> None:
    """Palette image: index 0 (green, transparent) on the left, index 1 (red) on the right."""
    img = _halves("P", 0, 1)
    img.putpalette([0, 255, 0, *RED] + [0] * (256 * 3 - 6))
    img.save(path, transparency=0)


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (W, H), c) for c in (RED, BLUE, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _truncated_jpeg(path: Path) -> None:
    """A noisy JPEG (so most of its bytes are scan data) cut two thirds of the way in: a broken download."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: 2 * len(data) // 3])


#: file -> how to write it; None = never written (missing)
GOOD = {
    "rgb.jpg": lambda p: _halves("RGB", (200, 30, 30), (30, 30, 200)).save(p, quality=95),
    "rgba.png": lambda p: _halves("RGBA", (255, 0, 0, 0), (0, 0, 255, 255)).save(p),
    "p_trans.png": _palette_with_transparency,
    "l.png": lambda p: Image.new("L", (W, H), 77).save(p),
    "i16.png": lambda p: Image.fromarray(np.full((H, W), 40000, dtype=np.uint16)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(p, quality=95),
    "exif6.jpg": _jpeg_with_orientation_6,
    "anim.gif": _animated_gif,
    "la.png": lambda p: Image.new("LA", (W, H), (10, 0)).save(p),
    "nocaps.png": lambda p: Image.new("RGB", (W, H), (9, 9, 9)).save(p),
    "restval.jpg": lambda p: Image.new("RGB", (W, H), (0, 128, 0)).save(p, quality=90),
    "val1.jpg": lambda p: Image.new("RGB", (W, H), (128, 0, 0)).save(p, quality=90),
    "val2.png": lambda p: Image.new("RGB", (W, H), (0, 0, 128)).save(p),
    "test1.png": lambda p: Image.new("RGB", (W, H), (90, 90, 0)).save(p),
    "test2.jpg": lambda p: Image.new("RGB", (W, H), (0, 90, 90)).save(p, quality=90),
}
BROKEN = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "text.jpg": (lambda p: p.write_text("this is not a jpeg, just text\n"), "not an image"),
    "missing.jpg": (lambda p: None, "missing"),
}

# (file, split, captions): the empty and punctuation-only captions are on good images; words that
# appear only with a left-out record ("zebra", "walrus", "okapi") must never reach the vocabulary
RECORDS = [
    ("rgb.jpg", "train", ["a red and blue picture", "two colours side by side", "red left blue right", ""]),
    ("rgba.png", "train", ["a blue half on white", "...", "white and blue", "a half blue image"]),
    ("p_trans.png", "train", ["a red half on white", "white then red"]),
    ("l.png", "train", ["a grey picture", "all grey"]),
    ("i16.png", "train", ["a light grey picture", "a bright grey square", "grey"]),
    ("cmyk.jpg", "train", ["a red picture", "all red"]),
    ("exif6.jpg", "train", ["red on top", "blue below", "a rotated picture", "red above blue", "two halves"]),
    ("anim.gif", "train", ["a red frame", "an animation"]),
    ("la.png", "train", ["a white picture", "all white"]),
    ("nocaps.png", "train", ["", "?!"]),
    ("empty.jpg", "train", ["a zebra picture", "zebra"]),
    ("truncated.jpg", "train", ["a zebra in noise", "noise"]),
    ("text.jpg", "train", ["zebra text", "zebra"]),
    ("restval.jpg", "restval", ["a giraffe green picture", "green", "all green"]),
    ("val1.jpg", "val", ["a dark red picture", "dark red", "red"]),
    ("val2.png", "val", ["a dark blue picture", "dark blue", "blue"]),
    ("missing.jpg", "val", ["an okapi", "okapi picture"]),
    ("test1.png", "test", ["an olive picture", "olive", "dark yellow"]),
    ("test2.jpg", "test", ["a teal picture", "teal", "dark cyan"]),
]
DUPLICATE = ("rgb.jpg", "train", ["a walrus", "walrus again"])  # same cocoid as rgb.jpg, a second time

# what clean_records must report for the Karpathy file (RECORDS + DUPLICATE)
KEPT = {"train": 10, "val": 2, "test": 2}
KEPT_CAPTIONS = {"train": 3 + 3 + 2 + 2 + 3 + 2 + 5 + 2 + 2 + 3, "val": 6, "test": 6}
BAD = {"empty file": 1, "truncated": 1, "not an image": 1, "missing": 1}
CANDIDATES = 18  # records with a usable caption and a unique id: 13 train (restval included) + 3 val + 2 test


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in GOOD.items():
        make(folder / name)
    for name, (make, _) in BROKEN.items():
        make(folder / name)


def _karpathy(path: Path, records) -> Path:
    ids = {name: 100 + i for i, (name, _, _) in enumerate(RECORDS)}
    images, sentid = [], 0
    for imgid, (name, split, caps) in enumerate(records):
        sentences = []
        for raw in caps:
            # Karpathy's own tokens: lowercased words, punctuation kept as it came ("..." -> ["..."])
            tokens = raw.lower().split()
            sentences.append({"raw": raw, "tokens": tokens, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": "images",
                "filename": name,
                "imgid": imgid,
                "cocoid": ids[name],
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _flickr8k(folder: Path) -> Path:
    """Flickr8k's native files for the same images; restval.jpg is in no split file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}#{i}\t{c}\n" for name, _, caps in RECORDS for i, c in enumerate(caps)]
    token_file = folder / "Flickr8k.token.txt"
    token_file.write_text("".join(lines))
    for file, split in [("trainImages", "train"), ("devImages", "val"), ("testImages", "test")]:
        names = [name for name, s, _ in RECORDS if s == split]
        (folder / f"Flickr_8k.{file}.txt").write_text("".join(n + "\n" for n in names))
    return token_file


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """Images under ``root/images``, ``root/dataset_coco.json`` and ``root/flickr8k/Flickr8k.token.txt``."""
    root = tmp_path_factory.mktemp("real")
    _write_images(root / "images")
    return {
        "root": root,
        "images": root / "images",
        "karpathy": _karpathy(root / "dataset_coco.json", [*RECORDS, DUPLICATE]),
        "flickr8k": _flickr8k(root / "flickr8k"),
    }


# --- the loader and the checker ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, pixels",
    [
        # (file, size after loading, {(x, y): expected RGB})
        ("exif6.jpg", (H, W), {(H // 2, 2): RED, (H // 2, W - 3): BLUE}),  # left half is now on top
        ("cmyk.jpg", (W, H), {(5, 5): RED}),
        ("p_trans.png", (W, H), {(2, 2): (255, 255, 255), (W - 3, 2): RED}),  # transparent index -> white
        ("anim.gif", (W, H), {(5, 5): RED}),  # frame 0, not the last (green) frame
        ("l.png", (W, H), {(5, 5): (77, 77, 77)}),
        ("la.png", (W, H), {(5, 5): (255, 255, 255)}),
        ("rgba.png", (W, H), {(2, 2): (255, 255, 255), (W - 3, 2): BLUE}),
        ("i16.png", (W, H), {(5, 5): (156, 156, 156)}),  # 40000 / 65535 * 255 = 155.6, not clipped to 255
    ],
)
def test_every_mode_loads_as_rgb_with_the_expected_pixels(real, name, size, pixels):
    img = load_image(real["images"] / name)
    assert img.mode == "RGB" and img.size == size
    for xy, rgb in pixels.items():
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= 3, (name, xy, got, rgb)


def test_check_image_gives_a_reason_for_each_broken_kind_and_none_for_good_files(real, tmp_path):
    folder = real["images"]
    assert {name: check_image(folder / name) for name in GOOD} == dict.fromkeys(GOOD)
    assert {name: check_image(folder / name) for name in BROKEN} == {n: r for n, (_, r) in BROKEN.items()}
    png = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    assert check_image(png) == "truncated"
    assert check_image(folder / "rgb.jpg", max_pixels=W * H - 1) == "too large"
    assert check_image(folder) == "not an image"  # a directory


# --- cleaning: exact counts ------------------------------------------------------------------------


def test_clean_records_counts_every_kind_of_bad_data_in_a_karpathy_file(real):
    records = read_karpathy_json(real["karpathy"])
    assert len(records) == len(RECORDS) + 1
    split, report = clean_records(records, real["karpathy"], max_bad_fraction=0.5)
    assert {s: len(v) for s, v in split.items()} == KEPT == report.images
    assert report.captions == KEPT_CAPTIONS
    assert dict(report.bad_images) == BAD and report.total_images == CANDIDATES
    assert report.empty_captions == 4  # "" and "..." on good images, both captions of nocaps.png
    assert report.images_without_captions == 1 and report.duplicate_ids == 1 and report.unassigned == 0
    assert report.examples["missing"] == [str(real["images"] / "missing.jpg")]
    train = {r.image_path.name: r for r in split["train"]}
    assert set(train) == {"rgb.jpg", "rgba.png", "p_trans.png", "l.png", "i16.png", "cmyk.jpg", "exif6.jpg"} | {
        "anim.gif",
        "la.png",
        "restval.jpg",
    }
    # the first rgb.jpg record is kept (not the duplicate), without its empty caption
    assert train["rgb.jpg"].captions == RECORDS[0][2][:3] and len(train["rgb.jpg"].tokens) == 3
    assert train["rgba.png"].captions == ["a blue half on white", "white and blue", "a half blue image"]

    summary = report.summary(real["karpathy"]).splitlines()
    assert summary[0] == (
        f"data {real['karpathy']}: train 10 images / {KEPT_CAPTIONS['train']} captions, "
        "val 2 images / 6 captions, test 2 images / 6 captions"
    )
    assert summary[1].startswith("  skipped 4 bad images of 18 (")
    assert sorted(summary[1][summary[1].index("(") + 1 : -1].split(", ")) == sorted(f"{r} 1" for r in BAD)
    for line in (
        "  4 empty or punctuation-only captions dropped",
        "  1 images without a usable caption skipped",
        "  1 records with a duplicate image id skipped",
    ):
        assert line in summary
    assert not any("no split" in line for line in summary)


def test_a_record_without_a_usable_caption_does_not_make_the_next_record_of_its_image_a_duplicate(tmp_path):
    """The id was taken before the captions were checked: an image listed first with only empty captions and
    then with good ones was left out twice, as captionless and as a duplicate."""
    from captioning.data.records import CaptionRecord

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    first = CaptionRecord(path, ["..."], [["..."]], "a.png", "train")
    second = CaptionRecord(path, ["a dog"], [["a", "dog"]], "a.png", "train")
    split, report = clean_records([first, second], tmp_path / "caps.jsonl", check_images=False)
    assert [r.captions for r in split["train"]] == [["a dog"]]
    assert (report.images_without_captions, report.duplicate_ids) == (1, 0)


def test_an_image_file_listed_twice_in_a_split_is_kept_once_and_counted(tmp_path):
    """Only a repeated id or a file in two splits was caught: the same file under two ids in one split was kept
    twice, silently (scored twice in val or test, weighed double in train)."""
    from captioning.data.records import CaptionRecord

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    first = CaptionRecord(path, ["a dog"], [["a", "dog"]], "1", "val")
    again = CaptionRecord(path, ["a cat"], [["a", "cat"]], "999", "val")
    other = CaptionRecord(tmp_path / "b.png", ["a cow"], [["a", "cow"]], "2", "train")
    split, report = clean_records([first, again, other], tmp_path / "caps.json", check_images=False)
    assert [r.image_id for r in split["val"]] == ["1"] and len(split["train"]) == 1
    assert (report.duplicate_files, report.duplicate_ids) == (1, 0)
    assert "  1 records of an image file already in their split skipped" in report.summary("x").splitlines()


def test_one_image_file_spelled_two_ways_is_one_image_in_the_split_checks(tmp_path, monkeypatch):
    """The splits were checked by the path as written: imgs/a.png in train, imgs/sub/../a.png in test and its
    absolute path in val passed as three images, and a test image seen in training inflates every metric."""
    import os

    from captioning.data.records import CaptionRecord

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    os.symlink(tmp_path / "imgs", tmp_path / "linked")
    spellings = [Path("imgs/sub/../a.png"), tmp_path / "imgs" / "a.png", Path("linked/a.png")]
    for other in spellings:
        records = [CaptionRecord(Path("imgs/a.png"), ["a dog"], [["a", "dog"]], "1", "train")]
        records.append(CaptionRecord(other, ["a dog"], [["a", "dog"]], "2", "test"))
        with pytest.raises(
            ValueError, match=rf"image {re.escape(str(other))} is in both the 'train' \(as imgs/a.png\) "
        ):
            clean_records(records, tmp_path / "caps.jsonl", check_images=False)
        records[1].split = "train"  # in one split: kept once, counted
        split, report = clean_records(records, tmp_path / "caps.jsonl", check_images=False)
        assert [r.image_id for r in split["train"]] == ["1"] and report.duplicate_files == 1


def test_a_karpathy_objects_field_is_kept_only_as_the_shapes_sets_ground_truth(tmp_path):
    """A detector's objects ({name, bbox, score}) in a Karpathy file stopped the first validation with a KeyError
    in the shapes scoring, and an empty list scored every caption as naming all of its objects."""
    shapes = [{"shape": "circle", "color": "red", "size": "small", "box": [1, 2, 10, 12.5]}]
    foreign = [{"name": "dog", "bbox": [1, 2, 3, 4], "score": 0.9}]
    half = [{**shapes[0], "box": [1, 2, 3]}]
    images = [
        {"filename": f"{i}.jpg", "split": "train", "sentences": [{"raw": "a dog"}], "objects": objects}
        for i, objects in enumerate([shapes, foreign, [], half, "x"])
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    assert [r.objects for r in read_karpathy_json(path)] == [shapes, None, None, None, None]


def test_control_tokens_in_a_karpathy_token_list_are_not_caption_words(tmp_path):
    """tokens ["a", "<end>", "dog", "<pad>", "runs"] were encoded as a, END, dog, PAD, runs: the search's
    control ids inside a caption. Raw text never tokenises to them; a given list now loses them (and "")."""
    from captioning.vocab import Vocabulary

    images = [{"filename": "a.jpg", "sentences": [{"tokens": ["A", "<end>", "dog", "<pad>", "", "<start>", "<unk>"]}]}]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    (record,) = read_karpathy_json(path)
    assert record.tokens == [["a", "dog", "<unk>"]]
    vocab = Vocabulary.build(record.tokens)
    assert vocab.encode(record.tokens[0]) == [vocab.start_id, 4, 5, vocab.unk_id, vocab.end_id]


def test_a_min_word_freq_that_leaves_no_word_is_refused_and_the_vocabulary_is_said(tiny_shapes, capsys):
    """data.min_word_freq above every word's count trained a model with no words at all: "" for every image,
    every metric 0, and nothing said."""
    data = dict(dataset="karpathy", annotations=str(tiny_shapes), image_root=str(tiny_shapes.parent))
    dm = CaptionDataModule(**data, min_word_freq=3)
    counts = {}
    for r in dm.records("train"):
        for caption in r.tokens:
            for w in caption:
                counts[w] = counts.get(w, 0) + 1
    words = sum(n >= 3 for n in counts.values())
    assert len(dm.vocab.tokens) == 4 + words
    assert f"vocabulary: {words} words of the training captions (data.min_word_freq 3)" in capsys.readouterr().out
    most = max(counts.values())
    dm = CaptionDataModule(**data, min_word_freq=most + 1)
    with pytest.raises(ValueError, match=rf"min_word_freq {most + 1} leaves the vocabulary no words: .* {most} times"):
        print(dm.vocab)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([{"cocoid": None, "imgid": 7}, {"cocoid": None, "imgid": 8}], ["7", "8"]),  # null: the next id
        ([{"cocoid": 5.0}, {"imgid": "x"}, {}], ["5", "x", "2"]),  # an integral float; no id: the index
    ],
)
def test_karpathy_image_ids_skip_nulls_and_take_integral_floats(tmp_path, ids, expected):
    """A null cocoid became the id "None" for every such image, so all but the first were dropped as duplicates."""
    images = [
        {"filename": f"{i}.jpg", "split": "train", "sentences": [{"raw": "a dog"}], **x} for i, x in enumerate(ids)
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    assert [r.image_id for r in read_karpathy_json(path)] == expected


@pytest.mark.parametrize("bad", [float("nan"), 1.5, True, "", [3]])
def test_a_karpathy_image_id_that_is_not_an_integer_or_a_string_is_refused_naming_the_entry(tmp_path, bad):
    images = [{"filename": "0.jpg", "split": "train", "sentences": [{"raw": "a dog"}], "cocoid": bad}]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"images\[0\] \(0.jpg\): 'cocoid' must be an integer or a non-empty string"):
        read_karpathy_json(path)


def test_clean_records_counts_a_flickr8k_file_with_an_image_in_no_split(real):
    records = read_flickr8k(real["flickr8k"], image_root=real["images"])
    split, report = clean_records(records, real["flickr8k"], max_bad_fraction=0.5)
    assert report.images == {"train": 9, "val": 2, "test": 2}  # restval.jpg is in no split file
    assert report.captions == {"train": KEPT_CAPTIONS["train"] - 3, "val": 6, "test": 6}
    assert dict(report.bad_images) == BAD and report.total_images == CANDIDATES - 1
    assert (report.empty_captions, report.images_without_captions) == (4, 1)
    assert (report.duplicate_ids, report.unassigned) == (0, 1)
    assert "  1 images in no split ignored" in report.summary(real["flickr8k"]).splitlines()


def test_too_many_bad_images_stop_with_the_counts_and_a_hint(real):
    records = read_karpathy_json(real["karpathy"])
    with pytest.raises(ValueError) as e:
        clean_records(records, real["karpathy"], max_bad_fraction=0.2)  # 4 / 18 = 22% bad
    msg = str(e.value)
    assert msg.startswith(f"{real['karpathy']}: 4 of 18 images are bad (22.2% > data.max_bad_fraction 20.0%)")
    assert "data.image_root" in msg and "skipped 4 bad images of 18" in msg
    clean_records(records, real["karpathy"], max_bad_fraction=4 / 18)  # exactly at the limit: allowed


def test_the_same_image_in_two_splits_is_an_error_naming_it(real, tmp_path):
    path = _karpathy(tmp_path / "leak.json", [*RECORDS, ("test1.png", "train", ["an olive picture"])])
    with pytest.raises(ValueError) as e:
        clean_records(read_karpathy_json(path, image_root=real["root"]), path, max_bad_fraction=0.5)
    assert str(e.value) == f"{path}: image {real['images'] / 'test1.png'} is in both the 'test' and the 'train' split"


# --- training through the real command line --------------------------------------------------------


def _fit(tmp_path: Path, *args: str):
    base = [str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / "tiny.yaml")]
    common = ["--data.max_bad_fraction", "0.5", "--data.captions_per_image", "3", "--data.batch_size", "4"]
    common += ["--trainer.max_steps", "3", "--trainer.num_sanity_val_steps", "0", "--model.max_decode_len", "5"]
    common += ["--model.test_meteor", "false"]
    proc = run_script(*base, *args, *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _skipped_line(stdout: str) -> dict[str, int]:
    m = re.search(r"^  skipped (\d+) bad images of (\d+) \((.*)\)$", stdout, re.M)
    assert m, stdout[-3000:]
    reasons = dict((r.rsplit(" ", 1)[0], int(r.rsplit(" ", 1)[1])) for r in m.group(3).split(", "))
    return {"bad": int(m.group(1)), "of": int(m.group(2)), **reasons}


def _checkpoint(tmp_path: Path) -> dict:
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "test_metrics.json").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    return ckpt


def test_fit_on_a_karpathy_coco_file_leaves_bad_data_out_and_counts_it(real, tmp_path):
    proc = _fit(
        tmp_path,
        *("--data.dataset", "karpathy", "--data.annotations", str(real["karpathy"])),
        *("--data.image_root", str(real["root"])),
    )
    out = proc.stdout
    assert f"data {real['karpathy']}: train 10 images / {KEPT_CAPTIONS['train']} captions" in out
    assert _skipped_line(out) == {"bad": 4, "of": 18, **BAD}
    assert "  4 empty or punctuation-only captions dropped\n" in out
    assert "  1 images without a usable caption skipped\n" in out
    assert "  1 records with a duplicate image id skipped\n" in out
    vocab = _checkpoint(tmp_path)["captioning"]["vocab"]
    # restval joined train; words of left-out records (bad images, the duplicate id, val/test) did not
    assert {"giraffe", "rotated", "animation"} <= set(vocab)
    assert not {"zebra", "walrus", "okapi", "olive", "..."} & set(vocab)


def test_fit_on_flickr8k_files_leaves_bad_data_out_and_counts_it(real, tmp_path):
    proc = _fit(
        tmp_path,
        *("--data.dataset", "flickr8k", "--data.annotations", str(real["flickr8k"])),
        *("--data.image_root", str(real["images"])),
    )
    out = proc.stdout
    assert f"data {real['flickr8k']}: train 9 images / {KEPT_CAPTIONS['train'] - 3} captions" in out
    assert _skipped_line(out) == {"bad": 4, "of": 17, **BAD}
    assert "  4 empty or punctuation-only captions dropped\n" in out
    assert "  1 images in no split ignored\n" in out
    vocab = _checkpoint(tmp_path)["captioning"]["vocab"]
    assert "rotated" in vocab and not {"zebra", "giraffe", "okapi"} & set(vocab)


# --- grouped batches ---------------------------------------------------------------------------------


def _datamodule(real, **kwargs) -> CaptionDataModule:
    torch.manual_seed(0)  # the loader's order is seeded from the run's seed, as train.py's seed_everything sets it
    options = dict(dataset="karpathy", annotations=str(real["karpathy"]), max_bad_fraction=0.5, image_size=32)
    return CaptionDataModule(**{**options, **kwargs})


def _module(dm: CaptionDataModule, **kwargs) -> CaptionModule:
    torch.manual_seed(0)
    arch = dict(encoder_channels=(8, 16, 16, 16), embed_dim=16, hidden_dim=32, attention_dim=16, alpha_c=0.5)
    return CaptionModule(vocab=dm.vocab_tokens, image_size=dm.image_size, **{**arch, **kwargs})


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_grouped_batch_encodes_each_image_once_and_weighs_every_word_the_same(real, decoder):
    dm = _datamodule(real, captions_per_image=3, batch_size=10)
    images, tokens, skipped = next(iter(dm.train_dataloader()))
    assert images.shape == (10, 3, 32, 32) and tokens.dim() == 3 and tokens.shape[:2] == (10, 3) and skipped == 0
    # the rows of each group are that image's own captions; an image with 2 captions has an all-<pad> row
    order = [i for i, _ in dm.train_sampler]
    records = dm.records("train")
    for b, i in enumerate(order[:10]):
        rows = [dm.vocab.decode(t.tolist()) for t in tokens[b] if t.any()]
        assert len(rows) == min(3, len(records[i].tokens)) and all(r in records[i].tokens for r in rows)
    present = tokens.ne(0).any(-1)  # (B,M)
    assert (present.sum(1) == 2).sum() == 5 and present.sum() == 25

    module = _module(dm, decoder=decoder, num_heads=2, num_layers=1).eval()
    seen = []
    forward = module.net.encoder.forward
    module.net.encoder.forward = lambda x: seen.append(x.shape[0]) or forward(x)
    with torch.no_grad():
        loss, ce = module.loss(images, tokens)
    assert seen == [10]  # once per image, not once per caption (30)

    # by hand: every real caption as its own row with its image's features, CE averaged over all words
    with torch.no_grad():
        feats = forward(images).features  # (B,N,C)
        rows = tokens.flatten(0, 1)[present.flatten()]  # (R,L), R = 25 real captions
        feats_r = feats.repeat_interleave(3, 0)[present.flatten()]  # (R,N,C)
        logits, alpha = module.net.decoder(feats_r, rows[:, :-1])  # (R,T,V), (R,T,N)
    targets = rows[:, 1:]
    mask = targets != 0
    word_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, reduction="none")
    ce_hand = word_ce.sum() / mask.sum()
    coverage = (alpha * mask.unsqueeze(-1)).sum(1)  # (R,N)
    dsa_hand = ((1 - coverage) ** 2).mean(-1).mean()
    torch.testing.assert_close(ce, ce_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ce_hand + 0.5 * dsa_hand, atol=1e-5, rtol=0)
    # and it is a mean over words, not over captions or images (which would differ here)
    per_caption = (word_ce.view_as(targets).sum(1) / mask.sum(1)).mean()
    assert abs(per_caption.item() - ce.item()) > 1e-4


def test_without_the_scan_bad_images_are_skipped_when_loaded_and_counted_per_batch(real):
    dm = _datamodule(real, captions_per_image=0, batch_size=64, check_images=False)
    assert dm.records("train") and len(dm.records("train")) == 13 and dm.report.bad_images == {}
    with pytest.warns(UserWarning, match="skipping image"):
        images, tokens, skipped = next(iter(dm.train_dataloader()))
    assert skipped == 3 and images.shape[0] == 10 and tokens.shape[:2] == (10, 5)  # 0 = all captions
    assert collate_train([None, None])[2] == 2


def test_feature_cache_with_a_trained_encoder_stops_naming_freeze_encoder(real, tmp_path):
    import pytorch_lightning as pl

    dm = _datamodule(real, feature_cache=True, cache_dir=str(tmp_path / "cache"), batch_size=4)
    module = _module(dm, freeze_encoder=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.freeze_encoder: true"):
        trainer.fit(module, dm)
    assert not (tmp_path / "cache").exists()


def test_real_data_needs_its_annotations_file():
    with pytest.raises(ValueError, match="data.annotations"):
        CaptionDataModule(dataset="flickr8k")


def test_missing_image_root_is_caught_by_the_bad_fraction(real, tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(real["images"] / "rgb.jpg", tmp_path / "images" / "rgb.jpg")
    dm = _datamodule(real, image_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"17 of 18 images are bad .*is data\.image_root right\?"):
        dm.prepare_data()


def test_the_training_order_works_in_an_unseeded_process():
    from captioning.data.datamodule import EpochSampler

    with torch.random.fork_rng():
        torch.seed()  # what an unseeded process has: a random 64-bit initial seed
        sampler = EpochSampler(5, torch.initial_seed())
        assert sorted(i for i, _ in sampler) == list(range(5))


def test_every_rank_gets_the_items_it_promises_even_with_fewer_images_than_ranks():
    """The order was padded with one repeat of its first items: 2 images over 8 ranks gave 4 ranks nothing
    while len() said 1, and DDP ranks with unequal batch counts hang in the next collective."""
    from captioning.data.datamodule import EpochSampler

    for size, world in ((2, 8), (1, 4), (3, 8), (5, 8), (10, 3)):
        shards = [list(EpochSampler(size, 0, world, rank)) for rank in range(world)]
        assert all(len(s) == len(EpochSampler(size, 0, world, 0)) for s in shards), (size, world)
        assert {i for s in shards for i, _ in s} == set(range(size))


def test_loaders_pin_their_batches_only_for_a_gpu_trainer(tmp_path):
    """Lightning copies batches to a GPU with non_blocking=True, which is only asynchronous from pinned memory;
    before, no loader pinned, so every batch copy made the host wait. On the CPU pinning would only cost."""
    import types

    import torch

    from captioning.data.datamodule import CaptionDataModule

    dm = CaptionDataModule(data_dir=str(tmp_path / "shapes"))
    assert not dm._loader(list(range(4)), 2).pin_memory  # no trainer yet
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        dm.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=device))
        assert dm._loader(list(range(4)), 2).pin_memory is pinned, device


def test_a_data_set_without_a_val_split_says_so_at_set_up_and_fit_tests_its_final_weights(
    real, tmp_path, monkeypatch, capsys
):
    """Before, set-up printed "val 0 images" and nothing else; Lightning's only word came after the first
    epoch (a monitored key it could not find), and the test after fit used the final weights unsaid."""
    from captioning.cli import main

    data = json.loads(real["karpathy"].read_text())
    for image in data["images"]:
        image["split"] = "test" if image["split"] == "val" else image["split"]
    annotations = tmp_path / "no_val.json"
    annotations.write_text(json.dumps(data))
    _, report = clean_records(read_karpathy_json(annotations, real["root"]), annotations, max_bad_fraction=0.5)
    assert report.empty_splits() == [
        "  the 'val' split is empty: no validation runs, so no best.ckpt is written (last.ckpt is)"
    ]
    assert "split is empty" not in report.summary(annotations)  # the summary also goes into errors

    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(ROOT / "configs" / "tiny.yaml"), "--data.dataset", "karpathy"]
    args += ["--data.annotations", str(annotations), "--data.image_root", str(real["root"])]
    args += ["--data.max_bad_fraction", "0.5", "--data.batch_size", "4", "--trainer.max_steps", "2"]
    main([*args, "--model.max_decode_len", "4", "--trainer.num_sanity_val_steps", "0"])
    out, err = capsys.readouterr()
    assert "the 'val' split is empty" in out
    assert "no checkpoint has a validation score: testing the final weights" in err
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert (run / "test_metrics.json").is_file() and not (run / "checkpoints" / "best.ckpt").exists()


def test_a_karpathy_caption_with_tokens_but_no_words_in_its_raw_text_is_dropped(tmp_path):
    """Cleaning judged a caption by its tokens alone; scoring reads the raw text, so a validation image was scored
    against "" and "..." when the file gave tokens beside them."""
    path = tmp_path / "dataset.json"
    sentences = [{"raw": "", "tokens": ["a", "dog"]}, {"raw": "...", "tokens": ["a", "cat"]}, {"raw": "A bird."}]
    train = {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "val", "sentences": sentences}, train]}))
    split, report = clean_records(read_karpathy_json(path), path, check_images=False)
    assert [r.captions for r in split["val"]] == [["A bird."]] and report.empty_captions == 2
