"""Exact resume: a run killed with SIGKILL continues from its last checkpoint with the same losses."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, finish, start_script


def _config(max_steps: int, max_epochs: int, checkpoint: str) -> str:
    """A run without validation that logs every step; ``checkpoint``: the ModelCheckpoint's init_args."""
    return f"""
trainer:
  max_steps: {max_steps}
  max_epochs: {max_epochs}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {checkpoint}
"""


CONFIG = _config(12, 10, '{filename: "{step}", every_n_train_steps: 3, save_top_k: -1}')


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _start(cwd: Path, *extra: str, config: str = CONFIG):
    """Starts train.py in ``cwd`` (one run at a time in a folder: it writes resume.yaml there); see _fit."""
    (cwd / "resume.yaml").write_text(config)
    args = ["fit", "-c", str(TINY), "-c", "resume.yaml", "--test_after_fit", "false", *extra]
    env_path = str(ROOT / "tests")
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        return start_script(str(ROOT / "train.py"), *args, cwd=cwd)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]


def _fit(cwd: Path, *extra: str, config: str = CONFIG):
    return finish(_start(cwd, *extra, config=config))


def test_sigkill_after_step_7_then_resume_gives_the_same_losses(tmp_path):
    """Resumed mid-epoch (step 3 of 6) and at an epoch's end (step 6: the next epoch's loader is made
    before the checkpoint's RNG state is restored, so it must not draw from that RNG)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    kill = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=7"]
    # the uninterrupted run and the killed one are independent: they run side by side
    whole_proc, proc = finish(_start(whole), _start(killed, *kill))
    assert whole_proc.returncode == 0
    reference = _losses(next(whole.glob("runs/tiny/version_*")))
    assert len(reference) == 12

    assert proc.returncode != 0  # killed
    run = killed / "runs" / "tiny" / "version_0"
    for step in (3, 6):
        proc = _fit(killed, "--ckpt_path", str(run / "checkpoints" / f"step={step}.ckpt"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the resumed run logs into the run it continues, after the rows of the steps before its checkpoint
        with open(run / "metrics.csv") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        assert steps == sorted(set(steps)) and steps[steps.index(step) :] == list(range(step, 12)), steps
        resumed = {s: loss for s, loss in _losses(run).items() if s >= step}
        for s, loss in resumed.items():
            assert loss == reference[s], (step, s, loss, reference[s])


@pytest.mark.parametrize("schedule", [[], ["--model.lr_schedule", "step"]], ids=["default", "step-schedule"])
def test_a_resume_under_another_seed_goes_on_in_the_checkpoints_training_order(tmp_path, schedule):
    """The order and caption draws of the interrupted run are in its checkpoint: a resume whose seed differs (a
    config's seed_everything: true draws a new one each start) trained the rest of the epoch on its own order,
    some images twice and some never, and every later epoch on other draws."""
    assert _fit(tmp_path, *schedule).returncode == 0
    run = next(tmp_path.glob("runs/tiny/version_*"))
    reference = _losses(run)
    ckpt = str(run / "checkpoints" / "step=3.ckpt")
    proc = _fit(tmp_path, *schedule, "--ckpt_path", ckpt, "--seed_everything", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {s: loss for s, loss in _losses(run).items() if s >= 3}
    assert resumed == {s: reference[s] for s in range(3, 12)}


def test_a_sigterm_at_an_epochs_last_batch_resumes_exactly_with_loader_workers(tmp_path):
    """SIGTERM's checkpoint at the last batch of epoch 0 is written after the epoch's end hooks: its epoch is already
    1. Read as "after the last batch of epoch 1", the resume set the sampler to epoch 2, whose order the loader's
    workers drew before set_epoch(1): epoch 1 trained on epoch 2's batches (weights 0.046 apart at the end)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    workers = ["--data.num_workers", "2"]
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=6"]
    term += ["--trainer.callbacks.signal_name=SIGTERM"]
    whole_proc, killed_proc = finish(_start(whole, *workers), _start(killed, *workers, *term))
    assert whole_proc.returncode == 0, whole_proc.stderr[-3000:]
    assert killed_proc.returncode == 143, killed_proc.stderr[-3000:]
    run = killed / "runs" / "tiny" / "version_0"
    proc = _fit(killed, *workers, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(next(whole.glob("runs/tiny/version_*")))
    assert len(reference) == 12 and _losses(run) == reference


def test_same_seed_same_losses_with_workers_and_a_different_seed_differs(tmp_path):
    started = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):  # three independent runs, side by side
        cwd = tmp_path / name
        cwd.mkdir()
        workers = ["--data.num_workers", "2", "--seed_everything", str(seed), "--trainer.max_steps", "8"]
        started[name] = _start(cwd, *workers)
    runs = {}
    for name, proc in zip(started, finish(*started.values())):
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _losses(next((tmp_path / name).glob("runs/tiny/version_*")))
    assert len(runs["a"]) == 8
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=7"]
    proc = _fit(tmp_path, *term, "--trainer.callbacks.signal_name=SIGTERM")
    assert "SIGTERM: saved" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # an unfinished run is not a success (it exited 0, so `train.py && next-step` went on), and says so in a line
    assert proc.returncode == 143 and "stopped by SIGTERM" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    import torch

    last = next(tmp_path.glob("runs/tiny/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 7
    # "--ckpt_path last" resumes from that newest last.ckpt, not from scratch
    proc = _fit(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {last.relative_to(tmp_path)}" in proc.stderr
    # steps 0-6 logged before the SIGTERM, 7 and 8 after the resume, in the same run directory
    assert sorted(_losses(tmp_path / "runs" / "tiny" / "version_0")) == list(range(9))
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()


def _epoch_rows(folder: Path) -> list[tuple[str, str, str]]:
    """(epoch, step, count) of each epoch's row of images the loader could not read."""
    with open(folder / "runs" / "tiny" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [(r["epoch"], r["step"], r["train/skipped_images"]) for r in rows if r.get("train/skipped_images")]


def _validations_and_losses(folder: Path) -> tuple[list, dict]:
    """(epoch, step, CIDEr-D) of each validation logged, in order; the loss of each step."""
    run = folder / "runs" / "tiny" / "version_0"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [(r["epoch"], r["step"], r["val/cider_d"]) for r in rows if r.get("val/cider_d")], _losses(run)


@pytest.mark.parametrize(
    "step,val_batch", [(12, 1), (12, 3), pytest.param(18, 1, marks=pytest.mark.slow, id="the-last-validation")]
)
def test_a_run_stopped_during_a_validation_runs_that_validation_again_when_resumed(tmp_path, step, val_batch):
    """SIGTERM between the batches of a validation: the checkpoint is written there. Lightning took that
    validation for done, so the resumed run logged no metrics for the epoch and best.ckpt never weighed it; now it
    runs the whole validation again, and logs what the uninterrupted run logs. At its last batch the signal is
    raised after the epoch's end hooks; with max_steps the resumed run then ended at once, one epoch short; now it
    trains that last epoch. In the run's last validation (step 18: max_steps reached) Lightning's step limit ended
    the resumed run before that validation could run again; the run then extended by an epoch goes on as the
    uninterrupted run's does (no validation out of turn, the same dropout), and one resumed with validations at
    other batches ends at max_steps, without it (the first fix trained one batch past max_steps there)."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    config = "trainer:\n  max_steps: 18\n  max_epochs: 3\n  log_every_n_steps: 1\ndata:\n  eval_batch_size: 4\n"
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", f"--trainer.callbacks.step={step}"]
    term += ["--trainer.callbacks.signal_name=SIGTERM", f"--trainer.callbacks.val_batch={val_batch}"]  # of 4
    whole_proc, stopped_proc = finish(_start(whole, config=config), _start(stopped, *term, config=config))
    assert whole_proc.returncode == 0, whole_proc.stderr[-3000:]
    assert stopped_proc.returncode == 143 and "SIGTERM: saved" in stopped_proc.stdout, stopped_proc.stderr[-3000:]
    if step == 18:  # resumed where its validation does not come at that batch: it must not train past max_steps
        shutil.copytree(stopped, tmp_path / "other")
        proc = _fit(tmp_path / "other", "--ckpt_path", "last", "--trainer.val_check_interval", "4", config=config)
        assert proc.returncode == 0, proc.stderr[-3000:]
        last = torch.load(tmp_path / "other/runs/tiny/version_0/checkpoints/last.ckpt", weights_only=False)
        assert last["global_step"] == 18
    proc = _fit(stopped, "--ckpt_path", "last", config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (val, losses), (val_stopped, losses_stopped) = _validations_and_losses(whole), _validations_and_losses(stopped)
    assert [epoch for epoch, _, _ in val] == ["0", "1", "2"] and val_stopped == val
    assert losses_stopped == losses
    # the epochs' own training rows too (images the loader could not read): the stopped epoch's was lost
    assert _epoch_rows(stopped) == _epoch_rows(whole) and len(_epoch_rows(whole)) == 3
    if step != 18:
        return
    best = [torch.load(f / "runs/tiny/version_0/checkpoints/best.ckpt", weights_only=False) for f in (whole, stopped)]
    assert best[0]["epoch"] == best[1]["epoch"]
    assert all(torch.equal(v, best[1]["state_dict"][k]) for k, v in best[0]["state_dict"].items())
    more = ["--ckpt_path", "last", "--trainer.max_steps", "24", "--trainer.max_epochs", "4"]
    for proc in finish(*(_start(folder, *more, config=config) for folder in (whole, stopped))):
        assert proc.returncode == 0, proc.stderr[-3000:]
    (val, losses), (val_stopped, losses_stopped) = _validations_and_losses(whole), _validations_and_losses(stopped)
    assert [epoch for epoch, _, _ in val] == ["0", "1", "2", "3"] and val_stopped == val
    assert sorted(losses) == list(range(24)) and losses_stopped == losses


@pytest.mark.slow  # half a minute of Lightning start-ups: the default suite keeps to ~10 minutes
def test_a_run_early_stopping_ended_when_the_signal_came_ends_there_when_resumed(tmp_path):
    """SIGTERM at the last batch of the validation after which EarlyStopping stops the run: the signal is raised
    after the epoch's end, the decision (trainer.should_stop) is in no checkpoint, and the resumed run trained a
    whole epoch more than the run it continues. Now it ends where that run ended."""
    config = """
trainer:
  max_steps: 60
  max_epochs: 10
  log_every_n_steps: 1
  callbacks+:
    - class_path: pytorch_lightning.callbacks.EarlyStopping
      init_args: {monitor: val/cider_d, mode: max, patience: 1, min_delta: 1000}
data:
  eval_batch_size: 4
"""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=12"]
    term += ["--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.val_batch=3"]  # the last of 4
    whole_proc, stopped_proc = finish(_start(whole, config=config), _start(stopped, *term, config=config))
    assert whole_proc.returncode == 0, whole_proc.stderr[-3000:]
    assert stopped_proc.returncode == 143 and "SIGTERM: saved" in stopped_proc.stdout, stopped_proc.stderr[-3000:]
    proc = _fit(stopped, "--ckpt_path", "last", config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [sorted(_losses(folder / "runs" / "tiny" / "version_0")) for folder in (whole, stopped)]
    assert steps[0] == list(range(12)) and steps[1] == steps[0]  # epochs 0 and 1, then early stopping
    # but not for ever: resumed with other limits it trains on (as the whole run's last.ckpt would: one more epoch,
    # then EarlyStopping, whose state comes from the checkpoint and patience from the command, stops it again)
    proc = _fit(stopped, "--ckpt_path", "last", "--trainer.max_steps", "61", config=config)
    assert proc.returncode == 0 and "so it trains on" in proc.stderr, proc.stderr[-3000:]
    assert sorted(_losses(stopped / "runs" / "tiny" / "version_0")) == list(range(18))
    # with more patience: Lightning restored the checkpoint's (1), and the run stopped after one epoch again; now
    # this run's 5 counts (the epochs waited since the best score, 3 after epoch 3, are the checkpoint's)
    proc = _fit(
        stopped, "--ckpt_path", "last", "--trainer.max_steps", "62", "--trainer.callbacks.patience", "5", config=config
    )
    assert proc.returncode == 0 and "patience 5 (this command's" in proc.stderr, proc.stderr[-3000:]
    assert sorted(_losses(stopped / "runs" / "tiny" / "version_0")) == list(range(36))


def test_ckpt_path_last_in_a_config_file_resumes_like_the_flag(tmp_path):
    """Before, only a --ckpt_path flag was looked at: `ckpt_path: last` in a config file reached Lightning,
    which found no last.ckpt in the new run's folder and started afresh in silence."""
    quick = "trainer:\n  limit_val_batches: 0\n  num_sanity_val_steps: 0\n"
    resume = "ckpt_path: last\n" + quick + "  max_steps: 8\n  max_epochs: 2\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    # the resume where there is nothing to resume and the run to resume are independent: side by side
    proc, first = finish(_start(empty, config=resume), _start(tmp_path, config=quick))
    assert proc.returncode != 0 and "no last.ckpt under runs/tiny/" in proc.stderr, proc.stderr[-3000:]
    assert not (empty / "runs").exists()  # no fresh run was started

    assert first.returncode == 0
    proc = _fit(tmp_path, config=resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = Path("runs/tiny/version_0/checkpoints/last.ckpt")
    assert f"resuming from {last}" in proc.stderr
    assert f"Restored all states from the checkpoint at {last}" in proc.stderr


def _best_state(ckpt: Path) -> dict:
    """The state of the ModelCheckpoint that keeps best.ckpt, as the checkpoint ``ckpt`` carries it."""
    import torch

    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    return next(v for k, v in callbacks.items() if "'monitor': 'val/cider_d'" in k)


def test_a_resumed_run_continues_its_directory_and_only_a_better_score_replaces_best_ckpt(tmp_path):
    """Before, a resumed run logged to a new version: ModelCheckpoint's folder changed, Lightning dropped the
    best score it restored, and the first validation after the resume wrote best.ckpt whatever its score."""
    import torch

    # epochs, not max_steps: Lightning 2.6 resumes a max_steps run from an epoch's end checkpoint (last.ckpt) as
    # if that epoch were still to be closed, and counts it twice against max_epochs
    quick = "trainer:\n  num_sanity_val_steps: 0\n  max_steps: -1\n"
    assert _fit(tmp_path, config=quick).returncode == 0  # 6 steps, one epoch, validated at its end
    ckpts = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    best = (ckpts / "best.ckpt").read_bytes()
    score = _best_state(ckpts / "best.ckpt")["best_model_score"]
    assert score is not None and score > -1

    worse = ["--trainer.callbacks+=fake_score.FakeScore", "--trainer.callbacks.value=-1"]
    proc = _fit(tmp_path, "--ckpt_path", "last", *worse, config=quick + "  max_epochs: 2\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == ["version_0"]  # no new run directory
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
    assert (ckpts / "best.ckpt").read_bytes() == best  # the worse validation left it alone
    state = _best_state(ckpts / "last.ckpt")
    assert state["best_model_score"] == score and Path(state["best_model_path"]).name == "best.ckpt"
    # metrics.csv goes on from the first part's rows; config.yaml stays the run's recipe, trained again with -c
    with open(ckpts.parent / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(12))
    assert [float(r["val/cider_d"]) for r in rows if r["val/cider_d"]] == [pytest.approx(float(score)), -1.0]
    assert "ckpt_path: null" in (ckpts.parent / "config.yaml").read_text()

    better = ["--trainer.callbacks+=fake_score.FakeScore", "--trainer.callbacks.value=10"]
    proc = _fit(tmp_path, "--ckpt_path", "last", *better, config=quick + "  max_epochs: 3\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # replaced in place, no best-v1
    assert torch.load(ckpts / "best.ckpt", weights_only=True)["global_step"] == 18
    assert _best_state(ckpts / "best.ckpt")["best_model_score"] == 10


ACCUMULATE = """
trainer:
  max_steps: 8
  max_epochs: 10
  accumulate_grad_batches: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
"""


def _rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row, in order (a step logged twice would show)."""
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_sigterm_inside_an_accumulation_window_saves_at_its_end_and_resumes_exactly(tmp_path):
    """2 batches per optimizer step, SIGTERM after the first batch of step 4's window: before, last.ckpt was
    written there, without the batch's accumulated gradient, and the resumed run took step 4 on the second
    batch alone. Now the window is finished first, and the checkpoint is at step 5."""
    import torch

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=4"]
    term += ["--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.mid_window=true"]
    # the uninterrupted run and the signalled one are independent: they run side by side
    whole_proc, proc = finish(_start(whole, config=ACCUMULATE), _start(killed, *term, config=ACCUMULATE))
    assert whole_proc.returncode == 0
    reference = _rows(whole / "runs" / "tiny" / "version_0")
    assert [s for s, _ in reference] == list(range(8))  # one row per optimizer step

    assert "SIGTERM: saved" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SIGTERM: finishing the gradient accumulation window before saving" in proc.stdout
    last = killed / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    proc = _fit(killed, "--ckpt_path", str(last), config=ACCUMULATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(killed / "runs" / "tiny" / "version_0") == reference


MID_EPOCH_VALIDATION = """
trainer:
  max_steps: 12
  max_epochs: 10
  val_check_interval: 3
  limit_val_batches: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        filename: "{step}"
        save_top_k: -1
"""


def test_a_checkpoint_written_by_a_mid_epoch_validation_resumes_exactly(tmp_path):
    """Checkpoints saved at a validation inside fit (val_check_interval, best.ckpt) carry the data position
    and RNG state too: before, they had none, and a resume re-trained the epoch's first batches."""
    import torch

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    assert _fit(whole, config=MID_EPOCH_VALIDATION).returncode == 0
    run = next(whole.glob("runs/tiny/version_*"))
    reference = _losses(run)
    ckpt = run / "checkpoints" / "step=3.ckpt"
    assert torch.load(ckpt, weights_only=True)["resume"]["batches_done"] == 3
    proc = _fit(resumed, "--ckpt_path", str(ckpt), config=MID_EPOCH_VALIDATION)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _losses(next(resumed.glob("runs/tiny/version_*")))
    assert sorted(again) == list(range(3, 12)), sorted(again)
    for step, loss in again.items():
        assert loss == reference[step], (step, loss, reference[step])


EPOCH_END_CONFIG = _config(
    1000, 4, "{filename: last, save_top_k: 1, save_on_train_epoch_end: true, enable_version_counter: false}"
)


@pytest.mark.slow  # half a minute of Lightning start-ups: the default suite keeps to ~10 minutes
def test_a_step_limited_run_resumes_exactly_from_a_checkpoint_written_at_an_epochs_end(tmp_path):
    """With max_steps set (iteration-based training), Lightning 2.6 took a last.ckpt written at an epoch's end
    for a restart inside that epoch: the resumed run re-drew that epoch's data order, logged every step one
    too high and, counting the epoch twice, stopped one epoch early.

    And the other way round: a run ended by max_steps inside an epoch writes last.ckpt at on_train_epoch_end,
    the epoch marked processed but not completed. Extended with a larger max_steps, Lightning took that for
    the epoch's end and set the sampler to the next epoch: the epoch's last batches came from the next epoch's
    order, and every later epoch's order was shifted. Extended without a step limit (max_steps -1: to the end
    of max_epochs), Lightning skipped the rest of that epoch altogether (22 steps instead of 24)."""
    whole, killed, short = tmp_path / "whole", tmp_path / "killed", tmp_path / "short"
    whole.mkdir(), killed.mkdir(), short.mkdir()
    constant = ["--model.lr_schedule", "constant", "--model.warmup_steps", "0"]  # the same LR whatever max_steps
    # killed at the last batch of the second epoch: last.ckpt is the one written at the first epoch's end
    kill = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=12"]
    # stopped by max_steps at step 10, batch 4 of the second epoch's 6
    # the uninterrupted run, the killed one and the short one are independent: they run side by side
    whole_proc, killed_proc, short_proc = finish(
        _start(whole, *constant, config=EPOCH_END_CONFIG),
        _start(killed, *constant, *kill, config=EPOCH_END_CONFIG),
        _start(short, *constant, "--trainer.max_steps", "10", config=EPOCH_END_CONFIG),
    )
    assert whole_proc.returncode == 0 and short_proc.returncode == 0, short_proc.stderr[-3000:]
    reference = _losses(next(whole.glob("runs/tiny/version_*")))
    assert sorted(reference) == list(range(24))  # 4 epochs of 6 batches
    assert killed_proc.returncode != 0

    unlimited = tmp_path / "unlimited"  # the short run, extended to the end of max_epochs
    shutil.copytree(short, unlimited)
    folders = (killed, short, unlimited)
    runs = [folder / "runs" / "tiny" / "version_0" for folder in folders]
    resume = [["--ckpt_path", str(run / "checkpoints" / "last.ckpt")] for run in runs]
    resume[2] += ["--trainer.max_steps", "-1"]
    procs = finish(*(_start(f, *constant, *r, config=EPOCH_END_CONFIG) for f, r in zip(folders, resume)))
    for proc, run in zip(procs, runs):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _losses(run) == reference, run


def _as_list(batch: list) -> list:
    return batch


class _Echo:
    """A data set whose item is the (index, epoch) the sampler gave."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int]:
        return item


def _resumed_epochs(resume: tuple[int, int], first_epoch: int) -> list[list[tuple[int, int]]]:
    """The (index, epoch) items a resumed run's loader gives in its first two epochs, with 2 workers and
    Lightning's order of calls on a resume: the iterator is made (by setup_data; the workers start drawing from
    it at once) before set_epoch, and that iterator is the first epoch's."""
    from torch.utils.data import DataLoader

    from captioning.data.datamodule import CaptionDataModule, EpochSampler

    dm = CaptionDataModule(batch_size=2)
    dm.train_sampler = EpochSampler(10, seed=0)
    dm.resume_at(*resume)  # (epoch, items done), as on_load_checkpoint calls it, before the loader is made
    loader = DataLoader(
        _Echo(),
        batch_size=2,
        sampler=dm.train_sampler,
        collate_fn=_as_list,
        num_workers=2,
        persistent_workers=True,
    )
    made_early = iter(loader)
    dm.train_sampler.set_epoch(first_epoch)
    epochs = [[x for batch in made_early for x in batch]]
    dm.train_sampler.set_epoch(first_epoch + 1)
    epochs.append([x for batch in iter(loader) for x in batch])
    return epochs


def test_a_checkpoints_seed_read_after_the_loader_was_made_is_taken_by_its_order_and_draws(tmp_path):
    """resume_at with the checkpoint's data seed, after the training loader was made under this run's seed: the
    sampler's order and the caption draws are those of a loader made under the checkpoint's seed."""
    from captioning.data.datamodule import CaptionDataModule

    def made(seed: int):
        torch.manual_seed(seed)
        dm = CaptionDataModule(data_dir=str(tmp_path), num_train=12, num_val=4, num_test=4, batch_size=2)
        dm.captions_per_image = 2
        dm.prepare_data()
        dm.train_dataloader()
        return dm

    theirs, ours = made(7), made(0)
    ours.window_counts(range(2))  # counted (and kept) under this run's seed
    ours.resume_at(0, 4, seed=7)
    theirs.resume_at(0, 4)
    assert ours.data_seed == theirs.data_seed == 7
    assert list(ours.train_sampler) == list(theirs.train_sampler)
    assert [ours._train_set._chosen(i, 0) for i in range(12)] == [theirs._train_set._chosen(i, 0) for i in range(12)]
    assert ours.window_counts(range(2)) == theirs.window_counts(range(2))


def _order(epoch: int) -> list[tuple[int, int]]:
    from captioning.data.datamodule import EpochSampler

    sampler = EpochSampler(10, seed=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_a_resumed_loader_with_workers_continues_where_the_checkpoint_stopped():
    """With data-loader workers a resume was not exact: the workers drew the resumed epoch's items as the iterator
    was made, before set_epoch gave the sampler the checkpoint's epoch and position, so that epoch was trained
    from epoch 0's start and the skip fell on the next epoch."""
    # mid-epoch: epoch 1 after its first 2 batches of 2 items, then epoch 2 whole
    assert _resumed_epochs((1, 4), first_epoch=1) == [_order(1)[4:], _order(2)]
    # written at epoch 1's end (all 5 batches done): Lightning goes on with epoch 2, whole
    assert _resumed_epochs((1, 10), first_epoch=2) == [_order(2), _order(3)]


@pytest.mark.parametrize("max_steps", [-1, 9])
def test_a_resume_from_an_epochs_end_under_limit_train_batches_starts_the_next_epochs_order(tmp_path, max_steps):
    """With trainer.limit_train_batches an epoch takes fewer items than the sampler has, so the sampler could not
    tell a checkpoint written at the epoch's end from one inside it: a resume with data-loader workers trained
    its next epoch on the rest of the finished epoch's order (its batches 3-5 instead of the next epoch's 0-2)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    class Seen(pl.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append((trainer.current_epoch, batch_idx, batch[0].sum().item()))

    def run(folder, ckpt=None):
        pl.seed_everything(0, verbose=False)
        data = CaptionDataModule(
            dataset="shapes", data_dir=str(tmp_path / "shapes"), image_size=32, batch_size=8, num_train=48,
            num_val=8, num_test=8, num_workers=2,
        )  # fmt: skip
        data.prepare_data()
        module = CaptionModule(
            vocab=data.vocab_tokens, encoder="small_cnn", encoder_channels=(4, 8, 8, 8), embed_dim=8, hidden_dim=16,
            attention_dim=8, image_size=32, dropout=0.0, lr_schedule="constant", warmup_steps=0,
        )  # fmt: skip
        seen = Seen()
        every_epoch = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=3, max_steps=max_steps, limit_train_batches=3, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[every_epoch, seen],
        )  # fmt: skip
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        return seen.batches, module

    whole, whole_module = run(tmp_path / "whole")
    resumed, resumed_module = run(tmp_path / "resumed", ckpt=str(tmp_path / "whole" / "epoch=0.ckpt"))
    assert [b[:2] for b in whole] == [(e, i) for e in range(3) for i in range(3)]
    assert resumed == whole[3:]
    for a, b in zip(whole_module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_resume_puts_back_the_fit_rows_a_stopped_spawned_test_had_moved_aside(tmp_path, capsys):
    """Under ddp_spawn the test after fit moves metrics.csv aside (metrics.fit.csv) while its ranks run; stopped
    there (SIGTERM to the process group), the file stayed aside, and the resume read no rows: a review's resumed run
    kept steps 6-9 of 0-9. Now the resume puts the fit's rows back and drops the stopped test's."""
    from pytorch_lightning.loggers import CSVLogger

    from captioning.cli import _keep_metrics_before

    logger = CSVLogger(tmp_path, name="tiny", version=0)
    run = Path(logger.log_dir)
    run.mkdir(parents=True)
    fit_rows = "epoch,step,train/loss\n" + "".join(f"0,{s},{s / 10}\n" for s in range(6))
    (run / "metrics.fit.csv").write_text(fit_rows)
    (run / "metrics.csv").write_text("epoch,step,test/cider_d\n0,0,0.5\n")  # the stopped test's, unstamped
    _keep_metrics_before(logger, 4)
    logger.experiment.save()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(str(s), str(s / 10)) for s in range(4)]
    assert not (run / "metrics.fit.csv").exists()
    assert "the fit's rows put back from metrics.fit.csv" in capsys.readouterr().err


def test_a_resume_writes_the_kept_rows_back_at_once_and_one_stopped_before_that_loses_none(tmp_path):
    """A resumed run's writer deleted metrics.csv as it opened and held the kept rows in memory until its first
    save, after the data set-up: a review's resume killed in setup left no metrics.csv, and the next resume kept
    nothing of steps 0-7. Now the rows are on disk when the run goes on, and the file waits aside until they are."""
    from pytorch_lightning.loggers import CSVLogger

    from captioning.cli import _keep_metrics_before

    def logger() -> CSVLogger:
        return CSVLogger(tmp_path, name="tiny", version=0)

    run = Path(logger().log_dir)
    run.mkdir(parents=True)
    whole = "epoch,step,train/loss\n" + "".join(f"0,{s},{s / 10}\n" for s in range(10))
    (run / "metrics.csv").write_text(whole)
    _keep_metrics_before(logger(), 6)  # then the run is killed: its writer never saves
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == [str(s) for s in range(6)]
    # the file as it was waits aside until a loop starts (RunConfigCallback deletes it then); killed before that, or
    # between moving the file aside and writing the rows back, the next resume starts from the file aside
    assert (run / "metrics.resume.csv").read_text() == whole
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,0.0\n")  # a partial write-back
    _keep_metrics_before(logger(), 8)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(str(s), str(s / 10)) for s in range(8)]
    assert (run / "metrics.resume.csv").read_text() == whole


def test_a_mid_epoch_resume_with_another_batch_size_or_process_count_trains_each_image_once():
    """A resume skipped its own batches of its own size: a run stopped after 3 batches of 2 and resumed with batches
    of 4 skipped 12 items, not 6 (a review's: 8 images of an epoch twice; with 2 processes instead of 1, 16 never).
    It now goes on after the items the interrupted run took, shared out among this run's processes."""
    from captioning.checkpoint_io import CheckpointError
    from captioning.data.datamodule import EpochSampler
    from captioning.lit_module import _rank_items_done

    resume = {"epoch": 1, "batches_done": 4, "items_done": 8}  # one process, batches of 2
    for world, batch in [(1, 4), (2, 2), (4, 1), (1, 8), (2, 4)]:
        items = _rank_items_done(resume, 4, batch, world, "x.ckpt")
        taken = []
        for rank in range(world):
            sampler = EpochSampler(10, seed=0, num_replicas=world, rank=rank)
            sampler.resume_at(1, items)
            sampler.set_epoch(1)
            taken += [i for i, _ in sampler]
        padded = EpochSampler(10, seed=0, num_replicas=world).order(1)
        assert sorted(taken) == sorted(padded[8:]), (world, batch)  # the rest of the epoch's order, each once
    # 3 processes cannot share 8 items; batches of 3 (or 2 processes with batches of 3) do not end at item 8, and
    # Lightning's count of batches done, which the next checkpoint stores, would then not be the items trained
    for world, batch in [(3, 1), (1, 3), (2, 3)]:
        with pytest.raises(CheckpointError, match=f"x.ckpt: written 8 training items into epoch 1, which {world} "):
            _rank_items_done(resume, 4, batch, world, "x.ckpt")
    # a checkpoint from before items_done was stored: this run's batches, as before
    assert _rank_items_done({"epoch": 1, "batches_done": 3}, 3, 4, 1, "x.ckpt") == 12
    assert _rank_items_done(resume, 0, 3, 3, "x.ckpt") == 0  # at an epoch's start: nothing to skip


def test_a_run_resumed_mid_epoch_with_a_larger_batch_trains_the_rest_of_that_epoch(tmp_path):
    """Stopped after 2 batches of 8 of epoch 1 (48 images), resumed with batches of 16: it skipped 2 batches of 16,
    so 16 of the epoch's images were never trained in it. Each image once, now."""
    import json

    record = ["--trainer.callbacks+=record_images.RecordImages"]
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=8"]
    proc = _fit(tmp_path, *record, *term, "--trainer.callbacks.signal_name=SIGTERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    proc = _fit(tmp_path, *record, "--ckpt_path", "last", "--data.batch_size", "16", "--trainer.max_steps", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataloader is not resumable" not in proc.stderr  # Lightning's warning: it is, through resume_at
    batches = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    epochs = [[h for b in batches if b["epoch"] == e for h in b["images"]] for e in (0, 1)]
    assert len(epochs[0]) == len(set(epochs[0])) == 48
    assert sorted(epochs[1]) == sorted(epochs[0])  # the same images, each once


def test_a_resume_refused_as_it_restores_the_checkpoint_leaves_the_runs_config_and_metrics_as_they_were(
    tiny_run, tmp_path
):
    """A resume refused at the checkpoint (another model) had written its own config.yaml over the run's, so
    `fit -c runs/.../config.yaml` then trained the refused model; and it had dropped the rows of the steps from the
    checkpoint's on from metrics.csv, the test after fit's row among them. A resume that runs then deletes the copy
    of metrics.csv it kept aside."""
    shutil.copytree(tiny_run / "runs", tmp_path / "runs")
    run = tmp_path / "runs" / "tiny" / "version_0"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    assert b"test/" in before["metrics.csv"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    refused = ["fit", "-c", str(TINY), "--ckpt_path", ckpt, "--model.hidden_dim", "48"]
    proc = finish(start_script(str(ROOT / "train.py"), *refused, cwd=tmp_path))
    assert proc.returncode != 0 and "model configuration mismatch" in proc.stderr, proc.stderr[-2000:]
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "metrics.resume.csv").exists()
    # a resume of the finished run without a test after it runs no loop (max_steps reached): nothing changes either
    done = ["fit", "-c", str(TINY), "--ckpt_path", ckpt, "--test_after_fit", "false"]
    proc = finish(start_script(str(ROOT / "train.py"), *done, cwd=tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "metrics.csv").read_bytes() == before["metrics.csv"] and not (run / "metrics.resume.csv").exists()
    # the same resume with the run's own model goes on: its config.yaml written, the copy aside gone
    resumed = ["fit", "-c", str(TINY), "--ckpt_path", ckpt, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3"]
    proc = finish(start_script(str(ROOT / "train.py"), *resumed, cwd=tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_epochs: 3" in (run / "config.yaml").read_text() and not (run / "metrics.resume.csv").exists()
