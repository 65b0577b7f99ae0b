"""Checkpoint reading and writing that can be trusted.

- Reading: always ``torch.load(weights_only=True)``, so a checkpoint can never run code; a file
  holding anything else is refused as untrusted, a truncated file is named as such, tensors saved
  on a GPU are mapped to wherever they are loaded (the CPU by default).
- Writing: to a temporary file in the same folder, flushed to disk, then renamed over the target
  (``os.replace`` is atomic), so a crash during a save leaves the previous checkpoint intact.

Inference uses these directly (without importing Lightning); training uses them through
:class:`captioning.cli.SafeCheckpointIO` (resume, validate, test).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message names the file and the cause."""


def load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds objects that are not plain tensors and containers, so it is "
            f"untrusted and was not loaded ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({e})") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save ``obj`` so that ``path`` holds either the old file or the complete new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
