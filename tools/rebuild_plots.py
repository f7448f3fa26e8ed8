"""Rebuild the pictures in docs/ from the bench JSONs kept beside them.

    python tools/rebuild_plots.py            # every picture in PLOTS
    python tools/rebuild_plots.py --check    # only check that every docs/*.png has its JSONs here

Each picture is `python -m ggfuse.runtime.bench plot OUT.png RUN.json ...` over the runs listed
below (needs matplotlib: pip install 'ggfuse[plot]'), so a figure in BENCHMARKS.md can always be
redrawn from the numbers it shows.
"""
from __future__ import annotations

import argparse
import os
import sys

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

# picture -> the bench JSONs it draws (paths relative to docs/)
PLOTS = {
    "bench-qwen3.5-35b-a3b-h200-vs-llama.png": ["bench-qwen3.5-35b-a3b-h200-vs-llama.json"],
    "bench-presets-h100.png": ["bench-qwen3.5-35b-a3b.json", "bench-qwen3-next-80b-a3b.json",
                               "bench-qwen3-30b-a3b.json", "bench-qwen3.5-9b.json"],
    "bench-35b-resident-h100.png": ["bench-qwen3.5-35b-a3b-4096.json", "bench-qwen3.5-35b-a3b-8192.json"],
    "bench-35b-12gib-h100.png": ["bench-qwen3.5-35b-a3b-4096.json", "bench-qwen3.5-35b-a3b-8192.json",
                                 "stream-qwen3.5-35b-a3b-2048.json", "stream-qwen3.5-35b-a3b-8192.json"],
}


def problems(docs: str = DOCS) -> list[str]:
    """What keeps the pictures from being rebuilt: a picture not in PLOTS, a JSON missing."""
    out = [f"docs/{p}: no entry in tools/rebuild_plots.py PLOTS" for p in sorted(os.listdir(docs))
           if p.endswith(".png") and p not in PLOTS]
    out += [f"docs/{j}: missing (drawn in docs/{p})" for p, js in PLOTS.items() for j in js
            if not os.path.isfile(os.path.join(docs, j))]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that every picture has its JSONs")
    ap.add_argument("--out", default=DOCS, help="folder the pictures go to (default docs/)")
    a = ap.parse_args(argv)
    bad = problems()
    for b in bad:
        print(b, file=sys.stderr)
    if bad or a.check:
        return 1 if bad else 0
    from ggfuse.runtime.bench import plot_runs
    for png, jsons in PLOTS.items():
        plot_runs([os.path.join(DOCS, j) for j in jsons], os.path.join(a.out, png))
        print(f"wrote {os.path.join(a.out, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
