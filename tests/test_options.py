"""The options object: every behaviour switch in one validated, frozen object that the CLI and
load() map onto, recorded in the plan, never read from the environment."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ggfuse
from ggfuse.errors import GGFuseError, PlanError
from ggfuse.options import COMPILE, RUNTIME, Options, parse_bytes
from test_cli import run_cli
from util import fixture, refs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kw, what", [
    (dict(precision="f64"), "precision"), (dict(precision=""), "precision"), (dict(chunk=0), "chunk"),
    (dict(chunk=-5), "chunk"), (dict(chunk=1.5), "chunk"), (dict(chunk="x"), "chunk"),
    (dict(max_context=0), "max_context"), (dict(vram_budget="nan"), "vram_budget"),
    (dict(vram_budget=float("inf")), "vram_budget"), (dict(vram_budget=-1), "vram_budget"),
    (dict(target="sm_75"), "target"), (dict(eager="maybe"), "eager"), (dict(moe_schedule="fast"), "moe_schedule"),
    (dict(sub_chunk_min=True), "sub_chunk_min"),
])
def test_bad_values_are_one_line_errors_naming_the_option(kw, what):
    with pytest.raises(GGFuseError) as e:
        Options.make(**kw)
    msg = str(e.value)
    assert what in msg and "\n" not in msg


def test_unknown_option_and_values_normalised():
    with pytest.raises(GGFuseError, match="unknown option 'frobnicate'"):
        Options.make(frobnicate=1)
    o = Options.make(chunk="4096", vram_budget="12GiB", target="SM_89", eager="true")
    assert (o.chunk, o.vram_budget, o.target, o.eager) == (4096, 12 << 30, "sm_89", True)
    assert parse_bytes("1.5GB") == 1_500_000_000
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.chunk = 5
    assert Options.from_json(o.to_json()) == o
    assert set(o.compile_json()) | set(o.to_json(RUNTIME)) == set(o.to_json())


def test_bad_precision_through_load_and_cli():
    with pytest.raises(GGFuseError) as e:
        ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", precision="f64")
    assert "'f64'" in str(e.value) and "bf16" in str(e.value) and "f32" in str(e.value)
    code, out, err = run_cli("run", fixture("qwen3moe", "q8_0"), "--device", "cpu", "--precision", "double")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: ") and "'double'" in lines[0], err


def test_environment_does_not_choose_behaviour(monkeypatch):
    """The switches that used to be environment variables change nothing now: the options do."""
    for k in ("GGFUSE_PRECISION", "GGFUSE_GEMM", "GGFUSE_MOE90", "GGFUSE_SUBCHUNKS", "GGFUSE_DENSE", "GGFUSE_EAGER"):
        monkeypatch.setenv(k, "f32" if k == "GGFUSE_PRECISION" else "0")
    m = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", target="sm_90a")
    assert m.plan.options["precision"] == "bf16" and m.plan.options["sub_chunks"] is True


def test_cpu_accepts_both_precisions_and_is_f32_anyway():
    tokens = refs("qwen3moe")["tokens"][:12]
    a = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu").prefill(tokens)
    b = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", precision="f32").prefill(tokens)
    np.testing.assert_array_equal(a, b)
    code, out, err = run_cli("run", fixture("qwen3moe", "q8_0"), "--device", "cpu", "--precision", "f32",
                             "--tokens", "1,2,3")
    assert code == 0 and "top-5" in out, err


def test_plan_records_its_options_and_refuses_others(tmp_path):
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.plan import load_plan
    path = fixture("qwen35moe", "q4_k_m")
    plan = compile_gguf(path, chunk=32, target="sm_89", moe_schedule="persist", max_context=256)
    out = tmp_path / "p.json"
    plan.save(str(out))
    d = json.loads(out.read_text())
    from ggfuse.compiler.plan import PLAN_VERSION
    assert d["version"][0] == PLAN_VERSION[0]
    assert d["options"] == {**Options().compile_json(), "chunk": 32, "target": "sm_89", "moe_schedule": "persist",
                            "max_context": 256}
    assert set(d["ggfuse"]) >= {"version", "commit"}
    again = load_plan(str(out))
    assert again.compile_options() == Options.make(chunk=32, target="sm_89", moe_schedule="persist", max_context=256)
    # the cpu device runs any plan; compile options must match what it was compiled with
    m = ggfuse.load(str(out), device="cpu")
    assert m.plan.target == "sm_89"
    with pytest.raises(PlanError, match="max_context=256, not 512"):
        ggfuse.load(str(out), device="cpu", max_context=512)
    with pytest.raises(PlanError, match="vram_budget=none"):
        ggfuse.load(str(out), device="cpu", vram_budget="1GiB")
    # a tampered option value is a one-line plan error
    d["options"]["moe_schedule"] = "fastest"
    out.write_text(json.dumps(d))
    with pytest.raises(PlanError) as e:
        load_plan(str(out))
    assert "moe_schedule" in str(e.value) and "\n" not in str(e.value)


def test_every_option_has_a_cli_flag():
    code, out, err = run_cli("compile", "--help")
    for name in Options.names(COMPILE):
        assert "--" + name.replace("_", "-") in out, name
    code, out, err = run_cli("run", "--help")
    for name in Options.names():
        assert "--" + name.replace("_", "-") in out, name


def test_no_behaviour_read_from_the_environment():
    """Only the options module reads the environment, for paths and verbosity (GGFUSE_CACHE,
    GGFUSE_QUIET); nvrtc's CUDA_HOME / CUDA_PATH search paths are paths too."""
    pat = re.compile(r"os\.environ|os\.getenv|getenv\(")
    allowed = {os.path.join(ROOT, "options.py")}
    bad = []
    for top in ("compiler", "ir", "passes", "runtime", "kernels", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for fn in files:
                if not fn.endswith(".py"):
                    continue
                p = os.path.join(dirpath, fn)
                if p in allowed:
                    continue
                for i, line in enumerate(open(p), 1):
                    if pat.search(line) and not re.search(r"CUDA_HOME|CUDA_PATH|GGFUSE_CACHE|GGFUSE_QUIET|"
                                                          r"NCCL_|PATH\b|LD_LIBRARY_PATH|PYTHONPATH", line):
                        bad.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
