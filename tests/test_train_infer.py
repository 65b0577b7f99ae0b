"""End to end: train.py on a tiny config -> checkpoint -> Captioner / infer.py."""

from __future__ import annotations

import errno
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioning.data.images import load_image
from captioning.inference import Captioner, CheckpointError, find_latest_checkpoint, read_checkpoint
from captioning.visualize import attention_figure

from conftest import ROOT, TINY, read_json, run_script


def test_train_writes_checkpoints_metrics_and_prints_the_run_directory(tiny_run, tiny_ckpt):
    run_dir = tiny_ckpt.parent.parent
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = read_json(run_dir / "test_metrics.json")
    assert {"bleu4", "object_accuracy", "full_accuracy", "pointing_accuracy"} <= metrics.keys()
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("bleu4", "object_accuracy", "full_accuracy", "pointing_accuracy"))
    assert (run_dir / "config.yaml").is_file()
    assert f"run directory: {run_dir.resolve()}" in (tiny_run / "train_stdout.txt").read_text()


def test_a_runs_saved_config_trains_again_and_checkpoints_stay_atomic(tiny_ckpt, tmp_path, monkeypatch):
    """`python train.py fit -c runs/.../config.yaml` reads the run's own config back (the checkpoint
    plugin once landed in it as an unreadable "Unable to serialize instance ..."), and the trainer
    still saves and loads checkpoints through SafeCheckpointIO."""
    saved = tiny_ckpt.parent.parent / "config.yaml"
    assert "Unable to serialize" not in saved.read_text()
    args = ["fit", "-c", str(saved), "--trainer.max_steps", "2", "--test_after_fit", "false"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unable to serialize" not in proc.stderr
    assert next(tmp_path.glob("runs/tiny/*/checkpoints/last.ckpt")).is_file()

    from captioning.cli import CaptionCLI, SafeCheckpointIO
    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    cli = CaptionCLI(CaptionModule, CaptionDataModule, args=["--config", str(TINY)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)


def test_checkpoint_loads_weights_only_and_carries_what_inference_needs(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    meta = ckpt["captioning"]
    assert meta["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert meta["preprocess"]["image_size"] == 64 and meta["grid"] == [8, 8]
    assert meta["model"]["encoder"] == "small_cnn"
    assert meta["search"] == {"beam_size": 2, "max_len": 12, "length_penalty": 0.0}


def test_inference_searches_with_the_checkpoints_length_penalty(tiny_ckpt, tmp_path):
    """Validation picked best.ckpt with model.length_penalty: inference uses the same by default (it
    always used 0 before), and --length-penalty / the argument override it."""
    from captioning.decoding import beam_search

    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["captioning"]["search"]["length_penalty"] = 1.5
    path = tmp_path / "lp.ckpt"
    torch.save(ckpt, path)
    assert Captioner.from_checkpoint(path).length_penalty == 1.5
    assert Captioner.from_checkpoint(path, length_penalty=0.0).length_penalty == 0.0
    captioner = Captioner.from_checkpoint(path)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    got = captioner.caption(image)
    x = captioner.transform(image)[None]
    want = beam_search(
        captioner.net.decoder, captioner.net.encode(x).features, beam_size=2, max_len=12, length_penalty=1.5
    )
    assert got.tokens  # a penalty changes the score of a non-empty caption
    assert got.tokens == [captioner.vocab.tokens[i] for i in want[0][0].tokens] and got.score == want[0][0].score
    proc = run_script(str(ROOT / "infer.py"), "--help", cwd=tmp_path)
    assert "--length-penalty" in proc.stdout


def test_save_load_gives_the_same_caption_as_the_trained_module(tiny_ckpt, tiny_shapes):
    from captioning.lit_module import CaptionModule

    image = tiny_shapes.parent / "images" / "000000.png"
    captioner = Captioner.from_checkpoint(tiny_ckpt)
    cap = captioner.caption(image)
    # the checkpoint's encoder has its BatchNorm folded into the convolutions; the twin below keeps
    # the trained module's (a Captioner built around a given net leaves that net as it is)
    has_bn = [isinstance(m, torch.nn.BatchNorm2d) for m in captioner.net.modules()]
    module = CaptionModule.load_from_checkpoint(tiny_ckpt, map_location="cpu", weights_only=False).eval()
    assert not any(has_bn) and any(isinstance(m, torch.nn.BatchNorm2d) for m in module.net.modules())
    twin = Captioner(
        module.net, module.vocab, 64, list(module.hparams.mean), list(module.hparams.std), module.grid, beam_size=2,
        max_len=12,
    )  # fmt: skip
    again = twin.caption(image)
    assert cap.tokens == again.tokens and abs(cap.score - again.score) < 1e-5
    assert cap.attention.shape == (len(cap.tokens), 8, 8)
    torch.testing.assert_close(cap.attention, again.attention)


def _distinct_per_image(captions: list) -> None:
    """The tiny checkpoint writes one caption for every image, so equal texts cannot show that each caption stayed
    with its image. Their attention maps differ from image to image (by 6e-4 or more here, against ~4e-9 between a
    batch and one image at a time): this says they do, so that comparing them can."""
    for i, a in enumerate(captions):
        for b in captions[i + 1 :]:
            assert a.attention.shape != b.attention.shape or (a.attention - b.attention).abs().max() > 2e-4


def _same_captions(got: list, want: list) -> None:
    assert [x.text for x in got] == [x.text for x in want]
    for g, w in zip(got, want):
        assert g.score == pytest.approx(w.score, abs=1e-4)
        torch.testing.assert_close(g.attention, w.attention, atol=1e-5, rtol=1e-4)


def test_batch_caption_equals_single(tiny_ckpt, tiny_shapes):
    c = Captioner.from_checkpoint(tiny_ckpt)
    paths = [tiny_shapes.parent / "images" / f"{i:06d}.png" for i in range(4)]
    single = [c.caption(p) for p in paths]
    _distinct_per_image(single)
    _same_captions(c.caption_batch(paths), single)
    _same_captions(c.caption_batch(paths, batch_size=3), single)  # a full batch, then a short one
    assert c.caption_batch([]) == []


def test_a_captioner_searches_in_eval_mode_and_leaves_the_nets_modes_and_the_rng_as_it_found_them(
    tiny_ckpt, tiny_shapes
):
    """A net put in training mode between calls decoded with dropout on (captions changed from call to call);
    Captioner(net) switched the caller's net to eval for good; and from_checkpoint drew the random initial weights
    it then replaced from the caller's seeded generator."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    c = Captioner.from_checkpoint(tiny_ckpt)
    assert torch.equal(torch.rand(3), want)
    path = tiny_shapes.parent / "images" / "000000.png"
    evaluated = c.caption(path)
    c.net.train()  # as a training loop leaves a net (the tiny model's dropout is 0.3)
    c.net.decoder.embed.eval()  # and one module in a mode of its own
    modes = {name: m.training for name, m in c.net.named_modules()}
    for _ in range(3):
        got = c.caption(path)
        assert (got.tokens, got.score) == (evaluated.tokens, evaluated.score)
    assert {name: m.training for name, m in c.net.named_modules()} == modes
    again = Captioner(c.net, c.vocab, c.transform.size, [0.5] * 3, [0.25] * 3, c.grid)
    assert again.net.training and not again.net.decoder.embed.training


def test_infer_writes_overlay_and_reports_bad_inputs(tiny_run, tiny_ckpt, tmp_path):
    img = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (230, 230, 230)).save(img)
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    missing = tmp_path / "missing.png"
    args = [str(img), str(bad), str(missing), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{img}: ")
    overlay = tmp_path / "o" / "scene_attention.png"
    assert overlay.is_file() and Image.open(overlay).size[0] > 224
    assert f"{bad}: not an image" in proc.stderr and f"{missing}: no such file" in proc.stderr


@pytest.mark.parametrize("device, cause", [("mps", "no MPS (Apple GPU) device here"), ("meta", "meta device")])
def test_infer_refuses_a_device_it_cannot_caption_on_in_one_line(tiny_ckpt, tmp_path, device, cause):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    img = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (230, 230, 230)).save(img)
    proc = run_script(str(ROOT / "infer.py"), str(img), "--ckpt", str(tiny_ckpt), "--device", device, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --device {device}: ") and cause in errors[0], errors
    assert errors[0].endswith(
        "available here: " + ", ".join(["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))])
    )
    assert not (tmp_path / "scene_attention.png").exists()


def test_a_pil_image_gets_the_caption_of_its_file(tiny_ckpt, tiny_shapes, tmp_path):
    """Captioner normalises an image passed as a PIL object as it does a file: alpha onto white,
    EXIF orientation applied (once)."""
    c = Captioner.from_checkpoint(tiny_ckpt)
    scene = Image.open(tiny_shapes.parent / "images" / "000003.png").convert("RGBA")
    scene.putalpha(Image.linear_gradient("L").resize(scene.size))  # transparent at the top
    rgba = tmp_path / "rgba.png"
    scene.save(rgba)
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    scene.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(turned, quality=95, exif=exif)
    for path in (rgba, turned):
        from_file, from_pil = c.caption(path), c.caption(Image.open(path))
        assert from_pil.tokens == from_file.tokens, path
        torch.testing.assert_close(from_pil.attention, from_file.attention)
    assert c.caption(Image.open(rgba).convert("RGB")).attention.ne(c.caption(rgba).attention).any()

    # turned upright, once: the maps of the file's pixels as EXIF says to show them, not as stored, nor turned twice
    def bare(image: Image.Image) -> Image.Image:  # the pixels alone, without EXIF
        out = Image.new("RGB", image.size)
        out.paste(image.convert("RGB"))
        return out

    stored = bare(Image.open(turned))
    upright = bare(ImageOps.exif_transpose(Image.open(turned)))
    assert upright.size == stored.size and np.array_equal(np.asarray(upright.rotate(90)), np.asarray(stored))
    maps = c.caption(turned).attention
    torch.testing.assert_close(maps, c.caption(upright).attention)
    for wrong in (stored, upright.rotate(-90)):
        assert (maps - c.caption(wrong).attention).abs().max() > 2e-4


def test_infer_batches_keep_the_order_the_captions_and_every_overlay(tiny_ckpt, tiny_shapes, tmp_path):
    """5 images in batches of 2 (the last one short): the same captions as one at a time, printed in
    the order given, and three inputs sharing the stem "img" get three overlays, none overwritten."""
    images = tiny_shapes.parent / "images"
    inputs = [images / f"{i:06d}.png" for i in range(2)]
    for i, folder in enumerate(["a", "b", "c"]):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "img.png")
        inputs[-1].write_bytes((images / f"{i + 2:06d}.png").read_bytes())
    args = [*map(str, inputs), "--ckpt", str(tiny_ckpt), "--batch-size", "2", "--out", str(tmp_path / "o")]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    captioner = Captioner.from_checkpoint(tiny_ckpt)
    single = [captioner.caption(p) for p in inputs]
    assert proc.stdout.splitlines() == [f"{p}: {c.text}" for p, c in zip(inputs, single)]
    overlays = ["000000", "000001", "img", "img-2", "img-3"]
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == sorted(f"{o}_attention.png" for o in overlays)
    for path, overlay in zip(inputs, overlays):
        assert f"attention overlay: {tmp_path / 'o' / overlay}_attention.png" in proc.stderr, path
    # each overlay is its own image's maps (the captions' texts are all the same here): drawn from the caption of
    # that image alone, it differs from the written one by at most a rounding of a colour level here and there
    # (drawn with the maps of the images in reverse order: 1.8 levels on average), and from every other image's by
    # far more
    _distinct_per_image(single)
    drawn = [
        np.asarray(attention_figure(load_image(p), c.tokens, c.attention, centres=c.centres), dtype=np.int16)
        for p, c in zip(inputs, single)
    ]
    for i, overlay in enumerate(overlays):
        written = np.asarray(Image.open(tmp_path / "o" / f"{overlay}_attention.png").convert("RGB"), dtype=np.int16)
        gaps = [np.abs(written - d).mean() if d.shape == written.shape else np.inf for d in drawn]
        assert gaps[i] < 0.05 and all(gap > 1 for j, gap in enumerate(gaps) if j != i), (overlay, gaps)


def test_infer_without_ckpt_uses_newest_run(tiny_run, tiny_shapes):
    image = tiny_shapes.parent / "images" / "000001.png"
    proc = run_script(str(ROOT / "infer.py"), str(image), cwd=tiny_run)
    assert proc.returncode == 0, proc.stderr
    newest = find_latest_checkpoint(tiny_run / "runs").relative_to(tiny_run)
    assert f"checkpoint: {newest}\n" in proc.stderr  # says which model captioned
    assert (tiny_run / "000001_attention.png").is_file()


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path, tiny_ckpt):
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:1000])
    for path, cause in [(truncated, "truncated"), (tmp_path / "none.ckpt", "not found")]:
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e) and cause in str(e)
        else:
            raise AssertionError("no error")


def test_encoder_weights_from_a_local_file(tmp_path):
    import torchvision

    from captioning.models.encoders import TorchvisionEncoder, load_encoder_weights

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    enc = TorchvisionEncoder("resnet18", stage=3, grid=4, freeze=True)
    load_encoder_weights(enc, str(path))
    torch.testing.assert_close(enc.body[0].weight, ref.conv1.weight)
    torch.testing.assert_close(enc.body[6][0].conv1.weight, ref.layer3[0].conv1.weight)
    out = enc.eval()(torch.randn(1, 3, 64, 64))
    assert out.features.shape == (1, 16, 256) and out.grid == (4, 4)
    assert not any(p.requires_grad for p in enc.parameters())


def test_transformer_checkpoint_trains_and_infers_with_cross_attention_overlay(tmp_path, tiny_shapes):
    args = ["fit", "-c", str(ROOT / "configs" / "tiny.yaml"), "--model.decoder", "transformer"]
    args += ["--model.hidden_dim", "32", "--model.num_heads", "2", "--test_after_fit", "false"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(tmp_path.glob("runs/tiny/*/checkpoints/best.ckpt"))
    assert torch.load(ckpt, weights_only=True)["captioning"]["model"]["decoder"] == "transformer"
    image = tiny_shapes.parent / "images" / "000002.png"
    proc = run_script(str(ROOT / "infer.py"), str(image), "--ckpt", str(ckpt), "--beam-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "000002_attention.png").is_file()
    cap = Captioner.from_checkpoint(ckpt).caption(image)
    assert cap.attention.shape == (len(cap.tokens), 8, 8)


def test_without_a_best_checkpoint_the_error_points_at_the_last_one(tmp_path):
    """A run whose validation never ran has last.ckpt but no best.ckpt: say so and name the file, even
    when an older run has a best checkpoint (that would be another model, used silently)."""
    with pytest.raises(CheckpointError, match="train one with `python train.py`"):
        find_latest_checkpoint(tmp_path / "runs")
    # the older run's name sorts after the newer one's (as version_9 after version_10): newest by time, not by name
    older = tmp_path / "runs" / "tiny" / "version_9" / "checkpoints" / "best.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"")
    os.utime(older, (1, 1))
    assert find_latest_checkpoint(tmp_path / "runs") == older
    last = tmp_path / "runs" / "tiny" / "version_10" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match="best.ckpt needs a validation") as err:
        find_latest_checkpoint(tmp_path / "runs")
    assert f"is {last}: pass it with --ckpt" in str(err.value) and "tiny/version_10)" in str(err.value)
    (last.parent / "best.ckpt").write_bytes(b"")
    assert find_latest_checkpoint(tmp_path / "runs") == last.parent / "best.ckpt"


def test_infer_never_writes_an_overlay_over_one_of_its_input_images(tiny_ckpt, tiny_shapes, tmp_path):
    """`infer.py x.png x_attention.png`: x.png's overlay would be named x_attention.png, the second input;
    it goes to x-2_attention.png instead, and the input keeps its bytes."""
    images = tiny_shapes.parent / "images"
    first, second = tmp_path / "x.png", tmp_path / "x_attention.png"
    first.write_bytes((images / "000000.png").read_bytes())
    second.write_bytes((images / "000001.png").read_bytes())
    original = second.read_bytes()
    args = [str(first), str(second), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path)]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert second.read_bytes() == original
    assert f"attention overlay: {tmp_path / 'x-2_attention.png'}" in proc.stderr
    assert (tmp_path / "x-2_attention.png").is_file() and (tmp_path / "x_attention_attention.png").is_file()


def test_an_overlay_that_cannot_be_written_is_reported_and_the_captions_still_come(tiny_ckpt, tiny_shapes, tmp_path):
    """A failed overlay save (here a folder in its place; a full disk, a read-only file) was a traceback:
    the rest of the images went uncaptioned and that image's caption was never printed."""
    images = [tiny_shapes.parent / "images" / f"00000{i}.png" for i in (2, 3)]
    (tmp_path / "o" / "000002_attention.png").mkdir(parents=True)
    args = [*map(str, images), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line.split(": ")[0] for line in proc.stdout.splitlines()] == [str(p) for p in images]
    target = tmp_path / "o" / "000002_attention.png"
    assert f"error: {target}: cannot write the attention overlay (Is a directory)" in proc.stderr
    assert (tmp_path / "o" / "000003_attention.png").is_file()


def test_an_out_folder_that_takes_no_files_is_refused_before_captioning(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """An existing --out folder without write permission passed the mkdir check and failed at the first
    overlay with a traceback. Where this user may write there anyway (root), a file made in it fails as it
    would without the permission, and infer.py runs in this process."""
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    args = [str(image), "--ckpt", str(tiny_ckpt), "--out", str(out)]
    try:
        if not os.access(out, os.W_OK):
            proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
            returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        else:
            spec = importlib.util.spec_from_file_location("infer_script", ROOT / "infer.py")
            infer = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(infer)
            make = tempfile.TemporaryFile

            def denied(*a, dir=None, **kw):
                if dir is not None and Path(dir) == out:
                    raise PermissionError(errno.EACCES, "Permission denied", str(dir))
                return make(*a, dir=dir, **kw)

            monkeypatch.setattr(tempfile, "TemporaryFile", denied)
            returncode = infer.main(args)
            stdout, stderr = capsys.readouterr()
    finally:
        out.chmod(0o755)
    assert returncode == 2 and f"error: --out {out}: cannot write there (Permission denied)" in stderr, stderr
    assert stdout == "" and list(out.iterdir()) == []


def test_an_image_of_a_type_captioner_does_not_take_is_a_clear_type_error(tiny_ckpt, tmp_path):
    """A tensor or an array reached PIL code and failed with "'Tensor' object has no attribute 'getexif'";
    one path given to caption_batch was captioned letter by letter ("i: no such file")."""
    captioner = Captioner.from_checkpoint(tiny_ckpt)
    for image in (torch.rand(3, 64, 64), np.zeros((64, 64, 3), dtype=np.uint8)):
        with pytest.raises(TypeError, match=f"a path or a PIL image, got {type(image).__name__}"):
            captioner.caption(image)
    path = tmp_path / "image.png"
    Image.new("RGB", (64, 64)).save(path)
    for one in (str(path), path, Image.open(path)):
        with pytest.raises(TypeError, match=r"takes a list of images.*use caption\(\)"):
            captioner.caption_batch(one)
    assert captioner.caption(path).text == captioner.caption_batch([os.fspath(path)])[0].text


def test_no_overlay_of_a_run_is_written_over_another_through_a_second_spelling_of_its_path(tiny_ckpt, tmp_path):
    """On a case-insensitive file system (macOS's default) a/IMG.png's overlay IMG_attention.png and b/img.png's
    img_attention.png are one file: the second overwrote the first. This file system is case-sensitive, so a
    link stands in for the second spelling; overlays already written are now recognised by inode."""
    images = []
    for folder, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        images.append(tmp_path / folder / f"{folder}.png")
        Image.new("RGB", (64, 64), colour).save(images[-1])
    out = tmp_path / "o"
    out.mkdir()
    (out / "b_attention.png").symlink_to("a_attention.png")  # b's overlay path is another name of a's
    args = [*map(str, images), "--ckpt", str(tiny_ckpt), "--out", str(out)]
    proc = run_script(str(ROOT / "infer.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"attention overlay: {out / 'b-2_attention.png'}" in proc.stderr, proc.stderr
    first = np.asarray(Image.open(out / "a_attention.png"))[150, 100]  # the <image> panel, below its label
    assert tuple(first) == (255, 0, 0), "a's overlay was overwritten"
    assert tuple(np.asarray(Image.open(out / "b-2_attention.png"))[150, 100]) == (0, 0, 255)


def test_a_dangling_checkpoint_link_under_runs_is_passed_over(tmp_path):
    """A link to a removed checkpoint (or one replaced between the listing and its stat) was a
    FileNotFoundError traceback from find_latest_checkpoint."""
    checkpoints = tmp_path / "runs" / "x" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "best.ckpt").symlink_to("removed.ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        find_latest_checkpoint(tmp_path / "runs")
    (checkpoints / "best-v1.ckpt").write_bytes(b"")
    assert find_latest_checkpoint(tmp_path / "runs") == checkpoints / "best-v1.ckpt"


@pytest.mark.parametrize("encoding, shown", [("utf-8", b"caf\xe9.png"), ("ascii", b"caf\\udce9.png")])
def test_an_image_whose_name_is_not_utf8_gets_its_caption_and_the_batch_goes_on(tiny_ckpt, tmp_path, encoding, shown):
    """A Latin-1 file name ("caf\\xe9.png"), printed to a strict stdout (PYTHONIOENCODING, or the en_US.UTF-8 locale
    of most desktops), raised UnicodeEncodeError: infer.py stopped, the other image of the batch got no caption and
    no overlay. A UTF-8 stdout now writes the name's own bytes (as Python's UTF-8 mode and the C locale do, so a
    script can open the file it reads back), another encoding writes it escaped."""
    import subprocess
    import sys

    latin1 = tmp_path / os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(latin1)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "zz_good.png")
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONPATH": str(ROOT)}
    args = [str(latin1), str(tmp_path / "zz_good.png"), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=tmp_path, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(os.fsencode(tmp_path) + b"/" + shown + b": "), lines
    assert b"zz_good.png: " in lines[1]
    assert len(list((tmp_path / "o").iterdir())) == 2


def test_infer_stops_quietly_when_the_reader_of_its_output_goes_away(tiny_ckpt, tiny_shapes, tmp_path):
    """``infer.py a.png b.png ... | head -1``: the print after head had gone raised BrokenPipeError, a traceback."""
    import subprocess
    import sys

    images = [str(tiny_shapes.parent / "images" / f"{i:06d}.png") for i in range(2)]
    args = [*images, "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "infer.py"), *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader gone before the first caption (head after its lines): every print meets it
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_checkpoint_whose_small_cnn_holds_a_resnets_grid_options_still_loads(tiny_ckpt, tiny_shapes, tmp_path):
    """build_encoder now refuses a grid or stage for small_cnn, which never had either; a checkpoint trained before
    training refused them may hold them, and they changed nothing in it."""
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["captioning"]["model"]["encoder"] == "small_cnn"
    ckpt["captioning"]["model"].update(encoder_grid=4, encoder_stage=3)
    torch.save(ckpt, tmp_path / "old.ckpt")
    path = tiny_shapes.parent / "images" / "000001.png"
    got, want = Captioner.from_checkpoint(tmp_path / "old.ckpt").caption(path), Captioner.from_checkpoint(tiny_ckpt)
    assert (got.tokens, got.score) == (want.caption(path).tokens, want.caption(path).score)
