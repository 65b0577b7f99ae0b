"""The default job itself: `python train.py` on a fresh folder reaches the documented floors."""

import pytest

from conftest import ROOT, read_json, run_script


@pytest.mark.slow
def test_default_training_run_reaches_the_floors(tmp_path):
    # a guard against a hang, not a speed check (benchmarks measure speed): the run took about 6 minutes on
    # the 2-vCPU AVX-512 VM of README's Results and 24 on a 2-vCPU AVX2 one (measured alone), where 900 s stopped it at
    # epoch 9 of 20
    proc = run_script(str(ROOT / "train.py"), cwd=tmp_path, timeout=2700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(next(tmp_path.glob("runs/shapes/*/test_metrics.json")))
    assert metrics["bleu4"] >= 0.60, metrics
    assert metrics["object_accuracy"] >= 0.90, metrics
    assert metrics["pointing_accuracy"] >= 0.70, metrics
    image = next(tmp_path.glob("data/shapes/images/*.png"))
    proc = run_script(str(ROOT / "infer.py"), str(image), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{image.stem}_attention.png").is_file()
