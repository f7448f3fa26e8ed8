"""The expert-streaming benchmark in one device call (issue 6):

    python tools/stream_bench.py [--out DIR] [--budget 12GiB] [--prompts 2048,8192]

1. synthesises Qwen3.5-35B-A3B Q4_K_M (`ggfuse synth`, ~21 GB) unless DIR/q35.gguf exists;
2. `ggfuse bench` with --vram-budget and --chunk auto (per prompt, the chunk with the best
   predicted time under the budget; the table of candidates is printed), then with a fixed
   --chunk 2048, printing the streaming telemetry: per-layer hit rate, bytes moved per chunk,
   host->device GB/s against the pinned ceiling measured in the same run, fraction of transfer
   hidden under compute, measured device memory;
3. the same with --stream-host staged (the fallback host path), 2048 tokens only;
4. the tokens/s a 12 GB PCIe-4 card would see if PCIe-bound: bytes moved per chunk at 25 GB/s.
JSON results land in DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.run(cmd)
    print(f"  ({time.time() - t:.0f} s, exit {p.returncode})", flush=True)
    return p.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ggfuse-stream")
    ap.add_argument("--budget", default="12GiB")
    ap.add_argument("--prompts", default="2048,8192")
    ap.add_argument("--repeat", default="3")
    ap.add_argument("--skip-staged", action="store_true")
    ap.add_argument("--llama-bench", metavar="PATH", help="also run llama-bench --n-cpu-moe on the same file")
    ap.add_argument("--n-cpu-moe", default="40,32,24", help="llama-bench settings to try (best kept)")
    ap.add_argument("--skip-ggfuse", action="store_true", help="only llama-bench (with --llama-bench)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.out, "q35.gguf")
    exe = [sys.executable, "-m", "ggfuse.compiler.cli"]
    if not os.path.exists(model):
        if _run(exe + ["synth", "--preset", "qwen3.5-35b-a3b", "--quant", "q4_k_m", "-o", model]):
            return 1
    runs = [("auto", a.prompts, []), ("2048", a.prompts, [])]
    if not a.skip_staged:
        runs.append(("2048", "2048", ["--stream-host", "staged"]))
    rc = 0
    if a.skip_ggfuse:
        runs = []
    for chunk, prompts, extra in runs:
        tag = f"chunk{chunk}" + ("-staged" if extra else "")
        rc |= _run(exe + ["bench", model, "--prompt", prompts, "--vram-budget", a.budget, "--chunk", chunk,
                          "--device", "cuda", "--repeat", a.repeat, "--json", os.path.join(a.out, f"{tag}.json")]
                   + extra)
    if a.llama_bench:
        from ggfuse.runtime.bench import run_llama_bench
        t = time.time()
        lb = run_llama_bench(a.llama_bench, model, [int(x) for x in a.prompts.split(",")], repeat=int(a.repeat),
                             n_cpu_moe=[int(x) for x in a.n_cpu_moe.split(",")])
        print(f"$ {lb['cmd']}  ({time.time() - t:.0f} s)")
        for r in lb["runs"]:
            print(f"llama.cpp --n-cpu-moe {r['n_cpu_moe']}: pp{r['n_prompt']} {r['avg_ts']:.0f} tok/s")
        with open(os.path.join(a.out, "llama_ncmoe.json"), "w") as f:
            json.dump(lb, f, indent=1)
    for name in sorted(os.listdir(a.out)):
        if not name.endswith(".json") or name.startswith("llama"):
            continue
        with open(os.path.join(a.out, name)) as f:
            res = json.load(f)
        for r in res["results"]:
            t = r.get("streaming") or {}
            moved = t.get("bytes_per_chunk", 0)
            c = r.get("chunk", res["chunk"])
            n_chunks = -(-r["prompt"] // int(c))
            pcie4 = r["prompt"] / (n_chunks * moved / 25e9) if moved else float("nan")
            print(f"{name}: prompt {r['prompt']} chunk {c}: {r['tok_per_s']:.0f} tok/s, {moved / 1e9:.2f} GB/chunk, "
                  f"link {t.get('link_gbs') or 0:.1f} GB/s ({100 * (t.get('link_of_ceiling') or 0):.0f}% of pinned), "
                  f"effective {t.get('effective_gbs') or 0:.1f} GB/s, hidden {100 * t.get('hidden_fraction', 0):.0f}%, "
                  f"pool {((t.get('memory') or {}).get('pool_bytes') or 0) / 2**30:.2f} GiB; "
                  f"a PCIe-4 card (25 GB/s) moving the same bytes: <= {pcie4:.0f} tok/s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
