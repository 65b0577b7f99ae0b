"""`train.py test`: metrics and COCO-format captions, and the same numbers under DDP."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY, finish, read_json, run_script, start_script

KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d", "object_accuracy", "full_accuracy"}
KEYS |= {"pointing_accuracy", "pointing_accuracy_color", "attention_mass_shape", "attention_mass_color"}


def _test_run(tmp_path, ckpt, *extra):
    proc = run_script(str(ROOT / "train.py"), "test", "-c", str(TINY), "--ckpt_path", str(ckpt), *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(tmp_path.glob("runs/tiny/*/test_metrics.json")).parent
    # a new run directory, not the checkpoint's: said, as fit says its own
    assert f"run directory: {run_dir.resolve()}" in proc.stdout, proc.stdout[-2000:]
    assert f"test metrics: {(run_dir / 'test_metrics.json').resolve()}" in proc.stdout
    assert "untrained" not in proc.stderr
    # the same shapes set, generated again in this folder: the data it was trained on, wherever it lies
    assert "was trained on other data" not in proc.stderr, proc.stderr[-3000:]
    return read_json(run_dir / "test_metrics.json"), read_json(run_dir / "test_captions.json")


@pytest.fixture(scope="module")
def single(tiny_ckpt, tmp_path_factory):
    return _test_run(tmp_path_factory.mktemp("test_single"), tiny_ckpt)


def test_test_subcommand_writes_metrics_and_coco_results(single, tiny_ckpt):
    metrics, captions = single
    assert KEYS <= metrics.keys()
    assert "meteor" not in metrics  # tiny.yaml turns METEOR off; it is never a made-up number
    assert len(captions) == 16 and len({c["image_id"] for c in captions}) == 16
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    # COCO's results format has the annotation file's integer ids (pycocotools' loadRes refuses strings)
    assert all(isinstance(c["image_id"], int) for c in captions)


def test_ddp_gathers_deduplicates_and_scores_like_one_process(single, tiny_ckpt, tmp_path):
    """3 ranks over 16 test images: the sampler pads to 18, so two images are decoded twice."""
    extra = ["--trainer.devices", "3", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    metrics, captions = _test_run(tmp_path, tiny_ckpt, *extra)
    single_metrics, single_captions = single
    assert sorted(captions, key=lambda c: c["image_id"]) == sorted(single_captions, key=lambda c: c["image_id"])
    for k in KEYS:
        assert metrics[k] == pytest.approx(single_metrics[k], abs=1e-9), k


def test_results_ids_are_integers_only_for_plain_decimal_names():
    """COCO's results format wants the annotation file's integer ids; any other name stays as written. "²" is
    a digit to str.isdigit but not a number to int(): before, it crashed the scoring of the whole split."""
    from captioning.lit_module import _results_id

    assert _results_id("7") == 7 and _results_id("391895") == 391895
    for name in ("²", "version_²", "0007", "٣", "12.jpg", ""):
        assert _results_id(name) == name


def test_a_model_flag_anywhere_on_the_command_line_is_left_out_of_the_checkpoints_options():
    from captioning.cli import with_checkpoint_options

    ckpt = {"beam_size": 3, "length_penalty": 0.0, "lr": 0.001}
    argv = ["test", "--model.beam_size", "5", "-c", "a.yaml", "--config=b.yaml", "--model.lr=0.1", "--ckpt_path", "x"]
    out = with_checkpoint_options(argv, "test", ckpt)
    # after the last config file, so over them; without the options the flags set, so under the flags
    assert out == [*argv[:6], "--model", '{"length_penalty": 0.0}', *argv[6:]]


def test_a_data_set_of_test_images_only_is_scored_with_the_checkpoint_vocabulary(single, tiny_run, tiny_ckpt, tmp_path):
    """A model scored on another data set that has only a test split (`test --ckpt_path`: the vocabulary is the
    checkpoint's, so no training captions are needed). Set-up refused it: "no usable images in the 'train'
    split". Here: the tiny run's own test images alone, which must give its captions and caption metrics."""
    shapes = tiny_run / "data" / "shapes_tiny"
    data = read_json(shapes / "dataset_shapes.json")
    data["images"] = [image for image in data["images"] if image["split"] == "test"]
    annotations = tmp_path / "test_only.json"
    annotations.write_text(json.dumps(data))
    source = ["--data.dataset", "karpathy", "--data.annotations", str(annotations), "--data.image_root", str(shapes)]
    metrics, captions = _test_run(tmp_path, tiny_ckpt, *source)
    single_metrics, single_captions = single
    assert sorted(captions, key=lambda c: c["image_id"]) == sorted(single_captions, key=lambda c: c["image_id"])
    for k in ("bleu1", "bleu4", "rouge_l", "cider_d"):
        assert metrics[k] == pytest.approx(single_metrics[k], abs=1e-9), k
    # training on it is still refused, naming the file, before any step
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), *source, cwd=tmp_path)
    assert proc.returncode != 0 and f"{annotations}: no usable images in the 'train' split" in proc.stderr


