"""Temporary files and folders that tell whether their writer is still alive, and file locks.

A writer holds an exclusive ``flock`` on its temporary file or folder for as long as it writes it;
the kernel drops the lock when the writer exits, however it exits. So a later writer removes only
the temporaries whose lock it can take: a killed build's leftovers go, a live writer's file stays.
Process ids are not used for this: they are not unique across PID namespaces (containers) or hosts
sharing a filesystem, and they are reused, so ``os.kill(pid, 0)`` both kills live writers' files
and keeps orphans forever. flock works across containers on one host and, on Linux, across NFS
clients (the client emulates it with the server's byte-range locks).

The one implementation of this for the feature cache and the generated shapes set.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _same_file(path: Path, fd: int) -> bool:
    """``path`` still names the file or folder open as ``fd`` (not removed, nor replaced by another)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def locked_temp(folder: Path, prefix: str, directory: bool = False) -> Iterator[Path]:
    """A new, uniquely named file (or folder) ``folder/{prefix}{random}``, locked for as long as the
    ``with`` block runs so that :func:`remove_orphans` leaves it alone; removed at the end unless it was
    renamed away (the usual end of a successful write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        # a random name, not the process id: ids repeat across containers sharing the folder. Created
        # with the usual permissions (umask), not tempfile's owner-only ones: the path is renamed into
        # place and becomes the cache or data set other users may read.
        path = folder / f"{prefix}{secrets.token_hex(6)}"
        try:
            if directory:
                path.mkdir()
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except FileNotFoundError:  # our new empty folder removed by a cleaner before we opened it
            continue
        # Blocking: a cleaner holds the lock only while it removes the path. If it got there first (in
        # the instant between creating the path and locking it), the path is gone: take another name.
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(path, fd):
            break
        os.close(fd)
    try:
        yield path
    finally:
        try:
            if _same_file(path, fd):
                _remove(path)
        finally:
            os.close(fd)


def remove_orphans(folder: Path, pattern: str) -> list[Path]:
    """Delete the files or folders in ``folder`` matching the glob ``pattern`` that no live writer holds
    locked (see :func:`locked_temp`; this process's own temporaries are held, so they stay); returns what
    was deleted. Symbolic links are never followed."""
    removed = []
    for path in Path(folder).glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a symbolic link, or not ours to read: leave it
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            if not _same_file(path, fd):
                continue  # replaced since the glob
            _remove(path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _lock(path: Path, mode: int, wait_message: str | None, blocking: bool = True) -> int | None:
    """An fd of the lock file ``path`` (created if missing) holding an flock in ``mode``; None when it is held
    elsewhere and not ``blocking``. Checked after locking: where :func:`remove_lock` deleted the file while this
    process waited for it, the lock held is on a file no longer there, which a third process could not see, so
    the file now at ``path`` is locked instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                os.close(fd)
                return None
            if wait_message and not told:
                print(wait_message, flush=True)
                told = True
            fcntl.flock(fd, mode)
        if _same_file(path, fd):
            return fd
        os.close(fd)


@contextmanager
def file_lock(path: Path, shared: bool = False, wait_message: str | None = None) -> Iterator[int]:
    """Hold an flock on the lock file ``path`` for the ``with`` block; yields its fd. The file is created
    if missing; only :func:`remove_lock` deletes it. ``wait_message`` is printed when another process holds
    the lock, before waiting for it."""
    fd = _lock(path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait_message)
    try:
        yield fd
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """An exclusive flock on the lock file ``path`` (created if missing) if no other process holds it now:
    its fd, to close when done; None when it is held."""
    return _lock(path, fcntl.LOCK_EX, None, blocking=False)


def remove_lock(path: Path) -> bool:
    """Delete the lock file ``path`` unless a process holds it; True when deleted. Safe against processes that
    opened it meanwhile: :func:`file_lock` and :func:`try_lock` check, once they hold a lock, that its file is
    still there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # gone, a symbolic link, or not ours to open
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _same_file(path, fd):
            return False
        Path(path).unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
