"""The frozen-encoder feature cache and local encoder weights: keys, rebuilds, equivalence with reading
images, and a fit through train.py that loads a weights file the test writes."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from captioning.data import features
from captioning.data.datamodule import CaptionDataModule, TrainCaptions, collate_train
from captioning.data.features import FeatureCache, encoder_fingerprint
from captioning.data.images import load_image
from captioning.data.sources import read_karpathy_json
from captioning.data.transforms import EvalTransform
from captioning.errors import InputError
from captioning.lit_module import CaptionModule
from captioning.models.encoders import SmallCNN, TorchvisionEncoder, load_encoder_weights
from captioning.vocab import Vocabulary

from conftest import ROOT, finish, run_script, start_script


def _train_records(tiny_shapes: Path, n: int):
    return [r for r in read_karpathy_json(tiny_shapes) if r.split == "train"][:n]


def _frozen_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN((8, 8, 8, 8), freeze=True)


def _files(folder: Path) -> dict[str, int]:
    """name -> modification time (ns) of every file in ``folder``."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# --- the cache itself ----------------------------------------------------------------------------------


def test_cache_key_follows_the_encoder_grid_and_a_killed_builds_file_is_removed(tiny_shapes, tmp_path):
    """Pooling to another grid has no weights but changes the features: another key. A build killed
    mid-way (its process gone) leaves a partial temporary file, which the next build deletes."""
    paths = [r.image_path for r in _train_records(tiny_shapes, 2)]
    torch.manual_seed(0)
    enc = TorchvisionEncoder("resnet18", stage=1, grid=4, freeze=True)
    coarse = copy.deepcopy(enc)
    coarse.pool = torch.nn.AdaptiveAvgPool2d(2)  # the same weights
    fine_cache = FeatureCache(tmp_path, "set-train", paths, enc, EvalTransform(32))
    coarse_cache = FeatureCache(tmp_path, "set-train", paths, coarse, EvalTransform(32))
    assert fine_cache.key != coarse_cache.key
    orphan = tmp_path / f"{coarse_cache.file.name}.tmp999999999"  # no such process
    orphan.write_bytes(b"partial")
    coarse_cache.build(coarse, progress=False)
    assert coarse_cache.open()[0].shape == (2, 4, 64) and not orphan.exists()


def test_a_name_with_glob_characters_still_has_its_stale_cache_and_killed_builds_file_removed(tiny_shapes, tmp_path):
    """A cache name holds the annotation file's stem (captions[v2].jsonl -> "captions-captions[v2]-..."): read
    as a glob pattern, '[v2]' matched nothing, and the stale cache and a killed build's file stayed forever."""
    paths = [r.image_path for r in _train_records(tiny_shapes, 2)]
    name = "captions-caps[v2]-0123abcd-train"
    first = FeatureCache(tmp_path, name, paths, _frozen_cnn(0), EvalTransform(32))
    first.build(_frozen_cnn(0), progress=False)
    orphan = tmp_path / f"{first.file.name}.tmp999999999"  # a killed build's partial file
    orphan.write_bytes(b"partial")
    second = FeatureCache(tmp_path, name, paths, _frozen_cnn(1), EvalTransform(32))
    second.build(_frozen_cnn(1), progress=False)
    assert _files(tmp_path).keys() == {second.file.name, second.meta_file.name}


def test_a_cache_whose_array_was_cut_short_is_built_again_and_one_damaged_later_is_named(tiny_shapes, tmp_path):
    """Only the metadata was checked: an array cut short after the build (a copy of data/cache stopped part-way)
    passed as a finished cache and failed later inside the data loader, with numpy's message and no file named."""
    paths = [r.image_path for r in _train_records(tiny_shapes, 3)]
    cache = FeatureCache(tmp_path, "set-train", paths, _frozen_cnn(0), EvalTransform(32))
    cache.build(_frozen_cnn(0), progress=False)
    want = np.array(cache.open()[0])
    assert cache.exists()
    whole = cache.file.read_bytes()
    cache.file.write_bytes(whole[:-100])
    fresh = FeatureCache(tmp_path, "set-train", paths, _frozen_cnn(0), EvalTransform(32))
    assert not fresh.exists()
    fresh.build_or_wait(_frozen_cnn(0), builder=True, barrier=lambda: None, progress=False)
    assert fresh.exists() and np.array_equal(fresh.open()[0], want)
    cache.file.write_bytes(whole[:-100])  # damaged after the check
    later = FeatureCache(tmp_path, "set-train", paths, _frozen_cnn(0), EvalTransform(32))
    with pytest.raises(ValueError, match=f"{re.escape(str(later.file))}: the feature cache cannot be read"):
        later.open()


