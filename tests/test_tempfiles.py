"""Orphaned temporary files: a live writer's file is kept and a dead writer's removed, judged by the
writer's lock on its file, not by a process id (ids repeat across containers and get reused)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap

from captioning.data.tempfiles import file_lock, locked_temp, remove_lock, remove_orphans, try_lock

from conftest import ROOT


def test_a_locked_file_is_kept_whatever_its_name_and_an_unlocked_one_removed_whatever_its_name(tmp_path):
    """A writer in another PID namespace: its id means nothing here (999999999: no such process here),
    but it holds its lock, so it is alive. An orphan whose id was reused by a live process (our parent
    is alive) holds no lock, so it is dead."""
    other_container = tmp_path / "c.npy.tmp999999999"
    reused_pid = tmp_path / f"c.npy.tmp{os.getppid()}"
    dead_folder = tmp_path / f"c.npy.tmp{os.getppid()}0"
    other_container.write_bytes(b"being written")
    reused_pid.write_bytes(b"partial")
    (dead_folder / "images").mkdir(parents=True)
    fd = os.open(other_container, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live writer holds, in whatever container it runs
        assert sorted(remove_orphans(tmp_path, "c.npy.tmp*")) == sorted([reused_pid, dead_folder])
        assert other_container.read_bytes() == b"being written"
    finally:
        os.close(fd)
    assert remove_orphans(tmp_path, "c.npy.tmp*") == [other_container]  # its writer gone: an orphan now


def test_a_live_writers_temp_file_survives_a_cleaner_and_is_removed_once_the_writer_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from captioning.data.tempfiles import locked_temp
        with locked_temp(Path({str(tmp_path)!r}), "c.npy.tmp") as tmp:
            tmp.write_bytes(b"partial")
            print(tmp, flush=True)
            sys.stdin.read()  # write until told to stop (or killed)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        held = tmp_path / writer.stdout.readline().decode().strip()
        assert held.is_file()
        with locked_temp(tmp_path, "c.npy.tmp") as mine:  # this process's own file is held too
            assert remove_orphans(tmp_path, "c.npy.tmp*") == []
            assert held.is_file() and mine.is_file()
        assert not mine.exists()  # removed at the end of its block
        writer.send_signal(signal.SIGKILL)  # killed mid-write: the kernel drops its lock, the file stays
        writer.wait()
        assert held.is_file()
        assert remove_orphans(tmp_path, "c.npy.tmp*") == [held]
    finally:
        writer.kill()
        writer.wait()


def test_a_temp_folder_is_held_and_a_renamed_temp_is_not_removed(tmp_path):
    with locked_temp(tmp_path, ".set.tmp-", directory=True) as tmp:
        (tmp / "x.png").write_bytes(b"png")
        assert remove_orphans(tmp_path, ".set.tmp-*") == []
        tmp.rename(tmp_path / "set")
    assert (tmp_path / "set" / "x.png").read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_a_lock_file_is_removed_only_when_free_and_a_waiter_then_locks_the_file_at_its_path(tmp_path):
    """remove_lock deletes a lock file no process holds (a stale feature cache key's), keeps a held one; a process
    that was waiting for the lock on the deleted file must not take that file's lock as the path's, or it and a
    process locking the new file at the path would both hold "the" lock."""
    import threading
    import time

    path = tmp_path / "x.lock"
    held = try_lock(path)
    assert held is not None and not remove_lock(path) and path.exists()  # held: kept
    entered = threading.Event()

    def waiter():
        with file_lock(path):
            entered.set()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)  # the waiter has the old file open and waits for its lock
    path.unlink()  # what remove_lock does once it holds the lock
    newer = try_lock(path)  # another process: a new file at the path, locked
    assert newer is not None
    os.close(held)  # the old file's lock is free: the waiter gets it, sees the file gone, waits for the new one
    try:
        assert not entered.wait(timeout=0.5), "the waiter held the deleted file's lock as the path's"
    finally:
        os.close(newer)
    t.join(timeout=10)
    assert entered.is_set()
    assert remove_lock(path) and not path.exists()  # free: removed
    assert not remove_lock(path)  # nothing there
