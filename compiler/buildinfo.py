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
    stamp = os.path.join(root, ".build-commit")
    if os.path.exists(stamp):
        # a copy of a checkout without its git history (a build or a machine the tree was
        # copied to): the commit it was copied at, written there by whoever copied it
        with open(stamp) as f:
            info.update(commit=f.read().strip() or None, dirty=False, source=".build-commit")
        return info
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
