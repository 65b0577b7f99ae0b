"""Orphaned temporary files: a live writer's file is kept and a dead writer's removed, judged by the
writer's lock on its file, not by a process id (ids repeat across containers and get reused)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from captioning.data.tempfiles import locked_temp, make_folder, remove_orphans, try_lock

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


def test_a_file_standing_where_a_folder_must_go_is_said_to_be_one(tmp_path):
    """data_dir afile/shapes, with afile a file: "afile: File exists", as if the folder were there."""
    (tmp_path / "afile").write_text("")
    for call in (lambda: make_folder(tmp_path / "afile"), lambda: try_lock(tmp_path / "afile" / "x.lock")):
        with pytest.raises(NotADirectoryError) as info:
            call()
        assert info.value.filename == str(tmp_path / "afile") and info.value.strerror == "a file, not a folder"
    with pytest.raises(NotADirectoryError):  # below the file: the system's own ENOTDIR, naming the folder asked for
        make_folder(tmp_path / "afile" / "shapes")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match=f"a link to {tmp_path / 'nowhere'}, which is not there"):
        make_folder(tmp_path / "dangling")
    make_folder(tmp_path / "new" / "deeper")
    make_folder(tmp_path / "new" / "deeper")  # there already: nothing to do
    assert (tmp_path / "new" / "deeper").is_dir()
