"""Learning-rate schedules through train.py: what each optimizer step's learning rate is."""

from __future__ import annotations

import csv
import math

import pytest

from conftest import ROOT, TINY, run_script

QUICK = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--test_after_fit", "false"]


def _lrs(tmp_path, *extra) -> dict[int, tuple[float, float]]:
    """step -> (decoder LR, encoder LR) of a tiny fit (6 batches per epoch), as LearningRateMonitor saw them."""
    monitor = "--trainer.callbacks+=LearningRateMonitor"
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), *QUICK, monitor, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(next(tmp_path.glob("runs/tiny/version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return {int(r["step"]): (float(r["lr-AdamW/pg1"]), float(r["lr-AdamW/pg2"])) for r in rows}


def test_step_decay_happens_at_epoch_ends_even_when_max_steps_ends_training(tmp_path):
    """Before, steps per epoch were max_steps-bound total // max_epochs = 4, not the loader's 6."""
    extra = ["--trainer.max_steps", "12", "--trainer.max_epochs", "3", "--model.lr_schedule", "step"]
    extra += ["--model.lr_decay_epochs", "1", "--model.lr_decay", "0.5", "--model.warmup_steps", "0"]
    lrs = _lrs(tmp_path, *extra, "--model.encoder_lr", "0.0005")
    assert sorted(lrs) == list(range(12))
    for step, (dec, enc) in lrs.items():
        factor = 0.5 ** (step // 6)
        assert dec == pytest.approx(0.002 * factor) and enc == pytest.approx(0.0005 * factor), step


def test_cosine_after_a_linear_warmup(tmp_path):
    lrs = _lrs(tmp_path, "--trainer.max_steps", "20", "--trainer.max_epochs", "-1", "--model.warmup_steps", "5")
    warmup, total = 2, 20  # warmup is capped at a tenth of the run
    for step, (dec, enc) in lrs.items():
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert dec == pytest.approx(0.002 * factor) and enc == dec, step
