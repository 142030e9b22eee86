"""Which code produced a result: the git commit of the checkout (when it is one) and the library versions.

    code_version()   # {"commit": "98ad680", "dirty": False, "torch": "2.11.0+cu130", "triton": "3.6.0"}

``NANODIT_COMMIT`` overrides the commit (the GPU machine receives a copy of the tree whose .git may be older
than its files).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def code_version() -> dict:
    """The commit (short hash; None outside a git checkout), whether the tree had changes, torch/triton."""
    commit, dirty = os.environ.get("NANODIT_COMMIT"), None
    if commit is None and (REPO / ".git").exists():
        commit = _git("rev-parse", "--short", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"commit": commit, "dirty": dirty, "torch": torch.__version__, "triton": triton_version}
