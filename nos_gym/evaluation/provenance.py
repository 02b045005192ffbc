"""Where a result came from: the git commit of this checkout and whether its code differs from it.

One definition for everything that stamps its output with the code that made it (a NOS-Bench
table's metadata, the agent benchmark's reference medians, the throughput benchmark's header).
Outside a git checkout (an installed wheel) the commit is ``None``, also when the wheel's
environment happens to sit inside some other checkout: only a checkout whose root holds the
package counts.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ROOT", "git_commit"]

#: the checkout's root when nos_gym is imported from one (the folder above the package)
ROOT = Path(__file__).resolve().parents[2]


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(paths: Sequence[str] = ("nos_gym",), exclude: Sequence[str] = ()) -> tuple[str | None, bool | None]:
    """``(commit, dirty)``: the full commit of HEAD, and whether ``paths`` (relative to the root)
    have changes git sees, tracked or untracked, other than ``exclude``. ``(None, None)`` outside a
    checkout; ``dirty`` is ``None`` when git cannot say."""
    # ROOT/.git is a folder in a clone and a file in a worktree; without it git would answer for
    # whatever checkout encloses ROOT (a venv inside a clone), which did not make this code
    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--", *paths, *(f":!{p}" for p in exclude))
    return commit, (bool(status) if status is not None else None)