def test_cache_key_follows_size_weights_dtype_and_files_and_a_rebuild_removes_the_stale_file(tiny_shapes, tmp_path):
    paths = [r.image_path for r in _train_records(tiny_shapes, 4)]
    enc, small = _frozen_cnn(), EvalTransform(32)
    folder = tmp_path / "cache"
    first = FeatureCache(folder, "set-train", paths, enc, small)
    assert not first.exists()
    first.build(enc, progress=False)
    assert first.exists() and _files(folder).keys() == {first.file.name, first.meta_file.name}
    feats, valid = first.open()
    assert feats.shape == (4, 16, 8) and feats.dtype == "float16" and valid.all()  # 32 px -> 4x4 grid of 8
    meta = json.loads(first.meta_file.read_text())
    assert meta["key"] == first.key and meta["image_size"] == 32 and meta["encoder"] == "SmallCNN"

    # the same inputs: the same key, found on disk (nothing to build)
    assert FeatureCache(folder, "set-train", paths, _frozen_cnn(), EvalTransform(32)).file == first.file
    # another split's cache is not stale for this one and must survive its rebuilds
    val = FeatureCache(folder, "set-val", paths[:2], enc, small)
    val.build(enc, progress=False)

    keys = {first.key}
    bigger = FeatureCache(folder, "set-train", paths, enc, EvalTransform(48))
    other = _frozen_cnn()
    with torch.no_grad():
        other.body[0][0].weight[0, 0, 0, 0] += 1e-3  # one weight, a little
    reweighted = FeatureCache(folder, "set-train", paths, other, small)
    wider = FeatureCache(folder, "set-train", paths, enc, small, dtype="float32")
    bn = _frozen_cnn()
    bn.body[1][1].running_mean[0] = 0.5  # frozen BatchNorm statistics are weights too
    restats = FeatureCache(folder, "set-train", paths, bn, small)
    for cache in (bigger, reweighted, wider, restats):
        assert cache.key not in keys and not cache.exists()
        keys.add(cache.key)
    os.utime(paths[0], ns=(1, 1))  # an image file changed on disk
    assert FeatureCache(folder, "set-train", paths, enc, small).key not in keys

    bigger.build(enc, progress=False)
    assert _files(folder).keys() == {p.name for c in (bigger, val) for p in (c.file, c.meta_file)}
    assert not first.exists()
    reweighted.build(other, progress=False)
    assert _files(folder).keys() == {p.name for c in (reweighted, val) for p in (c.file, c.meta_file)}


def test_unloadable_images_are_marked_in_the_cache_and_left_out_of_training(tiny_shapes, tmp_path):
    records = _train_records(tiny_shapes, 3)
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    paths = [records[0].image_path, bad, records[1].image_path, tmp_path / "gone.png"]
    enc, t = _frozen_cnn(), EvalTransform(32)
    cache = FeatureCache(tmp_path / "cache", "x-train", paths, enc, t, dtype="float32")
    cache.build(enc, progress=False)
    feats, valid = cache.open()
    assert valid.tolist() == [True, False, True, False]
    assert json.loads(cache.meta_file.read_text())["invalid"] == [1, 3]
    with torch.no_grad():
        want = enc.eval()(t(load_image(records[1].image_path)).unsqueeze(0))  # (1,3,H,W)
    torch.testing.assert_close(torch.from_numpy(feats[2].copy()), want.features[0], atol=1e-6, rtol=0)

    recs = [records[0], records[1], records[2], records[0]]
    recs = [type(r)(p, r.captions, r.tokens, r.image_id, r.split) for r, p in zip(recs, paths)]
    vocab = Vocabulary.build(t for r in recs for t in r.tokens)
    ds = TrainCaptions(recs, vocab, t, 24, captions_per_image=2, features=cache)
    inputs, tokens, skipped = collate_train([ds[(i, 0)] for i in range(4)])
    assert inputs.shape == (2, 16, 8) and tokens.shape[:2] == (2, 2) and skipped == 2


