"""Which ggfuse made a plan or a benchmark: the package version and, from a git checkout, the
commit (and whether the tree had uncommitted changes)."""
from __future__ import annotations

import functools
import os
import subprocess


@functools.lru_cache(maxsize=1)
def build_info() -> dict:
    from ggfuse import __version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {"version": __version__, "commit": None, "dirty": None}
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["commit"] = out.stdout.strip()
            st = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
            info["dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info