def test_model_flags_win_over_the_checkpoint_and_the_checkpoint_over_the_config_file(tiny_ckpt, tmp_path):
    """With --ckpt_path the checkpoint's model options replace the config file's (a config of another width
    still reads the checkpoint), but --model.* flags on the command line replace the checkpoint's. Before,
    LightningCLI merged the checkpoint's options over the flags too: --model.max_decode_len 3 was ignored
    in silence (captions of 12 words), and a resume with another architecture flag went on with the
    checkpoint's instead of being refused."""
    other = tmp_path / "tiny48.yaml"
    # without max_decode_len: the checkpoint's (12) is what the flag must win over
    other.write_text(TINY.read_text().replace("hidden_dim: 32", "hidden_dim: 48").replace("  max_decode_len: 12\n", ""))
    assert "hidden_dim: 48" in other.read_text() and "max_decode_len" not in other.read_text()
    # the flag before -c: it was then overridden by the checkpoint's value (the flags after -c were not)
    flags = ["--model.max_decode_len", "3", "-c", str(other), "--ckpt_path", str(tiny_ckpt)]
    resume = ["fit", "-c", str(TINY), "--ckpt_path", str(tiny_ckpt), "--model.hidden_dim", "48"]
    (tmp_path / "resume").mkdir()
    # the test and the resume are independent: they run side by side, each in a folder of its own
    tested = start_script(str(ROOT / "train.py"), "test", *flags, cwd=tmp_path)
    proc, resumed = finish(tested, start_script(str(ROOT / "train.py"), *resume, cwd=tmp_path / "resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    captions = read_json(next(tmp_path.glob("runs/tiny/*/test_captions.json")))
    assert len(captions) == 16 and all(len(c["caption"].split()) <= 3 for c in captions)
    proc = resumed
    assert proc.returncode != 0
    assert "model configuration mismatch (hidden_dim: checkpoint 32 vs config 48)" in proc.stderr


def test_test_scores_with_the_checkpoint_vocabulary_whatever_the_data_would_build(single, tiny_ckpt, tmp_path):
    """`test --ckpt_path` on data whose training captions give another vocabulary (a model tested on
    another dataset; here min_word_freq 1000 makes almost every word <unk>) scores the model with its own
    words: the same captions and numbers as on the data it was trained on. It was refused as a
    vocabulary mismatch. A resume (fit) still refuses it (test_reliability)."""
    metrics, captions = _test_run(tmp_path, tiny_ckpt, "--data.min_word_freq", "1000")
    single_metrics, single_captions = single
    assert captions == single_captions
    assert metrics == single_metrics


def test_testing_a_checkpoint_on_other_data_than_it_was_trained_on_is_said(tiny_ckpt, tmp_path):
    """A run trained on one's own data from configs/shapes.yaml and tested with `--ckpt_path best` and no config was
    scored on the shapes set without a word. Said now (not refused: scoring on another set is a use)."""
    import torch

    ckpt = torch.load(tiny_ckpt, weights_only=True)
    data = ckpt["captioning"]["data"]
    assert set(data) == {"file", "train_images"} and len(data["train_images"]) == 16
    data["train_images"] = "0" * 16  # as if trained on another set
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    proc = run_script(str(ROOT / "train.py"), "test", "-c", str(TINY), "--ckpt_path", str(other), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{other} was trained on other data ({data['file']}); this test scores it on " in proc.stderr


def test_the_test_results_are_written_whole_or_not_at_all_and_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """On a full disk test_captions.json was left empty beside a complete test_metrics.json (or, written each whole,
    could be an earlier test's beside this one's metrics), and the run ended in a 64-line traceback whose OSError
    named no file."""
    import errno
    from pathlib import Path

    from captioning.lit_module import _write_whole

    metrics, path = tmp_path / "test_metrics.json", tmp_path / "test_captions.json"
    _write_whole({metrics: "{}\n", path: "[1]\n"})
    real_write = Path.write_text

    def full(self, text, *a, **kw):
        if "captions" not in self.name:
            return real_write(self, text, *a, **kw)
        real_write(self, text[: len(text) // 2], *a, **kw)  # part written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as info:
        _write_whole({metrics: '{"bleu4": 1}\n', path: "[1, 2, 3]\n"})
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
    assert "No space left on device: not written" in str(info.value)
    monkeypatch.undo()
    # the pair as it was: not the new metrics beside the earlier captions
    assert (metrics.read_text(), path.read_text()) == ("{}\n", "[1]\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_captions.json", "test_metrics.json"]
    # a folder in one file's place: neither is replaced (the first was, before the second's rename failed)
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError):
        _write_whole({metrics: '{"bleu4": 1}\n', path: "[1, 2, 3]\n"})
    assert metrics.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["test_captions.json", "test_metrics.json"]
    )
