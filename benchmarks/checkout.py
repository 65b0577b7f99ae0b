"""Imported by each benchmark before the library: puts this checkout's root first on ``sys.path``, so that a
benchmark run as ``python benchmarks/x.py`` times the code beside it, not whichever ``captioning`` pip installed
(an editable install of another clone, a wheel), and :func:`describe` says which code and commit it timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def describe() -> str:
    """``code: <package folder> at <commit>`` (``+changes`` where tracked files differ from it)."""
    import captioning

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):  # no git here (the GPU machine may lack it)
        commit = "unknown commit"
    return f"code: {Path(captioning.__file__).parent} at {commit}"
