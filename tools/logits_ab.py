"""Logits of every test fixture from two ggfuse source trees, compared (a refactor must not move
them): each tree runs in its own process and writes its logits; then per case the max |diff| /
max |logit| and whether the two are bit-identical.

    python tools/logits_ab.py --old OLD_TREE --new NEW_TREE [--device cpu|cuda] [--precision bf16|f32] [--out DIR]

A tree is a folder that is the `ggfuse` package. Cases: the four architectures' f32 / q8_0 /
q4_k_m fixtures, their 40 reference tokens, chunk 16."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")
ARCHS = ("qwen35moe", "qwen35", "qwen3next", "qwen3moe")
QUANTS = ("f32", "q8_0", "q4_k_m")

CHILD = r"""
import sys, numpy as np, ggfuse
out, fixtures, device, precision = sys.argv[1:5]
res = {}
for arch in %r:
    toks = np.load(f"{fixtures}/{arch}/refs.npz")["tokens"]
    for q in %r:
        kw = {} if precision == "bf16" else {"precision": precision}
        m = ggfuse.load(f"{fixtures}/{arch}/{q}.gguf", device=device, chunk=16, **kw)
        res[f"{arch}/{q}"] = m.prefill(toks)
np.savez(out, **res)
""" % (ARCHS, QUANTS)


def run(tree: str, out: str, device: str, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(tree), os.path.join(d, "ggfuse"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([d] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        subprocess.run([sys.executable, "-c", CHILD, out, FIXTURES, device, precision], env=env, check=True)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default=tempfile.gettempdir())
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    old = run(a.old, os.path.join(a.out, f"old-{a.device}-{a.precision}.npz"), a.device, a.precision)
    new = run(a.new, os.path.join(a.out, f"new-{a.device}-{a.precision}.npz"), a.device, a.precision)
    same = 0
    for k in sorted(old):
        d = float(np.abs(old[k] - new[k]).max() / max(np.abs(old[k]).max(), 1e-30))
        ident = np.array_equal(old[k], new[k])
        same += ident
        print(f"{k:<22} {'identical' if ident else f'max|diff|/max {d:.2e}'}")
    print(f"{a.device} {a.precision}: {same} of {len(old)} cases bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
