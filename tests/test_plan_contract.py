"""The lowered plan says everything that runs: `ggfuse inspect --json` of a plan compiled for a
GPU target (here, without a GPU) names a kernel for every executed step; the weight forms,
storage dtypes and workspace are in it; and a bench JSON alone repeats its run."""
import json

import pytest

from test_cli import run_cli
from util import ARCHS, fixture

EXAMPLE = fixture("qwen35moe", "q4_k_m")


@pytest.mark.parametrize("target", ["sm_90a", "sm_89"])
@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_names_a_kernel_for_every_step(arch, target, tmp_path):
    plan = tmp_path / "p.json"
    code, out, err = run_cli("compile", fixture(arch, "q4_k_m"), "-o", str(plan), "--target", target, "--chunk", "64")
    assert code == 0, err
    code, out, err = run_cli("inspect", str(plan), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["options"]["target"] == target and d["lowering"]["target"]["name"] == target
    steps = [s for s in d["steps"] if s["op"] not in ("input", "weight")]
    assert steps and all("kernel" in s for s in steps), [s for s in steps if "kernel" not in s][:3]
    kernels = {s["kernel"] for s in steps}
    if target == "sm_89":        # the Ada path: no wgmma anywhere
        assert not any(s.get("variant", {}).get("impl") == "wgmma" or
                       "wgmma" in json.dumps(s.get("variant", {})) for s in steps)
    else:
        assert any("wgmma" in json.dumps(s.get("variant", {})) for s in steps)
    assert "lm_head" in kernels and "dense.get_rows" in kernels
    assert all(w.get("forms") for w in d["weights"])
    assert any(s.get("workspace") for s in steps)
    assert all(s.get("storage") for s in steps if s["kernel"] != "view" or s["op"] != "reshape")
    # the text form prints the same table
    code, out, err = run_cli("inspect", str(plan))
    assert code == 0 and "steps (kernel and variant" in out and f"lowered for {target}" in out


@pytest.mark.parametrize("target,flag,on", [("sm_90a", None, True), ("sm_90a", "off", False), ("sm_90a", "on", True),
                                           ("sm_89", None, False), ("sm_80", "off", False)])
def test_plan_records_programmatic_launch(target, flag, on, tmp_path):
    plan = tmp_path / "p.json"
    extra = ["--pdl", flag] if flag else []
    code, out, err = run_cli("compile", EXAMPLE, "-o", str(plan), "--target", target, "--chunk", "64", *extra)
    assert code == 0, err
    d = json.loads(run_cli("inspect", str(plan), "--json")[1])
    assert d["lowering"]["pdl"]["on"] is on and d["options"]["pdl"] == (flag or "auto")
    assert (target in d["lowering"]["pdl"]["why"]) or flag == "off"
    code, out, err = run_cli("inspect", str(plan))
    assert f"programmatic dependent launch {'on' if on else 'off'}" in out


@pytest.mark.parametrize("bad", [["--target", "sm_89", "--pdl", "on"], ["--target", "sm_90a", "--pdl", "yes"]])
def test_bad_pdl_is_one_line(bad, tmp_path):
    plan = tmp_path / "p.json"
    code, out, err = run_cli("compile", EXAMPLE, "-o", str(plan), *bad)
    assert code == 2 and "pdl" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not plan.exists()


def test_cpu_plan_is_not_lowered(tmp_path):
    plan = tmp_path / "p.json"
    code, out, err = run_cli("compile", EXAMPLE, "-o", str(plan), "--target", "cpu")
    assert code == 0, err
    d = json.loads(run_cli("inspect", str(plan), "--json")[1])
    assert d["options"]["target"] == "cpu" and not d["lowering"] and "lower_cuda" not in d["passes"]


def test_bench_json_repeats_its_run(tmp_path):
    first, again = tmp_path / "a.json", tmp_path / "b.json"
    code, out, err = run_cli("bench", EXAMPLE, "--device", "cpu", "--prompt", "8,20", "--repeat", "1", "--chunk", "16",
                             "--moe-schedule", "persist", "--json", str(first))
    assert code == 0, err
    a = json.loads(first.read_text())
    assert a["options"]["moe_schedule"] == "persist" and a["options"]["chunk"] == 16
    assert set(a["ggfuse"]) >= {"version", "commit"} and a["args"]["prompt"] == "8,20"
    code, out, err = run_cli("bench", "--rerun", str(first), "--json", str(again))
    assert code == 0, err
    b = json.loads(again.read_text())
    assert b["options"] == a["options"] and b["args"] == a["args"] and b["model_identity"] == a["model_identity"]
    assert [r["prompt"] for r in b["results"]] == [8, 20]
    # another model than the JSON's is refused
    code, out, err = run_cli("bench", fixture("qwen3moe", "q8_0"), "--rerun", str(first))
    assert code == 2 and "is not the file" in err
