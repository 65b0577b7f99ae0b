"""Safe checkpoints and bad input: refused with the file and the cause, never run, never lost."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from captioning.checkpoint_io import CheckpointError, atomic_torch_save, load_weights_only
from captioning.errors import InputError
from captioning.inference import Captioner

from conftest import ROOT, TINY, finish, run_script, start_script


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, tiny_ckpt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["extra"] = _Payload(marker)
    torch.save(ckpt, evil)
    with pytest.raises(CheckpointError, match="untrusted") as e:
        Captioner.from_checkpoint(evil)
    assert str(evil) in str(e.value)
    # training's resume path refuses it too
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), "--ckpt_path", str(evil), cwd=tmp_path)
    assert proc.returncode != 0 and "untrusted" in proc.stderr
    assert not marker.exists()


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, tiny_ckpt, tiny_shapes):
    """A fixture made by rewriting the storage locations of a checkpoint to "cuda:0", as a GPU
    run writes them; loading must map them to the CPU (this machine has no CUDA device)."""
    cuda_ckpt = tmp_path / "cuda.ckpt"
    with zipfile.ZipFile(tiny_ckpt) as src, zipfile.ZipFile(cuda_ckpt, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"cpu" in data
                data = data.replace(b"\x58\x03\x00\x00\x00cpu", b"\x58\x06\x00\x00\x00cuda:0")
            dst.writestr(item, data)
    assert b"cuda:0" in zipfile.ZipFile(cuda_ckpt).read(
        next(n for n in zipfile.ZipFile(cuda_ckpt).namelist() if n.endswith("data.pkl"))
    )
    image = tiny_shapes.parent / "images" / "000003.png"
    assert (
        Captioner.from_checkpoint(cuda_ckpt).caption(image).text
        == Captioner.from_checkpoint(tiny_ckpt).caption(image).text
    )


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_weights_only(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save_and_a_full_disk_names_the_file(tmp_path, capsys):
    """A save killed mid-write (SIGKILL: no clean-up runs) left its checkpoint-sized temporary file for good; a full
    disk was a traceback ending in "[Errno 28] No space left on device", naming no file."""
    import errno
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    killed = textwrap.dedent(f"""
        import os, signal, torch
        from captioning.checkpoint_io import atomic_torch_save
        def die(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = die
        atomic_torch_save({{"step": 2}}, {str(path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", killed], cwd=ROOT).returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(left) == 1 and left[0].startswith(".last.ckpt.tmp."), left
    atomic_torch_save({"step": 3}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and load_weights_only(path)["step"] == 3
    assert f"removed {tmp_path / left[0]}, left by a checkpoint save that was killed" in capsys.readouterr().err

    # a write the file system refuses (past a file size limit, as a full disk does): PyTorch's archive writer made it a
    # RuntimeError, "unexpected pos 704 vs 598"
    too_large = textwrap.dedent(f"""
        import resource, signal, torch
        from captioning.checkpoint_io import atomic_torch_save
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_torch_save({{"w": torch.zeros(100_000)}}, {str(path)!r})
        except OSError as e:
            print(e.errno, e.filename, e.strerror)
    """)
    proc = subprocess.run([sys.executable, "-c", too_large], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split(" ", 2)[:2] == [str(errno.EFBIG), str(path)], proc
    assert proc.stdout.strip().endswith("File too large: checkpoint not written, the file there is kept"), proc
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and load_weights_only(path)["step"] == 3


def test_a_corrupt_checkpoint_is_named_corrupt_not_untrusted(tmp_path, monkeypatch):
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip pickle format: damage reaches the unpickler itself
    torch.save({"step": 1}, legacy, _use_new_zipfile_serialization=False)
    data = bytearray(legacy.read_bytes())
    data[-3] = 0xFF  # an opcode the unpickler does not know
    legacy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_weights_only(legacy)
    assert str(legacy) in str(e.value) and "untrusted" not in str(e.value)
    # whatever a damaged archive raises inside torch.load, the error names the file
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"step": 1}, good)
    for exc in (KeyError("data/0"), IndexError("list index out of range"), UnicodeDecodeError("utf-8", b"", 0, 1, "x")):
        monkeypatch.setattr(torch, "load", lambda *a, _exc=exc, **k: (_ for _ in ()).throw(_exc))
        with pytest.raises(CheckpointError, match=f"{good}: not a readable checkpoint, truncated or corrupt"):
            load_weights_only(good)


def test_a_checkpoint_with_damaged_metadata_is_an_error_naming_the_file(tmp_path, tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for damage in ("preprocess", "vocab", "grid"):
        broken = dict(ckpt, captioning={k: v for k, v in ckpt["captioning"].items() if k != damage})
        path = tmp_path / f"no-{damage}.ckpt"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=f"{path}: the captioning metadata is incomplete.*{damage}"):
            Captioner.from_checkpoint(path)
    wrong = dict(ckpt, captioning={**ckpt["captioning"], "grid": [4, 4]})  # the tiny run's encoder gives 8x8
    torch.save(wrong, tmp_path / "grid.ckpt")
    with pytest.raises(CheckpointError, match=r"grid.ckpt: its grid \[4, 4\] is not the 8x8 grid its encoder gives 64"):
        Captioner.from_checkpoint(tmp_path / "grid.ckpt")


def test_an_old_transformer_checkpoint_searching_past_its_position_table_is_cut_with_a_warning(tmp_path):
    """Training now refuses max_decode_len > max_len; a checkpoint written before that would make inference
    step past the transformer's position table (an IndexError mid-search): it is cut to the table instead."""
    from captioning.models.net import CaptionNet
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    model = {"decoder": "transformer", "hidden_dim": 16, "num_heads": 2, "num_layers": 1, "max_len": 5}
    model.update(encoder_channels=(8, 8, 8, 8), tie_embeddings=False)
    vocab = [*SPECIALS, "red", "circle"]
    net = CaptionNet(len(vocab), **model)
    with torch.no_grad():  # a model that never ends: "red" at every step, as many as the search allows
        net.decoder.norm.weight.zero_()  # the final norm gives a vector of ones whatever it reads
        net.decoder.norm.bias.fill_(1.0)
        net.decoder.out.weight.zero_()
        net.decoder.out.weight[len(SPECIALS)] = 1.0
    path = tmp_path / "old.ckpt"
    meta = {"vocab": vocab, "model": model, "grid": [8, 8], "search": {"beam_size": 2, "max_len": 9}}
    meta["preprocess"] = {"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save({"captioning": meta, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    with pytest.warns(UserWarning, match=r"search length \(9\) is more than .* \(5\); captions are cut at 5"):
        captioner = Captioner.from_checkpoint(path)
    caption = captioner.caption(Image.new("RGB", (64, 64), (200, 60, 60)))
    assert caption.tokens == ["red"] * 5 and caption.attention.shape[0] == 5


def test_checkpoints_are_written_with_the_usual_permissions(tmp_path, monkeypatch):
    """mkstemp makes 0600 files: a checkpoint must get what open() would give (umask), or keep the old file's; and
    its temporary file never allows more than the checkpoint will (a 0600 one was 0644 for a moment)."""
    old = os.umask(0o022)
    try:
        atomic_torch_save({"step": 1}, tmp_path / "new.ckpt")
        assert (tmp_path / "new.ckpt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.ckpt").chmod(0o640)
        atomic_torch_save({"step": 2}, tmp_path / "new.ckpt")
        assert (tmp_path / "new.ckpt").stat().st_mode & 0o777 == 0o640
        (tmp_path / "new.ckpt").chmod(0o600)
        created = []
        real_open = os.open

        def watched(path, flags, mode=0o777, *a, **k):
            fd = real_open(path, flags, mode, *a, **k)
            if flags & os.O_CREAT:
                created.append(os.fstat(fd).st_mode & 0o777)
            return fd

        monkeypatch.setattr(os, "open", watched)
        atomic_torch_save({"step": 3}, tmp_path / "new.ckpt")
        monkeypatch.undo()
        assert created == [0o600] and (tmp_path / "new.ckpt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_resuming_from_a_missing_checkpoint_is_an_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    given, last = tmp_path / "given", tmp_path / "last"
    given.mkdir(), last.mkdir()
    # two independent runs, side by side, each in a folder of its own
    args = [str(ROOT / "train.py"), "fit", "-c", str(TINY), "--ckpt_path"]
    proc, proc_last = finish(start_script(*args, str(missing), cwd=given), start_script(*args, "last", cwd=last))
    assert proc.returncode != 0
    assert f"{missing}: checkpoint not found" in proc.stderr
    assert proc_last.returncode != 0
    assert "no last.ckpt under runs/tiny/" in proc_last.stderr  # the config's runs folder
    for cwd in (given, last):
        assert not (cwd / "runs").exists()  # no fresh run was started


def test_ckpt_path_last_is_the_newest_of_this_configs_runs(tmp_path, monkeypatch):
    """`--ckpt_path last` took the newest last.ckpt anywhere under runs/: with an LSTM config it resumed another
    experiment's Transformer (a newer run under runs/tiny_tf) and trained it in a new folder of its own."""
    from jsonargparse import Namespace

    from captioning.cli import resolve_ckpt_path, runs_folder

    monkeypatch.chdir(tmp_path)
    ckpt = {"state_dict": {}, "pytorch-lightning_version": "2.6.0"}
    for name in ("tiny", "tiny_tf"):  # tiny_tf's written last: the newest
        folder = tmp_path / "runs" / name / "version_0" / "checkpoints"
        folder.mkdir(parents=True)
        torch.save(ckpt, folder / "last.ckpt")
        os.utime(folder / "last.ckpt", (1e9 + len(name), 1e9 + len(name)))

    def logged(**init_args):
        logger = Namespace(class_path="pytorch_lightning.loggers.CSVLogger", init_args=Namespace(**init_args))
        return Namespace(trainer=Namespace(logger=logger))

    config = logged(save_dir="runs", name="tiny")
    assert runs_folder(config) == Path("runs/tiny")
    assert resolve_ckpt_path("last", "fit", runs_folder(config))[0] == "runs/tiny/version_0/checkpoints/last.ckpt"
    assert runs_folder(logged(save_dir="runs", name="")) == Path("runs")  # no name: the save_dir itself
    assert runs_folder(Namespace(trainer=Namespace(logger=True))) == Path("runs")
    assert resolve_ckpt_path("last", "fit")[0] == "runs/tiny_tf/version_0/checkpoints/last.ckpt"
    # "best" likewise: Lightning's own meant the best model of a fit in this process, and a fresh test stopped in a
    # traceback (after the data scan) saying no ModelCheckpoint was configured to save it
    with pytest.raises(SystemExit, match=r"error: ckpt_path best: no best.ckpt under runs/tiny/$"):
        resolve_ckpt_path("best", "test", runs_folder(config))
    torch.save(ckpt, tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "best.ckpt")
    assert resolve_ckpt_path("best", "test", runs_folder(config))[0] == "runs/tiny/version_0/checkpoints/best.ckpt"


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-at-once", "checked-one-step-late"])
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, deferred):
    """On a GPU the loss is read one step late (no wait for the GPU at every step); run here on the CPU, that stops
    the run with the same message, naming the same step, and keeps the checkpoints of the epoch before, finite.
    Step 7's optimizer step gets an inf gradient (its loss is finite), so the weights are NaN from then on and the
    loss of step 8, in the second epoch of 6 steps, is the first that is not finite."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["fit", "-c", str(TINY), "--trainer.max_steps", "40", "--trainer.max_epochs", "10"]
    args += ["--trainer.check_val_every_n_epoch", "1", "--test_after_fit", "false", "--trainer.gradient_clip_val", "0"]
    args += ["--trainer.callbacks+=inf_grad.InfGradAtStep", "--trainer.callbacks.step=7"]
    args += ["--trainer.callbacks+=defer_loss_check.DeferLossCheck"] if deferred else []
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    # one line, not a traceback through Lightning's loops
    assert proc.stderr.strip().splitlines()[-1].startswith("error: loss is nan at step 8: the run stopped, its "), (
        proc.stderr[-3000:]
    )
    assert "Traceback" not in proc.stderr
    checkpoints = sorted(tmp_path.glob("runs/tiny/*/checkpoints/*.ckpt"))
    assert [c.name for c in checkpoints] == ["best.ckpt", "last.ckpt"], checkpoints
    for ckpt in checkpoints:
        saved = load_weights_only(ckpt)
        assert saved["global_step"] == 6, ckpt  # the first epoch's end, before the bad step
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()), ckpt


def test_a_loss_read_one_step_late_stops_the_next_step_and_any_save_before_it_runs():
    """The deferred check (a GPU's) as the module sees it: a NaN loss at step 3 lets that step return, then stops
    the next training step before it computes anything, or a checkpoint save, or a validation, naming step 3."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    m = CaptionModule(vocab=[*SPECIALS, *"abcdefgh"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    m._DEFERRED_LOSS_CHECK = ("cpu",)
    m._trainer = types.SimpleNamespace(world_size=1, global_step=3, accumulate_grad_batches=1)
    m.log = lambda *a, **kw: None
    tokens = torch.tensor([[[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]]).repeat(2, 1, 1)  # (2 images, 2 captions, L)
    good, nan = torch.randn(2, 3, 64, 64), torch.full((2, 3, 64, 64), float("nan"))
    m.training_step((good, tokens, 0), 0)
    m._trainer.global_step = 4
    m.training_step((good, tokens, 0), 1)  # the finite loss of step 3 is read here and passes
    next_step = lambda: m.training_step((good, tokens, 0), 2)  # noqa: E731
    for then in (next_step, lambda: m.on_save_checkpoint({}), m.on_validation_start):
        m._trainer.global_step = 4
        assert not torch.isfinite(m.training_step((nan, tokens, 0), 1))  # returned, not read yet
        m._trainer.global_step = 5
        with pytest.raises(FloatingPointError, match=r"^loss is nan at step 4$"):
            then()
    m.on_train_end()  # read once: nothing left to raise


def test_weights_made_non_finite_by_a_step_with_a_finite_loss_are_never_checkpointed(tmp_path, monkeypatch):
    """An inf gradient at the last step of epoch 1 (steps 6-11; the loss itself finite) makes AdamW write NaN
    weights. Before, the checkpoints of that epoch's end were written with them (best.ckpt and last.ckpt both
    NaN, the run then stopping at the next step's loss); now the save is refused naming the step, and the
    checkpoints on disk are still epoch 0's, finite."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["fit", "-c", str(TINY), "--trainer.max_steps", "18", "--trainer.max_epochs", "3"]
    args += ["--test_after_fit", "false", "--trainer.callbacks+=inf_grad.InfGradAtStep", "--trainer.callbacks.step=11"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "weights are not finite at step 12" in proc.stderr, proc.stderr[-3000:]
    ckpts = sorted(tmp_path.glob("runs/tiny/*/checkpoints/*.ckpt"))
    assert [p.name for p in ckpts] == ["best.ckpt", "last.ckpt"]
    for ckpt in ckpts:
        loaded = load_weights_only(ckpt)
        assert loaded["global_step"] == 6, ckpt
        assert all(torch.isfinite(v).all() for v in loaded["state_dict"].values() if v.is_floating_point()), ckpt


def test_infer_reports_every_bad_input_and_still_captions_the_good_ones(tmp_path, tiny_ckpt):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 60, 60)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (10, 200, 30)).save(buf, "JPEG", quality=95)
    truncated.write_bytes(buf.getvalue()[:300])
    folder = tmp_path / "a_folder"
    folder.mkdir()
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    missing = tmp_path / "missing.png"
    url = "https://example.com/cat.jpg"
    inputs = [good, empty, text, truncated, folder, missing, url, big]
    args = [str(p) for p in inputs] + ["--ckpt", str(tiny_ckpt), "--max-pixels", "50000", "--out", str(tmp_path)]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{good}: ") and (tmp_path / "good_attention.png").is_file()
    causes = {
        empty: "empty file",
        text: "not an image",
        truncated: "cannot decode",
        folder: "is a directory",
        missing: "no such file",
        url: "URLs are not fetched",
        big: "over the limit",
    }
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(causes)
    for path, cause in causes.items():
        assert any(line.startswith(f"error: {path}: ") and cause in line for line in errors), (path, errors)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device is there")
def test_infer_refuses_a_device_or_out_folder_it_cannot_use_with_a_clear_error(tmp_path, tiny_ckpt):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    (tmp_path / "taken").write_text("a file, not a folder")
    infer = [str(ROOT / "infer.py"), str(image), "--ckpt", str(tiny_ckpt)]
    devices = [("cuda", "no CUDA device here"), ("gpu", "not a device")]
    beams = ("0", "-1")  # 0 fell back to the checkpoint's beam, -1 crashed in torch.arange
    # independent runs, side by side
    started = [start_script(*infer, "--device", device, cwd=tmp_path) for device, _ in devices]
    started.append(start_script(*infer, "--out", "taken", cwd=tmp_path))
    started += [start_script(*infer, "--beam-size", beam, cwd=tmp_path) for beam in beams]
    # a file name where the overlays' folder goes: it became a folder named overlay.png
    started.append(start_script(*infer, "--out", "overlay.png", cwd=tmp_path))
    # nan and inf crashed the search in a traceback; --max-pixels 0 meant the default limit, -5 refused every image
    numbers = [("--length-penalty", "nan", "a finite number"), ("--length-penalty", "inf", "a finite number")]
    numbers += [("--max-pixels", "0", "at least 1"), ("--max-pixels", "-5", "at least 1")]  # (flag, value, rule)
    started += [start_script(*infer, flag, value, cwd=tmp_path) for flag, value, _ in numbers]
    done = finish(*started)
    for (device, cause), proc in zip(devices, done[:2]):
        assert proc.returncode == 2 and f"error: --device {device}: {cause}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = done[2]
    assert proc.returncode == 2 and "error: --out taken: cannot make that folder" in proc.stderr, proc.stderr
    for beam, proc in zip(beams, done[3:5], strict=True):
        assert proc.returncode == 2 and f"--beam-size must be at least 1, got {beam}" in proc.stderr, proc.stderr
    proc = done[5]
    assert proc.returncode == 2 and "--out overlay.png: names an image file" in proc.stderr, proc.stderr
    assert not (tmp_path / "overlay.png").exists()
    for (flag, value, rule), proc in zip(numbers, done[6:], strict=True):
        assert proc.returncode == 2 and f"{flag} must be {rule}, got {value}" in proc.stderr, proc.stderr
    captioner = Captioner.from_checkpoint(tiny_ckpt)
    for bad in (
        lambda: captioner.caption(image, beam_size=0),
        lambda: Captioner.from_checkpoint(tiny_ckpt, beam_size=0),
    ):
        with pytest.raises(ValueError, match="beam_size must be at least 1, got 0"):
            bad()


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("search", "beam_size", 0),
        ("search", "beam_size", "3"),
        ("search", "max_len", 0),
        ("search", "max_len", 2.5),
        ("search", "length_penalty", float("nan")),
        ("preprocess", "std", [0.0, 0.0, 0.0]),
        ("preprocess", "mean", [0.5, 0.5]),
    ],
)
def test_a_checkpoints_malformed_search_or_preprocessing_settings_are_named_with_the_file(
    tmp_path, tiny_ckpt, section, key, value
):
    """A damaged or hand-edited checkpoint's search settings raised the search's own ValueError or a TypeError at
    load, and its mean and std torchvision's error at the first image: tracebacks that named no file (infer.py
    exited 1 in one, where a malformed vocabulary or grid is its one-line error, exit 2)."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["captioning"][section][key] = value
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(bad))}: its stored search or preprocessing settings"):
        Captioner.from_checkpoint(bad)
    # the caller's settings replace the stored ones, and their own errors blame them, not the file
    with pytest.raises(ValueError, match="^beam_size must be at least 1, got 0$"):
        Captioner.from_checkpoint(tiny_ckpt, beam_size=0)


def test_whole_numbers_of_any_type_are_search_settings(tmp_path, tiny_ckpt):
    """Checking the settings' types refused what had worked: a numpy integer beam size from the caller, a stored
    max_len of 12.0. Whole numbers of any type are taken; 2.5 and "3" are not."""
    import numpy as np

    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["captioning"]["search"]["max_len"] = 12.0
    stored = tmp_path / "float.ckpt"
    torch.save(ckpt, stored)
    captioner = Captioner.from_checkpoint(stored, beam_size=np.int64(2), length_penalty=np.float32(0.5))
    assert (captioner.beam_size, captioner.max_len, captioner.length_penalty) == (2, 12, 0.5)
    assert type(captioner.beam_size) is int and type(captioner.max_len) is int
    image = Image.new("RGB", (64, 64))
    assert captioner.caption(image, beam_size=torch.tensor(1)).tokens == captioner.caption(image, beam_size=1).tokens
    # caption_batch's batch_size likewise: 2.0 failed inside range(), True was a batch of 1
    three = [image, Image.new("RGB", (64, 64), "white"), image]
    assert [c.tokens for c in captioner.caption_batch(three, batch_size=2.0)] == [
        c.tokens for c in captioner.caption_batch(three, batch_size=np.int64(2))
    ]
    for bad, message in [(True, "a whole number, got True"), (0, "at least 1, got 0"), ("2", "a whole number")]:
        with pytest.raises(ValueError, match=f"^batch_size must be {message}"):
            captioner.caption_batch(three, batch_size=bad)
    refused = [(dict(beam_size=2.5), "beam_size must be a whole number, got 2.5")]
    refused.append((dict(length_penalty="0.6"), "length_penalty must be a finite number, got '0.6'"))
    refused.append((dict(beam_size=True), "beam_size must be a whole number, got True"))
    refused.append((dict(beam_size=torch.tensor(True)), r"beam_size must be a whole number, got tensor\(True\)"))
    numpy_true = re.escape(f"beam_size must be a whole number, got {np.bool_(True)!r}")
    refused.append((dict(beam_size=np.bool_(True)), numpy_true))
    for bad, message in refused:
        with pytest.raises(ValueError, match=message):
            Captioner.from_checkpoint(tiny_ckpt, **bad)


def test_inference_does_not_import_lightning():
    code = "import sys, captioning.inference, captioning.visualize; print('lightning' in ' '.join(sys.modules))"
    proc = run_script("-c", code, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_resuming_with_other_data_or_config_names_both_sides(tmp_path, tiny_ckpt):
    other_vocab = ["--data.min_word_freq", "100"]  # most words become <unk>: a different vocabulary
    proc = run_script(
        str(ROOT / "train.py"), "fit", "-c", str(TINY), "--ckpt_path", str(tiny_ckpt), *other_vocab, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert f"error: {tiny_ckpt}: vocabulary mismatch: the checkpoint has" in proc.stderr, proc.stderr[-2000:]
    assert "the data gives" in proc.stderr and "Traceback" not in proc.stderr
    assert "Epoch 0" not in proc.stdout
    # weights that do not fit the stored configuration: refused at load, naming the file
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["captioning"]["model"]["hidden_dim"] = 48
    wrong = tmp_path / "wrong.ckpt"
    torch.save(ckpt, wrong)
    with pytest.raises(CheckpointError, match="weights do not match the stored model configuration") as e:
        Captioner.from_checkpoint(wrong)
    assert str(wrong) in str(e.value)


def test_testing_a_checkpoint_on_images_prepared_otherwise_is_refused_naming_both_sides(tmp_path, tiny_ckpt):
    """Image size, mean and std come from the data options: `test --ckpt_path` with a checkpoint trained
    at another image size, or with another --data.mean, scored the model on images it was not trained on,
    silently."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["captioning"]["preprocess"]["image_size"] = 48  # as if trained at 48 px (the tiny config says 64)
    trained_at_48 = tmp_path / "at48.ckpt"
    torch.save(ckpt, trained_at_48)
    args = ["test", "-c", str(TINY), "--ckpt_path", str(trained_at_48), "--data.mean", "[0.5, 0.5, 0.5]"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "image preprocessing mismatch (image_size: checkpoint 48 vs data 64, mean: checkpoint [0.485" in proc.stderr
    assert "to match the checkpoint pass --data.image_size 48 --data.mean [0.485" in proc.stderr
    assert "test/" not in proc.stdout  # nothing was scored
    assert not list(tmp_path.glob("runs/tiny/version_*"))  # nor a run directory left holding only its config


@pytest.mark.parametrize("case", ["never_ends", "ends_at_once", "wide_beam"])
def test_decoding_edge_cases_still_give_captions_and_overlays(tmp_path, tiny_ckpt, tiny_shapes, case):
    from captioning.data.images import load_image
    from captioning.visualize import attention_figure
    from captioning.vocab import Vocabulary

    captioner = Captioner.from_checkpoint(tiny_ckpt)
    out = captioner.net.decoder.out
    with torch.no_grad():
        if case == "never_ends":  # the model can only say <unk>
            out.bias.fill_(-1e4)
            out.bias[Vocabulary.unk_id] = 1e4
        elif case == "ends_at_once":
            out.bias.fill_(-1e4)
            out.bias[Vocabulary.end_id] = 1e4
    beam = 10 * len(captioner.vocab) if case == "wide_beam" else 3
    image = load_image(tiny_shapes.parent / "images" / "000004.png")
    cap = captioner.caption(image, beam_size=beam)
    if case == "never_ends":
        assert cap.tokens == ["<unk>"] * captioner.max_len
    if case == "ends_at_once":
        assert cap.tokens == [] and cap.text == ""
    assert cap.attention.shape == (len(cap.tokens), 8, 8)
    attention_figure(image, cap.tokens, cap.attention, centres=cap.centres).save(tmp_path / "overlay.png")
    assert Image.open(tmp_path / "overlay.png").size[0] > 0


def test_train_py_offers_only_the_subcommands_it_supports(tmp_path):
    """No `predict` (the module has no predict_step; infer.py captions new images): argparse refuses
    it up front instead of Lightning failing after loading the data and the model."""
    proc = run_script(str(ROOT / "train.py"), "predict", "-c", str(TINY), cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'predict'" in proc.stderr and "'fit', 'validate', 'test'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lightnings_optimizer_flags_are_refused_and_scoring_without_a_checkpoint_is_said(tmp_path):
    """--optimizer SGD replaced the module's AdamW, its groups and schedule (model.lr, encoder_lr, weight_decay
    then ignored) behind one Lightning warning; validate or test without --ckpt_path scored random weights and
    wrote their metrics without a word."""
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), "--optimizer", "SGD", cwd=tmp_path)
    assert proc.returncode == 2 and "--optimizer is not supported" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    proc = run_script(str(ROOT / "train.py"), "validate", "-c", str(TINY), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: validate without --ckpt_path scores an untrained model" in proc.stderr
    assert f"run directory: {(tmp_path / 'runs' / 'tiny' / 'version_0').resolve()}" in proc.stdout


def test_a_subcommand_without_a_config_starts_from_the_default_recipe(tmp_path):
    """`python train.py fit --flag ...` is the default recipe (runs/shapes, best/last checkpoints, seed)
    with the flags applied, not Lightning's bare defaults (lightning_logs/, no best.ckpt for infer.py)."""
    from captioning.cli import DEFAULT_CONFIG, with_default_config

    assert with_default_config(["fit", "--trainer.max_epochs", "3"]) == [
        "fit", "--config", str(DEFAULT_CONFIG), "--trainer.max_epochs", "3"
    ]  # fmt: skip
    for argv in (["fit", "-c", "x.yaml"], ["test", "--config=x.yaml", "--ckpt_path", "a"], ["--help"], []):
        assert with_default_config(argv) == argv
    proc = run_script(str(ROOT / "train.py"), "fit", "--trainer.max_epochs", "3", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no --config given: shapes.yaml is the base" in proc.stderr
    out = proc.stdout
    assert (
        "max_epochs: 3" in out and "save_dir: runs" in out and "filename: best" in out and "seed_everything: 0" in out
    )


def test_flags_without_a_subcommand_are_fits(tmp_path):
    """`python train.py` alone is fit; `python train.py -c configs/tiny.yaml` or `--trainer.max_epochs 3` failed as
    "invalid choice: '3' (choose from 'fit', 'validate', 'test')", and `--print_config` as "expected subcommand"."""
    from captioning.cli import with_subcommand

    fit = ["fit", "-c", "x.yaml", "--trainer.max_epochs", "3"]
    assert with_subcommand(fit[1:]) == fit
    for argv in (["--help"], ["-h"], [], ["test", "-c", "x.yaml"], ["-c", "x.yaml", "validate"], ["predict"]):
        assert with_subcommand(argv) == argv
    # a flag's value that is a subcommand's name is no subcommand (a review's run named its logger "test")
    named = ["-c", "x.yaml", "--trainer.logger.init_args.name", "test", "--data.batch_size=4"]
    assert with_subcommand(named) == ["fit", *named]
    # a config whose top level is subcommands picks one itself (LightningCLI's root config) when it is all there is;
    # with flags too, its subcommand goes after the root configs (`-c root.yaml --x 1` failed as "invalid choice")
    root, flat = tmp_path / "root.yaml", tmp_path / "flat.yaml"
    root.write_text("test:\n  trainer:\n    max_steps: 2\n")
    (tmp_path / "root2.yaml").write_text("test:\n  trainer:\n    max_steps: 3\n")
    flat.write_text("trainer:\n  max_steps: 2\n")
    assert with_subcommand(["-c", str(root)]) == ["-c", str(root)]
    assert with_subcommand([f"--config={root}", "--x", "1"]) == [f"--config={root}", "test", "--x", "1"]
    assert with_subcommand(["-c", str(root), "--x", "1", "-c", str(flat)]) == [
        "-c", str(root), "test", "--x", "1", "-c", str(flat)
    ]  # fmt: skip
    # moved behind the root config, they would override it; the parser said "invalid choice: '1'"
    for first in (["--x", "1"], ["-c", str(flat)]):
        with pytest.raises(InputError, match=rf"^{re.escape(str(root))}: a root config \(its top level test:\) goes "):
            with_subcommand([*first, "-c", str(root), "--y", "2"])
    with pytest.raises(InputError, match=rf"^{re.escape(str(root))}: a root config"):  # the late one is named
        with_subcommand(["-c", str(tmp_path / "root2.yaml"), "--x", "1", "-c", str(root)])
    (tmp_path / "both.yaml").write_text("fit: {}\ntest: {}\n")
    with pytest.raises(InputError, match="both.yaml: the root configs name fit and test: give the subcommand after"):
        with_subcommand(["-c", str(tmp_path / "both.yaml"), "--x", "1"])
    # --print_config is the root parser's too: before or among the root configs, the subcommand goes after it
    for printed in (["--print_config", "-c", str(root)], ["-c", str(root), "--print_config=skip_null"]):
        assert with_subcommand(printed) == printed
        assert with_subcommand([*printed, "--x", "1"]) == [*printed, "test", "--x", "1"]
    assert with_subcommand(["-c", str(flat)]) == ["fit", "-c", str(flat)]
    (tmp_path / "tiny_root.yaml").write_text(yaml.safe_dump({"fit": yaml.safe_load(TINY.read_text())}))
    proc = run_script(
        str(ROOT / "train.py"), "-c", str(tmp_path / "tiny_root.yaml"), "--trainer.max_steps", "1", "--print_config",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no subcommand given: fit" in proc.stderr and "no --config given" not in proc.stderr
    assert "max_steps: 1" in proc.stdout and "name: tiny" in proc.stdout and "hidden_dim: 32" in proc.stdout
    proc = run_script(str(ROOT / "train.py"), "--trainer.max_epochs", "3", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no subcommand given: fit" in proc.stderr and "no --config given: shapes.yaml is the base" in proc.stderr
    assert "max_epochs: 3" in proc.stdout and "save_dir: runs" in proc.stdout


def test_an_unknown_option_is_said_in_a_few_lines(capsys):
    """argparse's usage listed every option, ~110 lines, above the line that says which flag was wrong."""
    from captioning.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", str(TINY), "--model.beamsize", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 4 and err[-1] == "error: unrecognized arguments: --model.beamsize 3", err
    assert err[0].startswith("usage: train.py fit [-c CONFIG]"), err


def test_a_config_file_that_is_not_yaml_and_refused_trainer_options_are_said_in_one_line(tmp_path, monkeypatch, capsys):
    """A YAML syntax error was several lines naming no file ("<unicode string>"), so with two -c it was not said
    which; accumulate_grad_batches 0 was a ZeroDivisionError in the schedule, an invalid strategy name, a
    val_check_interval past an epoch and a logger's save_dir that is a file Lightning's ValueError or OSError:
    tracebacks of 30-45 lines, the README promising one line naming the option."""
    from captioning.cli import main

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: [1\nmodel: {\n")
    (tmp_path / "latin1.yaml").write_bytes(b"trainer:\n  max_steps: 2 # caf\xe9\n")
    (tmp_path / "bell.yaml").write_text("trainer:\n  max_steps: \x07\n")
    (tmp_path / "commented.yaml").write_text("# model:\n#   lr: 0.1\n")  # "Unexpected config: # model: ..."
    (tmp_path / "scalar.yaml").write_text("hello\n")
    cases = [
        (["-c", "bad.yaml"], "error: bad.yaml: not valid YAML at line 3, column 6: expected ',' or ']', but got ':'"),
        (["-c", "latin1.yaml"], "error: latin1.yaml: not UTF-8 text (byte 0xe9 at position 29)"),
        (["-c", "bell.yaml"], "error: bell.yaml: not valid YAML: character #x0007 at position 22: special characters"),
        (["-c", "commented.yaml"], "error: commented.yaml: holds no options (it is empty, or only comments)"),
        (["-c", "scalar.yaml"], "error: scalar.yaml: not a config: its YAML is a str ('hello'), not options"),
        (["--trainer.accumulate_grad_batches", "0"], "error: trainer.accumulate_grad_batches must be >= 1, got 0"),
        (["--trainer.val_check_interval", "0"], "error: trainer.val_check_interval must be >= 1 (an int), got 0"),
        (["--trainer.strategy", "ddpx"], "error: trainer: You selected an invalid strategy name: `strategy='ddpx'`"),
        # refused by Lightning once the run starts, and a logger's folder that is a file
        (["--trainer.val_check_interval", "1000"], "error: trainer: `val_check_interval` (1000) must be less than"),
        (["--trainer.logger.init_args.save_dir", "afile"], f"error: {tmp_path / 'afile' / 'tiny'}: Not a directory"),
    ]
    (tmp_path / "afile").write_text("")
    from jsonargparse import Namespace

    from captioning.cli import CaptionCLI

    for fraction in (0.0, 0.5):  # a fraction of the epoch, which Lightning rounds up to one batch, is no 0
        CaptionCLI._check_model_options_before_the_data(Namespace(trainer=Namespace(val_check_interval=fraction)))
    for extra, said in cases:
        with pytest.raises(SystemExit) as stop:
            main(["fit", "-c", str(TINY), *extra])
        assert str(stop.value.code).startswith(said), stop.value.code
        assert "Traceback" not in capsys.readouterr().err


def test_a_validation_split_whose_images_all_fail_says_so(tmp_path, tiny_shapes):
    """With data.check_images off, unreadable images are skipped at load time; when that leaves a split with
    nothing to score, the run stops naming the split, not on a missing checkpoint metric."""
    import json
    import shutil

    data = tmp_path / "shapes"
    shutil.copytree(tiny_shapes.parent, data)
    for im in json.loads(tiny_shapes.read_text())["images"]:
        if im["split"] == "val":
            (data / im["filepath"] / im["filename"]).write_bytes(b"not a png")
    args = ["fit", "-c", str(TINY), "--data.data_dir", str(data), "--data.check_images", "false"]
    proc = run_script(str(ROOT / "train.py"), *args, "--trainer.num_sanity_val_steps", "0", cwd=tmp_path)
    assert proc.returncode != 0
    assert "val split: none of its 16 images could be loaded" in proc.stderr, proc.stderr[-3000:]