def test_cached_float32_features_give_the_same_training_loss_as_the_images(tiny_shapes, tmp_path):
    records = _train_records(tiny_shapes, 6)
    vocab = Vocabulary.build(t for r in records for t in r.tokens)
    torch.manual_seed(0)
    module = CaptionModule(
        vocab=list(vocab.tokens), encoder_channels=(8, 16, 16, 16), freeze_encoder=True, embed_dim=16,
        hidden_dim=32, attention_dim=16, image_size=64, alpha_c=1.0,
    ).eval()  # fmt: skip
    t = EvalTransform(64)
    cache = FeatureCache(tmp_path, "shapes-train", [r.image_path for r in records], module.net.encoder, t, "float32")
    cache.build(module.net.encoder, progress=False)
    from_images = TrainCaptions(records, vocab, t, 24, seed=3, captions_per_image=3)
    from_cache = TrainCaptions(records, vocab, t, 24, seed=3, captions_per_image=3, features=cache)
    images, tokens, _ = collate_train([from_images[(i, 1)] for i in range(6)])
    feats, tokens_c, _ = collate_train([from_cache[(i, 1)] for i in range(6)])
    assert images.shape == (6, 3, 64, 64) and feats.shape == (6, 64, 16) and tokens.shape[:2] == (6, 3)
    assert torch.equal(tokens, tokens_c)  # the same captions drawn whichever the input
    with torch.no_grad():
        loss_i, ce_i = module.loss(images, tokens)
        loss_f, ce_f = module.loss(feats, tokens)
    torch.testing.assert_close(loss_f, loss_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(ce_f, ce_i, atol=1e-5, rtol=0)
    assert loss_i.item() > ce_i.item() > 0  # the attention term is in both


# --- local weights and the cache, through train.py ----------------------------------------------------


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[Path, dict]:
    """A resnet18 state dict with known values, unlike any seeded initialisation."""
    torch.manual_seed(1234)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = 0.75
    state["bn1.running_mean"].fill_(0.25)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(state, path)
    return path, state


def test_fit_loads_a_local_weights_file_and_reuses_its_feature_cache(tmp_path, r18_file, monkeypatch):
    path, state = r18_file
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / "tiny.yaml")]
    args += ["--model.encoder", "resnet18", "--model.encoder_weights", str(path), "--model.freeze_encoder", "true"]
    args += ["--data.image_size", "64", "--data.feature_cache", "true", "--data.cache_dtype", "float32"]
    args += ["--data.num_train", "16", "--data.num_val", "4", "--data.num_test", "4", "--trainer.max_steps", "2"]
    args += ["--model.max_decode_len", "5", "--test_after_fit", "false", "--trainer.num_sanity_val_steps", "0"]
    # the shapes of the training batches' inputs: the cache's (B,N,C) grids, not (B,3,H,W) images
    args += ["--trainer.callbacks+=record_inputs.RecordInputs", "--trainer.callbacks.path=inputs.json"]
    first = run_script(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((tmp_path / "inputs.json").read_text()) == [[8, 4, 512]] * 2  # 2x2 grid of 512 channels

    ckpt = torch.load(tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    weights = ckpt["state_dict"]
    assert weights["net.encoder.body.0.weight"][0, 0, 0, 0].item() == 0.75
    torch.testing.assert_close(weights["net.encoder.body.0.weight"], state["conv1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(weights["net.encoder.body.7.1.conv2.weight"], state["layer4.1.conv2.weight"])
    torch.testing.assert_close(weights["net.encoder.body.1.running_mean"], state["bn1.running_mean"])  # frozen BN
    assert ckpt["captioning"]["grid"] == [2, 2]  # 64 px through all four stages

    cache_dir = tmp_path / "data" / "cache"
    files = _files(cache_dir)
    assert len(files) == 3, files  # the cache, its description and the lock the ranks wait on
    (npy,) = [n for n in files if n.endswith(".npy")]
    assert npy[:-4] + ".lock" in files
    assert re.fullmatch(r"shapes-dataset_shapes-[0-9a-f]{8}-train-[0-9a-f]{16}\.npy", npy), npy
    assert npy[:-4] + ".json" in files
    meta = json.loads((cache_dir / (npy[:-4] + ".json")).read_text())
    # the cache holds features of the file's weights
    ref = TorchvisionEncoder("resnet18", stage=4, grid=None, freeze=True)
    load_encoder_weights(ref, str(path))
    assert meta["encoder_weights"] == encoder_fingerprint(ref)
    assert (meta["images"], meta["dtype"], meta["image_size"], meta["invalid"]) == (16, "float32", 64, [])

    second = run_script(*args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (tmp_path / "runs/tiny/version_1/checkpoints/last.ckpt").is_file()
    assert _files(cache_dir) == files  # reused: the same file, not rewritten
    assert "feature cache" not in second.stdout + second.stderr
    assert json.loads((tmp_path / "inputs.json").read_text()) == [[8, 4, 512]] * 3  # and read: one more batch


def test_load_encoder_weights_refuses_wrong_files_clearly(tmp_path, r18_file):
    path, _ = r18_file
    with pytest.raises(ValueError, match=rf"{path}: weights do not fit resnet34: missing \['4\.2\."):
        load_encoder_weights(TorchvisionEncoder("resnet34"), str(path))  # resnet34 has a 3rd block in layer1
    other = tmp_path / "small_cnn.pth"
    torch.save(SmallCNN().state_dict(), other)
    with pytest.raises(ValueError, match=rf"{other}: weights do not fit resnet18"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(other))
    text = tmp_path / "notes.pth"
    text.write_text("not a state dict")
    with pytest.raises(ValueError, match=rf"{text}: cannot load encoder weights"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(text))
    # InputErrors (train.py prints them as one line), and still the OSErrors they were
    with pytest.raises(FileNotFoundError, match="gone.pth: encoder weights file not found") as raised:
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(tmp_path / "gone.pth"))
    assert isinstance(raised.value, InputError)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path}: a folder, not an encoder weights file") as raised:
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(tmp_path))
    assert isinstance(raised.value, InputError)
    with pytest.raises(ValueError, match="need a torchvision encoder, not SmallCNN"):
        load_encoder_weights(SmallCNN(), str(path))


def test_weights_files_as_real_checkpoints_store_them_load_and_other_objects_are_named(tmp_path, r18_file):
    """Files as they come: a training checkpoint's "state_dict" / "model" entry, the "module." prefix of a
    DataParallel / DDP model, and no BatchNorm num_batches_tracked (files from before PyTorch 0.4.1, which
    load_state_dict itself accepts) were refused as "missing ['0.weight', ...]" or "missing [...
    num_batches_tracked]"; a file holding a list or a tensor was an AttributeError without the file's name."""
    path, state = r18_file
    ddp = {f"module.{k}": v for k, v in state.items()}
    files = {
        # as torchvision's reference scripts save it: their argparse options beside the weights
        "model.pth": {"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1, model="resnet18")},
        "ddp.pth": {"state_dict": ddp, "epoch": 3},
        "no_counters.pth": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        enc = TorchvisionEncoder("resnet18", stage=2, freeze=True)
        load_encoder_weights(enc, str(tmp_path / name))
        torch.testing.assert_close(enc.body[0].weight, state["conv1.weight"], atol=0, rtol=0)
        torch.testing.assert_close(enc.body[1].running_mean, state["bn1.running_mean"], atol=0, rtol=0)
        torch.testing.assert_close(enc.body[5][1].bn2.weight, state["layer2.1.bn2.weight"], atol=0, rtol=0)
    for name, obj in (("list.pth", [1, 2]), ("tensor.pth", torch.zeros(3)), ("numbers.pth", {"conv1.weight": 3})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{tmp_path / name}: not a state dict"):
            load_encoder_weights(TorchvisionEncoder("resnet18"), str(tmp_path / name))
    other = tmp_path / "lightning.ckpt"  # another prefix: the error shows the file's own keys
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, other)
    with pytest.raises(ValueError, match=rf"{other}: .*first: \['backbone.conv1.weight'"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(other))


def test_torchvision_weights_that_cannot_be_downloaded_or_do_not_exist_are_named(monkeypatch):
    """Offline, a torchvision weights name ended in urllib's bare "URLError: Name or service not known",
    naming neither the weights nor their URL; a missing file without a .pt/.pth/.bin suffix was only an
    "unknown weights" name."""
    import urllib.error

    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(
        OSError, match=r"DEFAULT: cannot get torchvision's resnet18 weights IMAGENET1K_V1 from https://"
    ) as raised:
        load_encoder_weights(TorchvisionEncoder("resnet18"), "DEFAULT")
    assert isinstance(raised.value, InputError)  # one line from train.py, not three chained tracebacks
    with pytest.raises(ValueError, match=r"'r101.ckpt' for resnet18: no such file, nor one of .*'IMAGENET1K_V1'"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), "r101.ckpt")


def test_weights_of_the_wrong_shape_name_the_file(tmp_path, r18_file):
    path, state = r18_file
    bottleneck = {**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}  # what resnet50 has there
    bad = tmp_path / "r50ish.pth"
    torch.save(bottleneck, bad)
    with pytest.raises(ValueError, match=rf"{bad}: weights do not fit resnet18"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(bad))


def test_weights_of_a_deeper_network_are_refused(tmp_path, r18_file):
    path, state = r18_file
    extra = {f"layer1.2.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("layer1.1.")}
    deeper = tmp_path / "r34ish.pth"
    torch.save({**state, **extra}, deeper)  # a third block in layer1, as resnet34 has
    with pytest.raises(ValueError, match=rf"{deeper}: weights do not fit resnet18"):
        load_encoder_weights(TorchvisionEncoder("resnet18"), str(deeper))


def test_features_that_overflow_float16_are_refused_not_stored_as_inf(tiny_shapes, tmp_path):
    paths = [r.image_path for r in _train_records(tiny_shapes, 2)]
    enc, small = _frozen_cnn(), EvalTransform(32)
    with torch.no_grad():
        enc.body[-1][0].weight.mul_(1e6)  # features far beyond float16's 65504
    cache = FeatureCache(tmp_path / "cache", "big-train", paths, enc, small)
    with pytest.raises(InputError, match="overflow float16; use data.cache_dtype float32"):  # a one-line error
        cache.build(enc, progress=False)
    assert not cache.exists() and not list((tmp_path / "cache").glob("*.tmp*"))
    ok = FeatureCache(tmp_path / "cache", "big-train", paths, enc, small, dtype="float32")
    ok.build(enc, progress=False)
    assert torch.isfinite(torch.from_numpy(ok.open()[0][:])).all()


# --- cache names: one per data source -----------------------------------------------------------------


def _module_with_trainer(
    annotations: Path, image_root: Path, cache_dir: Path, encoder, rank: int = 0, barrier=lambda name=None: None
) -> CaptionDataModule:
    """A data module as a Trainer sees it on DDP rank ``rank`` (by default the only process): the model's
    frozen encoder, and the strategy's ``barrier``."""
    dm = CaptionDataModule(
        "karpathy", str(annotations), str(image_root), image_size=32, cache_dir=str(cache_dir), feature_cache=True
    )
    module = SimpleNamespace(net=SimpleNamespace(encoder=encoder), device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(
        lightning_module=module,
        is_global_zero=rank == 0,
        global_rank=rank,
        strategy=SimpleNamespace(barrier=barrier),
        progress_bar_callback=None,
    )
    return dm


def test_two_sources_with_one_file_stem_keep_their_own_caches(tiny_shapes, tmp_path):
    """Two Karpathy files both called dataset.json, in two folders, with different images: each gets a
    cache of its own, and building one never removes the other's as stale. A changed source still
    replaces its own stale cache."""
    data = json.loads(tiny_shapes.read_text())
    sources = []
    for folder, take in (("a", slice(0, 8)), ("b", slice(8, 14))):
        path = tmp_path / folder / "dataset.json"
        path.parent.mkdir()
        path.write_text(json.dumps({**data, "images": [im for im in data["images"] if im["split"] == "train"][take]}))
        sources.append(path)
    enc, cache_dir = _frozen_cnn(), tmp_path / "cache"
    a = _module_with_trainer(sources[0], tiny_shapes.parent, cache_dir, enc)
    b = _module_with_trainer(sources[1], tiny_shapes.parent, cache_dir, enc)
    cache_a = a.train_features()
    cache_b = b.train_features()
    assert cache_a.exists() and cache_b.exists()
    assert cache_a.open()[0].shape[0] == 8 and cache_b.open()[0].shape[0] == 6
    assert len(list(cache_dir.glob("*.npy"))) == 2
    assert a.cache_name("train") != b.cache_name("train")
    assert a.cache_name("train").startswith("karpathy-dataset-") and a.cache_name("train").endswith("-train")

    # the same file read with another image root is another source too
    elsewhere = _module_with_trainer(sources[0], tmp_path / "elsewhere", cache_dir, enc)
    assert elsewhere.cache_name("train") != a.cache_name("train")

    # source a changed (an image fewer): its cache is rebuilt and its old one (only) removed
    edited = json.loads(sources[0].read_text())
    sources[0].write_text(json.dumps({**edited, "images": edited["images"][:7]}))
    rebuilt = _module_with_trainer(sources[0], tiny_shapes.parent, cache_dir, enc).train_features()
    assert rebuilt.file != cache_a.file and not cache_a.file.exists() and cache_b.exists()
    assert sorted(p.name for p in cache_dir.glob("*.npy")) == sorted([rebuilt.file.name, cache_b.file.name])


# --- DDP: the other ranks wait for rank 0's build on a lock file, not in a collective -----------------


def _two_ranks(tiny_shapes, cache_dir, monkeypatch, fail: bool = False):
    """Rank 0 and rank 1 (threads here: flock treats their lock files' descriptors as two processes do)
    ask for the training cache at once. Rank 0's build is held until rank 1 waits for it; the fake
    strategy's barrier records when it is called, and waits for both ranks as a collective does.
    Returns (events, what each rank's train_features returned or raised)."""
    events, results = [], {}
    gate, waiting = threading.Barrier(2), threading.Event()
    real_file_lock = features.file_lock

    def watched_file_lock(path, shared=False, wait_message=None):
        if shared:
            waiting.set()  # rank 1 goes to wait for the cache
        return real_file_lock(path, shared, wait_message)

    monkeypatch.setattr(features, "file_lock", watched_file_lock, raising=False)

    def encode(module, args):
        waiting.wait(timeout=60)  # only the old code, whose rank 1 waits in the barrier, lets this time out
        events.append("encode")
        if fail:
            raise RuntimeError("out of memory")

    encoders = [_frozen_cnn(), _frozen_cnn()]  # the same weights on both ranks (drawn here, not in the threads)

    def run(rank):
        enc = encoders[rank]
        if rank == 0:
            enc.register_forward_pre_hook(encode)

        def barrier(name=None):
            events.append(f"barrier {rank}")
            gate.wait(timeout=60)

        dm = _module_with_trainer(tiny_shapes, tiny_shapes.parent, cache_dir, enc, rank, barrier)
        try:
            results[rank] = dm.train_features()
        except Exception as e:
            results[rank] = e

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return events, results


def test_ranks_wait_for_rank_0s_cache_build_outside_any_collective(tiny_shapes, tmp_path, monkeypatch):
    """The one barrier is passed before the build starts, so no rank sits in a collective (with its
    30-minute timeout) while rank 0 encodes COCO; rank 1 gets the finished cache all the same."""
    events, results = _two_ranks(tiny_shapes, tmp_path / "cache", monkeypatch)
    assert isinstance(results[0], FeatureCache), results[0]
    assert isinstance(results[1], FeatureCache), results[1]
    assert sorted(events[:2]) == ["barrier 0", "barrier 1"] and set(events[2:]) == {"encode"}
    assert results[1].file == results[0].file and results[1].exists()
    assert results[1].open()[0].shape == (48, 16, 8)


def test_ranks_building_one_key_do_not_wait_for_another_runs_build_of_another_key(tiny_shapes, tmp_path):
    """Two runs on one source with other encoders: caches of one name, other keys. Both ranks of the second run
    waited on the name's lock for the first run's whole build, and its rank 1, taking the lock before its own
    rank 0 when the first run let go, found no cache of its key and stopped the run ("rank 0 failed")."""
    paths = [r.image_path for r in _train_records(tiny_shapes, 2)]
    folder = tmp_path / "cache"
    encoding, release = threading.Event(), threading.Event()
    first_enc = _frozen_cnn(0)

    def hold(module, args):  # the first run's encoder: stays mid-build until released
        encoding.set()
        release.wait(timeout=120)

    first_enc.register_forward_pre_hook(hold)
    first = FeatureCache(folder, "set-train", paths, first_enc, EvalTransform(32))
    enc = _frozen_cnn(1)
    caches = [FeatureCache(folder, "set-train", paths, enc, EvalTransform(32)) for _ in range(2)]
    assert caches[0].key != first.key
    gate, errors = threading.Barrier(2), []

    def run(cache, encoder, builder, barrier, r=0):
        try:
            cache.build_or_wait(encoder, builder=builder, barrier=barrier, rank=r, progress=False)
        except Exception as e:
            errors.append(e)

    other_run = threading.Thread(target=run, args=(first, first_enc, True, lambda: None))
    other_run.start()
    assert encoding.wait(timeout=60)  # the first run is building its key, holding its lock

    def barrier():
        gate.wait(timeout=60)

    ranks = [threading.Thread(target=run, args=(caches[r], enc, r == 0, barrier, r)) for r in (0, 1)]
    try:
        for t in ranks:
            t.start()
        for t in ranks:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in ranks), "the ranks waited for the other run's build"
        assert not errors and caches[1].exists()
    finally:
        release.set()
        for t in [*ranks, other_run]:
            t.join()
    # the first run's build ends after: its cache replaces the other key's, the same source's stale file
    assert not errors and first.exists() and not caches[1].exists()


def test_when_rank_0s_build_fails_the_other_ranks_stop_with_an_error_instead_of_waiting(
    tiny_shapes, tmp_path, monkeypatch
):
    events, results = _two_ranks(tiny_shapes, tmp_path / "cache", monkeypatch, fail=True)
    assert str(results[0]) == "out of memory"
    assert isinstance(results[1], RuntimeError)
    assert str(results[1]).endswith(
        "the feature cache was not written (rank 0 failed to build it: see its error; with "
        "several nodes, data.cache_dir must be a folder they all share)"
    )
    assert not list((tmp_path / "cache").glob("*.npy*"))  # nothing half-written left either


def test_a_resume_needs_no_weights_file_but_a_fresh_fit_names_the_missing_one(tmp_path, r18_file):
    """The checkpoint holds the encoder's weights: before, a resume loaded the file again (to be overwritten
    by the checkpoint) and stopped when it was gone."""
    source, state = r18_file
    path = tmp_path / "r18.pth"
    path.write_bytes(source.read_bytes())
    args = [str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / "tiny.yaml"), "--model.encoder", "resnet18"]
    args += ["--model.encoder_weights", str(path), "--model.freeze_encoder", "true", "--data.num_train", "16"]
    args += ["--data.num_val", "4", "--data.num_test", "4", "--trainer.limit_val_batches", "0"]
    args += ["--trainer.num_sanity_val_steps", "0", "--test_after_fit", "false", "--trainer.max_epochs", "10"]
    first = run_script(*args, "--trainer.max_steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2

    path.unlink()
    (tmp_path / "fresh").mkdir()
    # the resume and the fresh fit (refused) are independent: side by side, each in a folder of its own
    resumed = start_script(*args, "--trainer.max_steps", "3", "--ckpt_path", str(last), cwd=tmp_path)
    resumed, fresh = finish(resumed, start_script(*args, "--trainer.max_steps", "1", cwd=tmp_path / "fresh"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ckpts = [
        torch.load(p, map_location="cpu", weights_only=True) for p in tmp_path.glob("runs/tiny/*/checkpoints/last.ckpt")
    ]
    ckpt = max(ckpts, key=lambda c: c["global_step"])
    assert ckpt["global_step"] == 3
    # the frozen encoder still has the file's weights, restored from the checkpoint
    torch.testing.assert_close(ckpt["state_dict"]["net.encoder.body.0.weight"], state["conv1.weight"], atol=0, rtol=0)

    assert fresh.returncode != 0
    assert f"error: {path}: encoder weights file not found" in fresh.stderr.splitlines()  # one line
    assert "Traceback" not in fresh.stderr, fresh.stderr[-3000:]


def test_a_cache_the_disk_cannot_hold_is_refused_before_the_build_and_leaves_no_file(
    tiny_shapes, tmp_path, monkeypatch
):
    """The cache file is memory-mapped and sparse, so a disk too small for it failed only when the writes
    reached its end, deep into the build (hours for COCO); now the first batch's grid gives its size. The error
    names the folder (train.py prints it as one line)."""
    import collections

    from captioning.data import features

    paths = [r.image_path for r in _train_records(tiny_shapes, 4)]
    enc = _frozen_cnn()
    cache = FeatureCache(tmp_path / "cache", "set-train", paths, enc, EvalTransform(32))
    usage = collections.namedtuple("usage", "total used free")
    need = 4 * 16 * 8 * 2 + 4096  # 4 images x (4x4 grid) x 8 channels, float16; the .npy header, rounded up
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage(10**9, 0, need - 1))
    with pytest.raises(
        OSError, match=r"feature cache set-train needs 5,120 bytes \(0.0 GiB\), and this folder has 5,119 fr"
    ):
        cache.build(enc, progress=False)
    assert not cache.exists() and list((tmp_path / "cache").glob("*.npy*")) == []
    with pytest.raises(OSError) as info:
        cache.build(enc, progress=False)
    assert info.value.filename == str(tmp_path / "cache")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage(10**9, 0, need))
    cache.build(enc, progress=False)
    assert cache.exists()


def test_one_data_set_spelled_two_ways_has_one_cache_key(tmp_path, monkeypatch):
    """The key hashed the image paths as written: data/coco/... and its absolute path (or a symlinked folder) each
    found the other's cache stale and deleted it, so runs that alternated spellings re-encoded the set every time.
    A changed file still changes the key."""
    from captioning.data.features import dataset_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / name)
    os.symlink(tmp_path / "imgs", tmp_path / "linked")
    names = ["a.png", "b.png"]
    key = dataset_fingerprint([Path("imgs") / n for n in names])
    for folder in (tmp_path / "imgs", Path("imgs/sub/.."), Path("linked"), tmp_path / "linked"):
        assert dataset_fingerprint([folder / n for n in names]) == key, folder
    assert dataset_fingerprint([Path("imgs") / n for n in reversed(names)]) != key  # the order is the rows'
    Image.new("RGB", (9, 8)).save(tmp_path / "imgs" / "b.png")
    assert dataset_fingerprint([Path("imgs") / n for n in names]) != key


def test_a_long_annotation_file_name_still_makes_a_cache_file_name(tmp_path):
    """The whole stem went into the cache's file name: a legal 221-byte annotation name made the name, with its
    key, ".npy" and a temporary suffix, too long to create (OSError: File name too long)."""
    names = []
    for stem in ("k" * 221, "k" * 220 + "x", "é" * 110, os.fsdecode(b"caf\xe9" * 50)):  # the last not UTF-8
        path = tmp_path / f"{stem}.json"
        path.write_text("{}")
        names.append(CaptionDataModule(dataset="karpathy", annotations=str(path)).cache_name("train"))
    assert len(set(names)) == 4  # cut stems, told apart by the source's digest
    for name in names:
        assert len(f"{name}-0123456789abcdef.npy.tmp-123456".encode()) < 200, name
        (tmp_path / f"{name}-0123456789abcdef.npy.tmp-123456").write_bytes(b"")


class _Back:
    """Wraps _Images.__getitem__: once the last row is loaded, the missing file ``path`` appears (a copy of
    ``source``), as a drive back during the build."""

    def __init__(self, path: Path, source: Path):
        self.path, self.source = path, source

    def wrap(self, getitem):
        def loaded(images, i):
            out = getitem(images, i)
            if i == len(images) - 1:
                self.path.write_bytes(self.source.read_bytes())
            return out

        return loaded


def test_a_row_whose_file_could_not_be_read_is_built_again_once_it_can_and_other_precisions_build(
    tiny_shapes, tmp_path, capsys, monkeypatch
):
    """An image unreadable during the build (a drive away) left an empty row for good: the cache was complete, and
    reused without a word. Its file readable again, the cache is built again; an image refused for good (too many
    pixels) is not, and max_pixels, which decides which images are refused, is part of the key. An encoder in
    bfloat16 (trainer.precision bf16-true) failed on float32 images."""
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(_train_records(tiny_shapes, 2)):
        (images / f"{i}.png").write_bytes(r.image_path.read_bytes())
    paths = [images / "0.png", images / "1.png", images / "later.png"]  # the last one away during the build
    enc = _frozen_cnn()
    cache = FeatureCache(tmp_path / "c", "set-train", paths, enc, EvalTransform(32))
    cache.build(enc, progress=False)
    meta = json.loads(cache.meta_file.read_text())
    assert (meta["invalid"], meta["unreadable"]) == ([2], [2]) and cache.exists(recheck=True)
    (images / "later.png").write_bytes((images / "1.png").read_bytes())
    fresh = FeatureCache(tmp_path / "c", "set-train", paths, enc, EvalTransform(32))
    assert fresh.key != cache.key  # the file's size and time are in the key anyway; the old cache is checked too:
    assert not cache.exists(recheck=True) and "can be now (first: " in capsys.readouterr().out
    # only when deciding to build: an image that came back during the build is no failure of the build
    assert cache.exists()
    (images / "later.png").unlink()
    back = _Back(paths[2], images / "1.png")
    monkeypatch.setattr(features._Images, "__getitem__", back.wrap(features._Images.__getitem__))
    cache.file.unlink()
    cache.build_or_wait(enc, builder=True, barrier=lambda: None, batch_size=1, progress=False)
    assert cache.exists() and json.loads(cache.meta_file.read_text())["unreadable"] == [2]
    monkeypatch.undo()
    # refused for its size: a row left empty for good, and another key than the default's
    small = FeatureCache(tmp_path / "c", "set-train", paths[:2], enc, EvalTransform(32), max_pixels=10)
    assert small.key != FeatureCache(tmp_path / "c", "set-train", paths[:2], enc, EvalTransform(32)).key
    small.build(enc, progress=False)
    meta = json.loads(small.meta_file.read_text())
    assert (meta["invalid"], meta["unreadable"]) == ([0, 1], []) and small.exists()
    half = _frozen_cnn().to(torch.bfloat16)
    bf16 = FeatureCache(tmp_path / "h", "set-train", paths[:2], half, EvalTransform(32), dtype="float32")
    bf16.build(half, progress=False)
    feats, valid = bf16.open()
    assert valid.all() and np.isfinite(feats).all() and feats.any()


def test_a_disk_that_fills_while_the_cache_is_written_is_an_error_naming_it(tiny_shapes, tmp_path, monkeypatch):
    """The memory-mapped file is sparse: a disk that filled after the space check killed the process with SIGBUS
    (exit 135, no message). Its blocks are now taken before the features are written."""
    import errno

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate here")
    paths = [r.image_path for r in _train_records(tiny_shapes, 2)]
    enc = _frozen_cnn()
    cache = FeatureCache(tmp_path, "set-train", paths, enc, EvalTransform(32))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as info:
        cache.build(enc, progress=False)
    assert info.value.filename == str(cache.file) and info.value.errno == errno.ENOSPC
    assert not cache.exists() and not list(tmp_path.glob("*.tmp*"))


def test_a_data_module_serving_a_second_model_uses_that_models_cache_and_says_what_it_lacks(
    tiny_shapes, tmp_path, capsys
):
    """A data module reused for a second fit kept the first model's cache: the second model trained on the first
    one's features, and a model being fine-tuned trained from a frozen one's. Images without features are said at
    every use of the cache, not only by the build that found them."""
    data = json.loads(tiny_shapes.read_text())
    train = [im for im in data["images"] if im["split"] == "train"][:4]
    train[-1] = {**train[-1], "filename": "gone.png"}  # no such image: a row without features
    source = tmp_path / "dataset.json"
    source.write_text(json.dumps({**data, "images": train}))
    first, second = _frozen_cnn(0), _frozen_cnn(1)
    dm = _module_with_trainer(source, tiny_shapes.parent, tmp_path / "cache", first)
    dm.check_images = False  # the missing image reaches the cache's build
    a = dm.train_features()
    assert dm.train_features() is a
    assert "1 of 4 training images have no features" in capsys.readouterr().out
    dm.trainer.lightning_module.net.encoder = second
    b = dm.train_features()
    assert b is not a and b.key != a.key and b.exists()
    assert "1 of 4 training images have no features" in capsys.readouterr().out
    dm.trainer.lightning_module.net.encoder = SmallCNN((8, 8, 8, 8), freeze=False)
    with pytest.raises(InputError, match="needs a frozen encoder"):
        dm.train_features()
