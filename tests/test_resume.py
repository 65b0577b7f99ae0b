"""Exact resume: a run killed with SIGKILL continues from its last checkpoint with the same losses."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from conftest import ROOT, TINY, run_script

CONFIG = """
trainer:
  max_steps: 12
  max_epochs: 10
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        filename: "{step}"
        every_n_train_steps: 3
        save_top_k: -1
"""


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _fit(cwd: Path, *extra: str, config: str = CONFIG):
    (cwd / "resume.yaml").write_text(config)
    args = ["fit", "-c", str(TINY), "-c", "resume.yaml", "--test_after_fit", "false", *extra]
    env_path = str(ROOT / "tests")
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        return run_script(str(ROOT / "train.py"), *args, cwd=cwd)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]


def test_sigkill_after_step_7_then_resume_gives_the_same_losses(tmp_path):
    """Resumed mid-epoch (step 3 of 6) and at an epoch's end (step 6: the next epoch's loader is made
    before the checkpoint's RNG state is restored, so it must not draw from that RNG)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    assert _fit(whole).returncode == 0
    reference = _losses(next(whole.glob("runs/tiny/version_*")))
    assert len(reference) == 12

    kill = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=7"]
    proc = _fit(killed, *kill)
    assert proc.returncode != 0  # killed
    for version, step in ((1, 3), (2, 6)):
        ckpt = next(killed.glob(f"runs/tiny/version_0/checkpoints/step={step}.ckpt"))
        proc = _fit(killed, "--ckpt_path", str(ckpt))
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = _losses(killed / "runs" / "tiny" / f"version_{version}")
        assert sorted(resumed) == list(range(step, 12)), sorted(resumed)
        for s, loss in resumed.items():
            assert loss == reference[s], (step, s, loss, reference[s])


def test_same_seed_same_losses_with_workers_and_a_different_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = _fit(cwd, "--data.num_workers", "2", "--seed_everything", str(seed), "--trainer.max_steps", "8")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _losses(next(cwd.glob("runs/tiny/version_*")))
    assert len(runs["a"]) == 8
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=7"]
    proc = _fit(tmp_path, *term, "--trainer.callbacks.signal_name=SIGTERM")
    assert "SIGTERM: saved" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    import torch

    last = next(tmp_path.glob("runs/tiny/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 7
    # "--ckpt_path last" resumes from that newest last.ckpt, not from scratch
    proc = _fit(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {last.relative_to(tmp_path)}" in proc.stderr
    assert sorted(_losses(tmp_path / "runs" / "tiny" / "version_1")) == [7, 8]


def test_ckpt_path_last_in_a_config_file_resumes_like_the_flag(tmp_path):
    """Before, only a --ckpt_path flag was looked at: `ckpt_path: last` in a config file reached Lightning,
    which found no last.ckpt in the new run's folder and started afresh in silence."""
    quick = "trainer:\n  limit_val_batches: 0\n  num_sanity_val_steps: 0\n"
    resume = "ckpt_path: last\n" + quick + "  max_steps: 8\n  max_epochs: 2\n"
    proc = _fit(tmp_path, config=resume)
    assert proc.returncode != 0 and "no last.ckpt under runs/ to resume from" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no fresh run was started

    assert _fit(tmp_path, config=quick).returncode == 0
    proc = _fit(tmp_path, config=resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = Path("runs/tiny/version_0/checkpoints/last.ckpt")
    assert f"resuming from {last}" in proc.stderr
    assert f"Restored all states from the checkpoint at {last}" in proc.stderr


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
