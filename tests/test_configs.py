"""The shipped recipes in configs/: every file parses for fit and test with options the code accepts, and each
real-data recipe (COCO, Flickr8k, Flickr30k) trains, validates, tests and writes its run on a tiny fake
dataset laid out exactly as data/README.md tells users to put the real one. Without these, a renamed
option, a wrong path or a refused value in a recipe would show only on a user's machine, after the
download of COCO."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from captioning.cli import LINKED_FROM_DATA, main
from captioning.data.datamodule import CaptionDataModule
from captioning.lit_module import CaptionModule

from conftest import ROOT, run_script

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
#: recipe -> the dataset it reads: its files are written by ``_write_<dataset>`` below
REAL = {
    "coco_resnet101_lstm.yaml": "coco",
    "coco_resnet101_transformer.yaml": "coco",
    "flickr8k_resnet50_lstm.yaml": "flickr8k",
    "flickr30k_resnet101_lstm.yaml": "flickr30k",
}


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def test_every_real_data_recipe_is_known_here():
    """A new recipe that reads a real dataset needs a fake dataset of its layout below; one that reads none
    (the shapes set) is covered by the parse checks alone."""
    real = {name for name in CONFIGS if _config(name)["data"]["dataset"] != "shapes"}
    assert real == set(REAL)


# --- parsing: cheap, every file ----------------------------------------------------------------------


def _print_config(subcommand: str, name: str) -> dict:
    """``train.py <subcommand> -c configs/<name> --print_config``, in this process (the same CLI, without the
    interpreter start and imports that cost ~8 s a run here: 14 runs would take two minutes)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([subcommand, "-c", str(ROOT / "configs" / name), "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses_and_keeps_its_values(name, subcommand):
    """Every key of the file is an option of this version (the parser refuses unknown keys and wrong types)
    and arrives with the file's value."""
    printed = _print_config(subcommand, name)
    for section in ("model", "data"):
        for key, value in _config(name)[section].items():
            assert printed[section][key] == value, (section, key)
    trainer = _config(name)["trainer"]
    for key, value in trainer.items():
        if key not in ("logger", "callbacks"):
            assert printed["trainer"][key] == value, key
    assert printed["trainer"]["logger"]["init_args"]["name"] == trainer["logger"]["init_args"]["name"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_configs_model_and_data_options_pass_their_checks(name):
    """The data module and the model built from the file's options, so their range and consistency checks run
    (parsing checks types only): a value the code refuses fails here, not at a user's first step."""
    config = _config(name)
    data = CaptionDataModule(**config["data"])  # reads no files until set-up
    # what the CLI links from the data module; the vocabulary would need the data's files
    linked = {t: getattr(data, s.split(".")[1]) for t, s in LINKED_FROM_DATA.items() if t != "vocab"}
    linked["vocab"] = ["<pad>", "<start>", "<end>", "<unk>", "a"]
    with torch.device("meta"):  # the architecture without its 40M random numbers (seconds for a ResNet-101)
        CaptionModule(**config["model"], **linked)


# --- a fit of each real-data recipe on a fake dataset of its layout ---------------------------------


def _jpeg(path: Path, seed: int) -> None:
    """A small noisy JPEG, a different one for each seed (resized up to the recipe's image size)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=85)


def _sentences(word: str, rare: str | None = None) -> list[dict]:
    """Five captions of one image in Karpathy's form (``raw`` as written, ``tokens`` lower-cased without
    punctuation); ``rare`` is added to the first four only."""
    out = []
    for k in range(5):
        raw = f"A photo of a {word} standing on the grass{' with an ' + rare if rare and k < 4 else ''}."
        out.append({"raw": raw, "tokens": re.findall(r"[a-z]+", raw.lower()), "sentid": k})
    return out


#: each split's word: in the vocabulary (min_word_freq 5) are the words of 5 or more training captions
TRAIN_WORD, RESTVAL_WORD, EVAL_WORD, RARE_WORD = "dog", "giraffe", "zebra", "okapi"


def _karpathy(path: Path, entries: list[tuple[str, str | None, str]]) -> None:
    """A Karpathy JSON of ``(split, filepath, filename)`` entries as the real files have them: COCO's with a
    ``filepath`` and a ``cocoid``, Flickr's (filepath None) with neither, the images straight in image_root."""
    images = []
    root = path.parent
    for i, (split, filepath, filename) in enumerate(entries):
        word = {"train": TRAIN_WORD, "restval": RESTVAL_WORD}.get(split, EVAL_WORD)
        entry = {"split": split, "filename": filename, "imgid": i}
        if filepath is not None:
            entry.update(filepath=filepath, cocoid=1000 + i)
        entry["sentences"] = _sentences(word, RARE_WORD if i == 0 else None)
        images.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": root.name}))


def _write_coco(work: Path) -> int:
    """data/coco/ as data/README.md lays it out: dataset_coco.json, train2014/ and val2014/ (restval, val and
    test images come from COCO's val2014). Returns the number of training images (restval included)."""
    entries = [("train", "train2014", f"COCO_train2014_{9 + i:012d}.jpg") for i in range(3)]
    entries += [("restval", "val2014", f"COCO_val2014_{42 + i:012d}.jpg") for i in range(2)]
    entries += [(split, "val2014", f"COCO_val2014_{73 + i:012d}.jpg") for i, split in enumerate(["val", "test"])]
    _karpathy(work / "data/coco/dataset_coco.json", entries)
    for i, (_, filepath, filename) in enumerate(entries):
        _jpeg(work / "data/coco" / filepath / filename, i)
    return 5


def _write_flickr8k(work: Path) -> int:
    """data/flickr8k/: dataset_flickr8k.json with the images in Flicker8k_Dataset/ (the zip's spelling), plus
    the native Flickr8k.token.txt and split files that the recipe's comment offers instead."""
    names = {"train": [f"10{i}_a1b2c3.jpg" for i in range(4)], "val": ["200_d4e5f6.jpg"], "test": ["300_0a0b0c.jpg"]}
    entries = [(split, None, name) for split, group in names.items() for name in group]
    _karpathy(work / "data/flickr8k/dataset_flickr8k.json", entries)
    for i, (_, _, name) in enumerate(entries):
        _jpeg(work / "data/flickr8k/Flicker8k_Dataset" / name, i)
    tokens = json.loads((work / "data/flickr8k/dataset_flickr8k.json").read_text())["images"]
    lines = [f"{img['filename']}#{k}\t{s['raw']}" for img in tokens for k, s in enumerate(img["sentences"])]
    (work / "data/flickr8k/Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, file in [("train", "trainImages"), ("val", "devImages"), ("test", "testImages")]:
        (work / f"data/flickr8k/Flickr_8k.{file}.txt").write_text("\n".join(names[split]) + "\n")
    return 4


def _write_flickr30k(work: Path) -> int:
    """data/flickr30k/: dataset_flickr30k.json with the images in flickr30k-images/."""
    entries = [("train", None, f"{1000092795 + i}.jpg") for i in range(4)]
    entries += [("val", None, "1007129816.jpg"), ("test", None, "1009434119.jpg")]
    _karpathy(work / "data/flickr30k/dataset_flickr30k.json", entries)
    for i, (_, _, name) in enumerate(entries):
        _jpeg(work / "data/flickr30k/flickr30k-images" / name, i)
    return 4


WRITERS = {"coco": _write_coco, "flickr8k": _write_flickr8k, "flickr30k": _write_flickr30k}


@pytest.fixture(scope="session")
def encoder_weights(tmp_path_factory):
    """``arch`` -> a local state-dict file of torchvision's ``arch``, what the recipes' comment offers instead
    of the ImageNet download (there is no network here). Random weights with BatchNorm statistics measured
    on noise, as trained weights have them: with the untouched statistics (mean 0, variance 1) a ResNet-101's
    features reach ~2.5e5, which the float16 feature cache rightly refuses."""
    files = {}

    def get(arch: str) -> Path:
        if arch not in files:
            torch.manual_seed(0)
            net = torchvision.models.get_model(arch, weights=None)
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None  # a cumulative average: the statistics of this one batch
                    m.reset_running_stats()
            with torch.no_grad():
                net.train()(torch.randn(8, 3, 128, 128))
            files[arch] = tmp_path_factory.mktemp("weights") / f"{arch}.pth"
            torch.save(net.state_dict(), files[arch])
        return files[arch]

    return get


def _fit(name: str, work: Path, weights: Path):
    """``train.py fit -c configs/<name>`` run in ``work``, so the recipe's relative paths (data/..., runs/) are
    the user's; only what cannot work here changes: the weights (a local file, no download), the device
    (this machine's CPU) and the length (one step)."""
    args = [str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / name)]
    args += ["--model.encoder_weights", str(weights), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    args += ["--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0"]
    proc = run_script(*args, cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_run(name: str, work: Path, proc, n_train: int) -> None:
    config = _config(name)
    data = config["data"]
    # the data summary names the recipe's own annotation path: the relative paths resolved in the run's folder
    assert f"data {data['annotations']}: train {n_train} images / {5 * n_train} captions" in proc.stdout
    run = work / "runs" / config["trainer"]["logger"]["init_args"]["name"] / "version_0"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    hp = ckpt["hyper_parameters"]
    assert {k: hp[k] for k in config["model"] if k != "encoder_weights"} == {
        k: v for k, v in config["model"].items() if k != "encoder_weights"
    }
    assert hp["image_size"] == data["image_size"]
    assert ckpt["captioning"]["grid"] == [config["model"]["encoder_grid"]] * 2
    vocab = set(ckpt["captioning"]["vocab"])
    # min_word_freq 5: a word of 5+ training captions is in, one of 4 is not; words of val/test never are;
    # restval's word is in exactly when restval joined train
    assert {"photo", "grass", TRAIN_WORD} <= vocab and not {RARE_WORD, EVAL_WORD} & vocab
    assert (RESTVAL_WORD in vocab) == ("coco" in name)
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["val/cider_d"] for r in rows if r.get("val/cider_d")], "no validation was logged"
    assert "cider_d" in " ".join(json.loads((run / "test_metrics.json").read_text()))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["annotations"] == data["annotations"]

    # feature_cache: true built the training split's features under data/cache/, named as data/README.md says
    cache = work / data.get("cache_dir", "data/cache")
    (npy,) = cache.glob("*.npy")
    stem = Path(data["annotations"]).stem
    assert re.fullmatch(rf"karpathy-{stem}-[0-9a-f]{{8}}-train-[0-9a-f]{{16}}\.npy", npy.name), npy.name
    features = np.load(npy, mmap_mode="r")
    grid = config["model"]["encoder_grid"]
    assert features.shape == (n_train, grid * grid, 2048) and features.dtype == np.float16
    assert np.isfinite(features).all() and np.abs(features).max() > 0
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["complete"] and meta["invalid"] == [] and meta["image_size"] == data["image_size"]


def _fit_and_check(name: str, tmp_path: Path, encoder_weights) -> None:
    n_train = WRITERS[REAL[name]](tmp_path)
    proc = _fit(name, tmp_path, encoder_weights(_config(name)["model"]["encoder"]))
    _check_run(name, tmp_path, proc, n_train)


@pytest.mark.slow
def test_flickr8k_recipe_trains_on_its_documented_layout(tmp_path, encoder_weights):
    """The cheapest recipe (ResNet-50): data paths, bf16-mixed on the CPU, eight loader workers, the feature
    cache, validation, the checkpoints and the test after fit, as a user gets them. Slow (~40 s here): the
    default run keeps the parse and option checks of every recipe and the native Flickr8k files below."""
    _fit_and_check("flickr8k_resnet50_lstm.yaml", tmp_path, encoder_weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco_resnet101_transformer.yaml", "flickr30k_resnet101_lstm.yaml"])
def test_resnet101_recipes_train_on_their_documented_layout(name, tmp_path, encoder_weights):
    """As the Flickr8k recipe; COCO's restval images (in val2014/) join train, as ``restval_to_train`` says."""
    _fit_and_check(name, tmp_path, encoder_weights)


@pytest.mark.slow
def test_the_coco_lstm_recipe_trains_and_its_model_tests_on_flickr30k_as_the_readme_says(tmp_path, encoder_weights):
    """The COCO LSTM recipe as the others, then the README's cross-dataset command, ``train.py test -c
    configs/flickr30k_resnet101_lstm.yaml --ckpt_path <coco run>/checkpoints/best.ckpt``: the two recipes
    prepare images alike, and the COCO model captions Flickr30k's test split with its own vocabulary."""
    _fit_and_check("coco_resnet101_lstm.yaml", tmp_path, encoder_weights)
    _write_flickr30k(tmp_path)
    best = tmp_path / "runs/coco_resnet101_lstm/version_0/checkpoints/best.ckpt"
    args = [str(ROOT / "train.py"), "test", "-c", str(ROOT / "configs/flickr30k_resnet101_lstm.yaml")]
    args += ["--ckpt_path", str(best), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    proc = run_script(*args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data data/flickr30k/dataset_flickr30k.json: train 4 images" in proc.stdout
    run = tmp_path / "runs/flickr30k_resnet101_lstm/version_0"
    assert "cider_d" in " ".join(json.loads((run / "test_metrics.json").read_text()))
    (caption,) = json.loads((run / "test_captions.json").read_text())
    test_image = json.loads((tmp_path / "data/flickr30k/dataset_flickr30k.json").read_text())["images"][-1]
    assert test_image["split"] == "test" and caption["image_id"] == test_image["imgid"]
    # what made it a cross-dataset test: Flickr30k's training captions would build another vocabulary (no
    # "giraffe"), which the COCO model's weights do not fit
    assert RESTVAL_WORD in torch.load(best, map_location="cpu", weights_only=True)["captioning"]["vocab"]


def test_flickr8k_native_files_read_with_the_recipes_image_root(tmp_path, monkeypatch):
    """The recipe's comment: ``--data.dataset flickr8k --data.annotations data/flickr8k/Flickr8k.token.txt``
    with the rest of the recipe (its image_root) finds every image and the three split files beside it."""
    _write_flickr8k(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = {**_config("flickr8k_resnet50_lstm.yaml")["data"], "dataset": "flickr8k"}
    data["annotations"] = "data/flickr8k/Flickr8k.token.txt"
    dm = CaptionDataModule(**data)
    sizes = {split: len(dm.records(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 1, "test": 1}
    assert not dm.report.bad_images and dm.report.unassigned == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data.dataset", "karpathy", "--data.annotations", "nothere/dataset_coco.json"],
         "error: nothere/dataset_coco.json: Karpathy JSON not found (where to get it"),
        (["--data.batch_size", "0"], "error: data.batch_size must be >= 1, got 0"),
        (["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.decoder", "gru"],
         "error: model.decoder must be one of lstm, transformer, got 'gru'"),
        (["--ckpt_path", "weights.pt"], "error: weights.pt: not a training checkpoint (no Lightning state"),
        # a model option, before the data is read (the Karpathy JSON is not even looked for): the module is made
        # after the data, and a bad model.lr stopped a run only after a scan of every image
        (["--data.dataset", "karpathy", "--data.annotations", "nothere/dataset_coco.json", "--model.lr", "-1"],
         "error: model.lr must be > 0, got -1.0"),
        # names and the transformer's heads too: they came after the data scan, in words naming no option
        (["--data.dataset", "karpathy", "--data.annotations", "nothere/dataset_coco.json", "--model.encoder",
          "resnet99"], "error: model.encoder must be one of small_cnn, resnet18, resnet34, resnet50, resnet101, "),
        (["--data.dataset", "karpathy", "--data.annotations", "nothere/dataset_coco.json", "--model.attention",
          "foo"], "error: model.attention must be one of additive, dot, got 'foo'"),
        (["--data.dataset", "karpathy", "--data.annotations", "nothere/dataset_coco.json", "--model.decoder",
          "transformer", "--model.hidden_dim", "32", "--model.num_heads", "5"],
         "error: model.hidden_dim (32), the transformer's width, is not divisible by model.num_heads (5)"),
        # Lightning's own refusal (MisconfigurationException) was a 35-line traceback
        pytest.param(["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.accelerator", "gpu"],
                     "error: trainer: No supported gpu backend found!",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused where no GPU is")),
    ],
)  # fmt: skip
def test_a_bad_data_file_or_option_is_one_line_naming_it_not_a_traceback(flags, message, tmp_path, monkeypatch):
    """train.py read data while Lightning's CLI set itself up, so a wrong path or value reached the user as a
    traceback of some fifteen frames with the message at its end; now the message alone, and a failing exit."""
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")  # a plain state dict, not a run's checkpoint
    with pytest.raises(SystemExit) as stop:
        main(["fit", *flags])
    assert isinstance(stop.value.code, str) and stop.value.code.startswith(message), stop.value.code


def test_the_attention_name_is_checked_only_for_the_lstm_which_reads_it():
    """The Transformer ignores model.attention (with a warning where it is set): a config or a checkpoint holding
    another value there, which worked, must not be refused by the early name check."""
    from captioning.errors import InputError
    from captioning.lit_module import check_model_options

    check_model_options({"decoder": "transformer", "attention": "none", "hidden_dim": 32, "num_heads": 4})
    with pytest.raises(InputError, match="^model.attention must be one of additive, dot, got 'none'$"):
        check_model_options({"decoder": "lstm", "attention": "none"})
