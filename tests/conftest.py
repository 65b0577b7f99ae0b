"""Shared fixtures: a tiny generated shapes set and one tiny trained checkpoint per session."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def run_script(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh interpreter (as a user would), alone: with torch's own
    number of threads."""
    return finish(start_script(*args, cwd=cwd, threads=None), timeout=timeout)


_PORTS_GIVEN: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out to bind(0) and connect(), inclusive."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default; macOS's is 49152-65535
    return low, high


def free_port() -> int:
    """A free TCP port for a DDP rendezvous that no other test of this session was given, from outside the range
    the kernel picks ports from for bind(0) and connect(). Lightning finds a port with bind(0) and closes it;
    the ranks listen on it seconds later, and with two DDP runs side by side one of them failed with EADDRINUSE
    (the other run's sockets, which take ephemeral ports, had it by then). A port outside that range can only
    be taken by someone asking for it by number."""
    low, high = ephemeral_port_range()
    candidates = [p for p in range(20000, 65536) if not low <= p <= high and p not in _PORTS_GIVEN]
    for port in random.Random().sample(candidates, min(100, len(candidates))):  # own RNG: tests seed the global one
        with socket.socket() as sock:
            try:
                sock.bind(("", port))  # as the rendezvous store will
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port found in 20000-65535 outside the ephemeral range {low}-{high}")


def start_script(*args: str, cwd: Path, threads: int | None = 1) -> subprocess.Popen:
    """:func:`run_script` without waiting: runs of one test that do not depend on each other overlap (most of a
    tiny train.py run is its interpreter importing Lightning, on one core). The environment is read now, so a
    caller may restore what it changed for this run as soon as this returns. Collect it with :func:`finish`.
    Each run gets a MASTER_PORT of its own (:func:`free_port`), used by a DDP run's ranks.

    ``threads``: OMP_NUM_THREADS for the run (None: torch's own choice, one per core), unless the environment
    sets it. One by default: with runs side by side, a thread per core in each made OpenMP's waiting threads
    spin against each other's work (three tiny runs on 2 cores took 2.9x the CPU time of one-thread runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("MASTER_PORT", str(free_port()))
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
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
