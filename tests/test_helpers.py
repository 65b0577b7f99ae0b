"""The test helpers themselves: a run that hangs is killed with every process it started."""

import os
import subprocess
import time

import pytest

from conftest import ephemeral_port_range, finish, run_script, start_script

SPAWNS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open("child.pid", "w").write(str(child.pid))
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _within(seconds: float, ready) -> bool:
    """Poll ``ready()`` until it is true (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_a_run_that_times_out_is_killed_with_the_processes_it_started(tmp_path):
    """As a hung DDP run's ranks: killing the run alone left them running, and holding its output pipes, so the
    wait for its last output after the kill lasted as long as they did (here 120 s; a rank waiting in a
    collective, for ever)."""
    proc = start_script("-c", SPAWNS, cwd=tmp_path)
    pid_file = tmp_path / "child.pid"
    _within(10, lambda: pid_file.exists() and pid_file.read_text())
    child = int(pid_file.read_text())
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        finish(proc, timeout=1)
    assert time.monotonic() - started < 30
    assert _within(10, lambda: _gone(child))


def test_runs_started_side_by_side_get_their_own_rendezvous_port_outside_the_ephemeral_range(tmp_path):
    """Two ddp_spawn runs started together each let Lightning pick a port with bind(0) and close it; their ranks
    listen on it seconds later, and a CI run failed with EADDRINUSE in between (another socket of the
    concurrent runs had it by then). Each started script gets a MASTER_PORT of its own, from outside the range
    the kernel hands out to bind(0) and connect()."""
    show = "import os; print(os.environ['MASTER_PORT'])"
    procs = finish(*(start_script("-c", show, cwd=tmp_path) for _ in range(3)))
    ports = [int(p.stdout) for p in procs]
    low, high = ephemeral_port_range()
    assert len(set(ports)) == 3 and not any(low <= p <= high for p in ports), (ports, low, high)


def test_runs_started_side_by_side_take_one_thread_each_and_a_run_alone_takes_torchs_choice(tmp_path):
    """Runs side by side with a thread per core each made OpenMP's waiting threads spin against each other's
    work (2.9x the CPU time); a run alone keeps torch's own number of threads. A thread count the environment
    sets is kept."""
    show = "import os; print(os.environ.get('OMP_NUM_THREADS', 'unset'))"
    side_by_side = finish(*(start_script("-c", show, cwd=tmp_path) for _ in range(2)))
    assert [p.stdout.strip() for p in side_by_side] == [os.environ.get("OMP_NUM_THREADS", "1")] * 2
    alone = run_script("-c", show, cwd=tmp_path).stdout.strip()
    assert alone == os.environ.get("OMP_NUM_THREADS", "unset")
