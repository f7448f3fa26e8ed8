"""The plan format changes only with its version: a golden plan of the tiny model must match."""
import json

import pytest

from ggfuse.compiler.plan import PLAN_VERSION
from make_golden import GOLDEN, golden_plan


def _diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _diff(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _diff(x, y, f"{path}[{i}]")
    return f"{path}: golden {json.dumps(a)[:200]} != now {json.dumps(b)[:200]}"


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_plan_matches(kind):
    with open(GOLDEN[kind]) as f:
        golden = json.load(f)
    now = golden_plan(kind)
    if tuple(golden["version"]) == PLAN_VERSION:
        assert now == golden, ("the plan changed without a format version bump: bump PLAN_VERSION in "
                               "compiler/plan.py, then run `python tests/make_golden.py`\n  first difference "
                               + _diff(golden, now))
    else:
        assert False, (f"PLAN_VERSION is {PLAN_VERSION} but the golden plan is {golden['version']}: "
                       "run `python tests/make_golden.py`")


def test_budget_golden_streams():
    with open(GOLDEN["budget"]) as f:
        d = json.load(f)
    pre = d["graph_meta"]["prefetch"]
    assert pre["streamed_layers"] and any(s["op"] == "fetch_weights" for s in d["steps"])
    assert all("kernel" in s["meta"] for s in d["steps"] if s["op"] not in ("input", "weight"))
