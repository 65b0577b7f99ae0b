"""Shared fixtures: a tiny generated shapes set and one tiny trained checkpoint per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def run_script(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh interpreter (as a user would)."""
    return finish(start_script(*args, cwd=cwd), timeout=timeout)


def start_script(*args: str, cwd: Path) -> subprocess.Popen:
    """:func:`run_script` without waiting: runs of one test that do not depend on each other overlap (most of a
    tiny train.py run is its interpreter importing Lightning, on one core). The environment is read now, so a
    caller may restore what it changed for this run as soon as this returns. Collect it with :func:`finish`."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own: see stop()
    )


def stop(proc: subprocess.Popen) -> None:
    """Kill a run started by :func:`start_script` and every process it started (the ranks of a DDP run, the
    workers of a loader), which share its process group. Killing the run alone left a hung DDP run's ranks
    running, or waiting in a collective, for the rest of the session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone: the run and all it started have exited
        pass


def finish(*procs: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess | list:
    """Wait for runs started by :func:`start_script`, each for at most ``timeout`` seconds; on a timeout or an
    interrupt every one of them is killed with all it started (:func:`stop`) and the exception goes on, as with
    subprocess.run. A process a finished run left behind (a rank whose main process died) is killed too. One
    run gives its CompletedProcess, several a list."""
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            stop(proc)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except BaseException:  # a timeout (a hang) or an interrupt: kill them as subprocess.run does
        for proc in procs:
            stop(proc)
            proc.communicate()
        raise
    return done[0] if len(done) == 1 else done


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A generated shapes set of 48/16/16 images; returns its Karpathy JSON."""
    from captioning.data.synthetic import ShapesConfig, generate

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate(root, ShapesConfig(num_train=48, num_val=16, num_test=16), progress=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """`python train.py fit -c configs/tiny.yaml` in a scratch folder; returns that folder."""
    work = tmp_path_factory.mktemp("run")
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (work / "train_stdout.txt").write_text(proc.stdout)
    return work


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run: Path) -> Path:
    found = sorted(tiny_run.glob("runs/tiny/*/checkpoints/best.ckpt"))
    assert found, "training wrote no best.ckpt"
    return found[-1]


def read_json(path: Path):
    return json.loads(Path(path).read_text())
