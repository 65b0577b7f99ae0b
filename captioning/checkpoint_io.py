"""Checkpoint reading and writing that can be trusted.

- Reading: always ``torch.load(weights_only=True)``, so a checkpoint can never run code; a file
  holding anything else is refused as untrusted, a truncated or corrupt file is named as such, tensors saved
  on a GPU are mapped to wherever they are loaded (the CPU by default).
- Writing: to a temporary file in the same folder, flushed to disk, then renamed over the target
  (``os.replace`` is atomic), so a crash during a save leaves the previous checkpoint intact; the
  file gets the permissions ``open()`` would give it (or the replaced file's). A killed save's temporary
  file is removed by the next save of the same file.

Inference uses these directly (without importing Lightning); training uses them through
:class:`captioning.cli.SafeCheckpointIO` (resume, validate, test).
"""

from __future__ import annotations

import glob
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from captioning.data.tempfiles import locked_temp, remove_orphans
from captioning.errors import InputError


class CheckpointError(InputError):
    """A checkpoint could not be used; the message names the file and the cause."""


def load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if "GLOBAL" in reason:  # a class or function: loading the object could run its code
            raise CheckpointError(
                f"{path}: refused: the file holds objects that are not plain tensors and containers, so it is "
                f"untrusted and was not loaded ({reason})"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason})") from None
    except Exception as e:  # a damaged zip or pickle surfaces as any of RuntimeError, KeyError, IndexError, ...
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(e).__name__}: {e})"
        ) from None


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only error says about this file, without its general advice paragraphs."""
    reason = []
    for line in str(e).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        elif line.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)")):
            continue
        if line:
            reason.append(line)
    return " ".join(reason) or str(e).splitlines()[0]


def _new_file_mode(path: Path) -> int:
    """Permissions for a checkpoint written to ``path``: the old file's where there is one, else what
    ``open()`` would give (0o666 less the umask). ``mkstemp`` creates 0o600, which would leave a
    checkpoint unreadable to the rest of a team sharing the runs folder."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it, even for a moment,
    would affect files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save ``obj`` so that ``path`` holds either the old file or the complete new one, never a mix.

    The temporary file (``.{name}.tmp.{random}`` beside it) is locked while it is written, so that the temporaries
    of killed saves (checkpoint-sized: hundreds of MB on COCO) are removed by the next save of ``path``, and a live
    writer's never. An OSError that names no file (a full disk) is raised naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    prefix = f".{path.name}.tmp."
    removed = remove_orphans(path.parent, glob.escape(prefix) + "*")
    removed += remove_orphans(path.parent, f".{glob.escape(path.name)}.*.tmp")  # mkstemp's, before the locks
    for orphan in removed:
        print(f"removed {orphan}, left by a checkpoint save that was killed", file=sys.stderr)
    writes = _Writes()
    try:
        # created with no more access than the checkpoint gets (a 0600 one was readable for a moment), then given
        # exactly its mode (the umask may have taken bits the replaced file has)
        with locked_temp(path.parent, prefix, mode=mode) as tmp:
            os.chmod(tmp, mode)
            with open(tmp, "wb") as f:
                writes.file = f
                torch.save(obj, writes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except Exception as e:
        # a full disk: PyTorch's archive writer turns the file's OSError into "unexpected pos 704 vs 598"
        cause = writes.error if writes.error is not None else e
        if not isinstance(cause, OSError) or cause.filename is not None or cause.errno is None:
            raise
        message = f"{cause.strerror}: checkpoint not written, the file there is kept"
        raise OSError(cause.errno, message, str(path)) from e


class _Writes:
    """The file ``torch.save`` writes to, keeping the OSError a write raised: PyTorch reports it as a RuntimeError
    that names no file nor cause."""

    def __init__(self) -> None:
        self.file: Any = None
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()
