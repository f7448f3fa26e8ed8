"""Benchmark two ggfuse source trees on the same model in one run, alternating, and print the
per-prompt ratio (a change must not make any row slower than its noise):

    python tools/bench_ab.py --old OLD_TREE --new NEW_TREE --out DIR [--rounds 1] -- MODEL.gguf [bench flags]

A tree is a folder that is the `ggfuse` package (a checkout, or `git archive REV` unpacked).
Each round runs `ggfuse bench MODEL [flags] --json DIR/{old,new}-R.json` for the old tree, then
the new; the table gives each prompt's median tok/s over the rounds (and the decode row's, tgN,
with --tg N). Flags go to `ggfuse bench`
unchanged (both trees must accept them)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def run_tree(tree: str, args: list[str], out: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(tree), os.path.join(d, "ggfuse"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([d] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        cmd = [sys.executable, "-m", "ggfuse.compiler.cli", "bench", *args, "--json", out]
        print("$ " + " ".join(cmd), flush=True)
        p = subprocess.run(cmd, env=env)
        if p.returncode:
            raise SystemExit(f"bench failed for {tree} (exit {p.returncode})")
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("bench", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    bench = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    os.makedirs(a.out, exist_ok=True)
    res = {"old": [], "new": []}
    for r in range(a.rounds):
        for tag, tree in (("old", a.old), ("new", a.new)):
            res[tag].append(run_tree(tree, bench, os.path.join(a.out, f"{tag}-{r}.json")))
    import numpy as np
    rows = {}
    for tag, runs in res.items():
        for run in runs:
            for row in run["results"]:
                rows.setdefault(row["prompt"], {}).setdefault(tag, []).append(row["tok_per_s"])
            d = run.get("decode")
            if d:           # the decode row (--tg N): tokens per second of the one-token steps
                rows.setdefault(f"tg{d['tg']}", {}).setdefault(tag, []).append(d["tok_per_s"])
    print(f"{'prompt':>8} {'old tok/s':>12} {'new tok/s':>12} {'new/old':>8}")
    summary = []
    for n in sorted(rows, key=lambda r: (isinstance(r, str), str(r).zfill(8))):
        o, w = float(np.median(rows[n]["old"])), float(np.median(rows[n]["new"]))
        print(f"{n:>8} {o:>12.1f} {w:>12.1f} {w / o:>8.3f}")
        summary.append({"prompt": n, "old_tok_per_s": o, "new_tok_per_s": w, "ratio": w / o})
    with open(os.path.join(a.out, "ab.json"), "w") as f:
        json.dump({"bench_args": bench, "rounds": a.rounds, "rows": summary,
                   "new": res["new"][-1].get("ggfuse"), "options": res["new"][-1].get("options")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
