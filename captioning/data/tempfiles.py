"""Temporary files and folders named after the process writing them (``...tmp<pid>``), so a killed
writer's leftovers can be recognised and removed by the next writer instead of piling up."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphans(folder: Path, pattern: str) -> list[Path]:
    """Delete the files or folders in ``folder`` matching the glob ``pattern`` whose name ends in the id
    of a process that no longer exists (never this process's own); returns what was deleted."""
    removed = []
    for path in folder.glob(pattern):
        m = re.search(r"(\d+)$", path.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
