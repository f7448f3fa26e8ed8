"""Regenerate the golden plan: `python tests/make_golden.py` (after bumping PLAN_VERSION)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import fixture  # noqa: E402

from ggfuse.compiler.driver import compile_gguf  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "qwen35moe-tiny.ggfuse.json")


def golden_plan() -> dict:
    """The tiny qwen35moe Q4_K_M plan at chunk 16, with the machine-specific path removed."""
    d = compile_gguf(fixture("qwen35moe", "q4_k_m"), chunk=16).to_json()
    d["source"]["path"] = os.path.basename(d["source"]["path"])
    return json.loads(json.dumps(d, sort_keys=True))


if __name__ == "__main__":
    with open(GOLDEN, "w") as f:
        json.dump(golden_plan(), f, sort_keys=True, indent=1)
        f.write("\n")
    print("wrote", GOLDEN)
