"""Regenerate the golden plans: `python tests/make_golden.py` (after bumping PLAN_VERSION).

Two plans of the tiny qwen35moe Q4_K_M model, lowered for sm_90a at chunk 16: everything
resident, and under a budget that streams experts. The comparison leaves out what is derived
rather than decided (statistics such as FLOPs and predicted timings, the runtime reserve the
budget counts, which ggfuse commit wrote the plan) and the machine-specific model path."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import fixture  # noqa: E402

from ggfuse.compiler.driver import compile_gguf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = {"resident": os.path.join(HERE, "golden", "qwen35moe-tiny.ggfuse.json"),
          "budget": os.path.join(HERE, "golden", "qwen35moe-tiny-budget.ggfuse.json")}
# room for the dense weights, states, arena and all experts but one of each layer
BUDGET = 1_100_000


def golden_plan(kind: str = "resident") -> dict:
    kw = {"vram_budget": BUDGET, "max_context": 64, "dense_form": "raw"} if kind == "budget" else {}
    d = compile_gguf(fixture("qwen35moe", "q4_k_m"), chunk=16, target="sm_90a", **kw).to_json()
    d["source"]["path"] = os.path.basename(d["source"]["path"])
    for k in ("stats", "ggfuse"):
        d.pop(k, None)
    pre = d["graph_meta"].get("prefetch") or {}
    for k in ("predicted", "fixed_bytes", "resident_bytes"):
        pre.pop(k, None)
    return json.loads(json.dumps(d, sort_keys=True))


if __name__ == "__main__":
    for kind, path in GOLDEN.items():
        with open(path, "w") as f:
            json.dump(golden_plan(kind), f, sort_keys=True, indent=1)
            f.write("\n")
        print("wrote", path)
