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

import errno
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


def make_folder(path: Path) -> None:
    """``path.mkdir(parents=True, exist_ok=True)``, saying "Not a directory" where a file stands on the path: mkdir
    said "File exists", which reads as if the folder were there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        if e.filename is not None and os.path.islink(e.filename):  # a link to nothing: where it points is the news
            raise NotADirectoryError(
                errno.ENOTDIR, f"a link to {os.readlink(e.filename)}, which is not there", e.filename
            ) from None
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", e.filename) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def locked_temp(folder: Path, prefix: str, directory: bool = False, mode: int = 0o666) -> Iterator[Path]:
    """A new, uniquely named file (or folder) ``folder/{prefix}{random}``, locked for as long as the
    ``with`` block runs so that :func:`remove_orphans` leaves it alone; removed at the end unless it was
    renamed away (the usual end of a successful write). A file is created with ``mode`` (less the umask)."""
    folder = Path(folder)
    make_folder(folder)
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
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
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


def _open_lock(path: Path) -> int:
    """An fd of the lock file ``path``, created (with its folder) if missing."""
    path = Path(path)
    make_folder(path.parent)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


@contextmanager
def file_lock(path: Path, shared: bool = False, wait_message: str | None = None) -> Iterator[int]:
    """Hold an flock on the lock file ``path`` for the ``with`` block; yields its fd. The file is created
    if missing and never deleted (deleting a lock file lets two processes lock two different files of
    one name). ``wait_message`` is printed when another process holds the lock, before waiting for it."""
    fd = _open_lock(path)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_message:
                print(wait_message, flush=True)
            fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """An exclusive flock on the lock file ``path`` (created if missing, never deleted) if no other
    process holds it now: its fd, to close when done; None when it is held."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
