"""The default job itself: `python train.py` on a fresh folder reaches the documented floors."""

import pytest

from conftest import ROOT, read_json, run_script


@pytest.mark.slow
def test_default_training_run_reaches_the_floors(tmp_path):
    proc = run_script(str(ROOT / "train.py"), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(next(tmp_path.glob("runs/shapes/*/test_metrics.json")))
    assert metrics["bleu4"] >= 0.60, metrics
    assert metrics["object_accuracy"] >= 0.90, metrics
    assert metrics["pointing_accuracy"] >= 0.70, metrics
    image = next(tmp_path.glob("data/shapes/images/*.png"))
    proc = run_script(str(ROOT / "infer.py"), str(image), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{image.stem}_attention.png").is_file()
