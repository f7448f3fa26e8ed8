"""`ggfuse bench` on the CPU reference (the GPU figures come from the device, not from tests):
rows per prompt length, the floor model, JSON and plot output, llama-bench errors."""
import json
import os

import numpy as np
import pytest

from ggfuse.compiler.driver import compile_gguf
from ggfuse.errors import GGFuseError
from ggfuse.runtime import bench

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "qwen35moe-tiny-q4_k_m.gguf")


def test_bench_cpu_rows():
    res = bench.bench_model(EXAMPLE, [8, 20], chunk=16, repeat=1, device="cpu", log=lambda m: None)
    assert [r["prompt"] for r in res["results"]] == [8, 20]
    for r in res["results"]:
        assert r["tok_per_s"] > 0 and len(r["runs"]) == 1
        assert abs(r["tok_per_s"] - r["prompt"] / r["ms"] * 1e3) < 1e-6
    assert res["arch"] == "qwen35moe" and res["device"] == "cpu" and res["ceilings"] is None


def test_floor_counts_the_lm_head_once_and_grows_with_the_prompt():
    plan = compile_gguf(EXAMPLE, chunk=16)
    ceil = {"matmul_tflops": 100.0, "copy_gbs": 1000.0}
    f16, f32, f40 = (bench.prompt_floor(plan, n, 16, ceil) for n in (16, 32, 40))
    assert f16["flops"] < f32["flops"] < f40["flops"]
    head = next(n for n in plan.graph.nodes() if n.name == "lm_head")
    v, d = plan.graph.type_of(head.inputs[1]).shape[-2:]
    full = plan.stats["flops_per_chunk"]              # chunk of 16 at P=0, LM head on every row
    assert f16["flops"] == full - 15 * 2 * v * d
    # two chunks read the weights twice: the byte floor dominates this tiny model
    w = plan.stats["weight_bytes"]
    assert f32["floor_ms"] == pytest.approx(2 * w / (ceil["copy_gbs"] / 2 * 1e6), rel=1e-6)


def test_llama_bench_missing_is_a_clear_error(tmp_path):
    with pytest.raises(GGFuseError, match="llama-bench not found"):
        bench.run_llama_bench(str(tmp_path / "nope"), EXAMPLE, [16], repeat=1)


def test_llama_bench_output_is_parsed(tmp_path):
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/bin/sh\necho '[{\"n_prompt\": 512, \"avg_ts\": 1234.5, \"build_commit\": \"abc\", "
                   "\"build_number\": 1}, {\"n_prompt\": 2048, \"avg_ts\": 99.0}]'\n")
    exe.chmod(0o755)
    out = bench.run_llama_bench(str(exe), EXAMPLE, [512, 2048], repeat=2, n_cpu_moe=40)
    assert out["results"] == {512: 1234.5, 2048: 99.0}
    assert "--n-cpu-moe 40 -lm none" in out["cmd"] and "-fa 1" in out["cmd"] and out["build"]["build_commit"] == "abc"


def test_bench_cli_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from ggfuse.compiler.cli import main
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8,16", "--repeat", "1", "--chunk", "16",
               "--json", str(js), "--plot", str(png)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert [r["prompt"] for r in data["results"]] == [8, 16]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ggfuse tok/s" in capsys.readouterr().out


FAKE_NCM = """#!/bin/sh
# fake llama-bench: tok/s by --n-cpu-moe (40 -> 3000, 24 -> 4000, 20 -> 5000)
n=0
while [ $# -gt 0 ]; do [ "$1" = "--n-cpu-moe" ] && n=$2; shift; done
ts=3000; [ "$n" = 24 ] && ts=4000; [ "$n" = 20 ] && ts=5000
echo "[{\\"n_prompt\\": 2048, \\"avg_ts\\": $ts, \\"n_cpu_moe\\": $n}]"
"""


def test_llama_bench_keeps_the_best_setting(tmp_path):
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE_NCM)
    exe.chmod(0o755)
    out = bench.run_llama_bench(str(exe), EXAMPLE, [2048], repeat=1, n_cpu_moe=[40, 24])
    assert out["results"] == {2048: 4000.0} and len(out["runs"]) == 2
    assert [r["n_cpu_moe"] for r in out["runs"]] == [40, 24]
    assert any("--n-cpu-moe 40 -lm none" in c for c in out["cmd"])


def test_llama_bench_best_setting_within_the_budget(tmp_path, monkeypatch):
    """Under --vram-budget the comparison is llama.cpp's best setting that stayed under the
    budget (peak device memory measured while it ran); the best at any memory is kept too."""
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE_NCM)
    exe.chmod(0o755)
    peaks = iter([9000, 11500, 13500])       # MiB for --n-cpu-moe 40, 24, 20

    class FakeSampler:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.peak = next(peaks)
            return False

    monkeypatch.setattr(bench, "_VramSampler", FakeSampler)
    out = bench.run_llama_bench(str(exe), EXAMPLE, [2048], repeat=1, n_cpu_moe=[40, 24, 20], vram_budget="12GiB")
    assert out["results"] == {2048: 4000.0}                 # 20 used 13.2 GiB > 12 GiB
    assert out["results_any_memory"] == {2048: 5000.0}
    assert [r["fits_budget"] for r in out["runs"]] == [True, True, False]


def test_equivalent_n_cpu_moe_counts_streamed_expert_layers():
    """Layers' worth of streamed experts: the streamed experts of all layers over the experts
    of one layer."""
    from ggfuse.compiler.driver import compile_gguf
    assert bench.equivalent_n_cpu_moe(EXAMPLE, None, chunk=16) == 0
    pre = compile_gguf(EXAMPLE, chunk=16).stats["prefetch"]
    fixed = sum(v for k, v in pre["fixed_bytes"].items() if k != "reserve")
    budget = int((fixed + pre["expert_bytes_total"] * 0.6) * 16 / 15)   # the toy reserve is budget/16
    n = bench.equivalent_n_cpu_moe(EXAMPLE, budget, chunk=16)
    p = compile_gguf(EXAMPLE, chunk=16, vram_budget=budget).stats["prefetch"]
    assert n == round(sum(p["streamed_experts"].values()) / p["n_experts"]) >= 1
    assert n <= len(p["streamed_layers"])


def test_plot_runs_draws_several_results(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for k, (name, prompts) in enumerate((("bench-a", [512, 2048, 8192]), ("stream-b", [2048, 8192]))):
        r = {"results": [{"prompt": p, "tok_per_s": 1000.0 * (k + 1) + p} for p in prompts],
             "llama_bench": {"results": {str(p): 900.0 for p in prompts}}, "device_name": "X",
             "vram_budget": "12GiB" if k else None}
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(r))
        runs.append(str(f))
    out = tmp_path / "p.png"
    bench.plot_runs(runs, str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bench_under_a_budget_sizes_the_context_per_prompt(tmp_path):
    """--vram-budget: one compiled run per prompt length, its KV cache for that prompt only (as
    llama-bench sizes its context per test), recorded per row; resident: one run for all."""
    from ggfuse.compiler.cli import main
    from ggfuse.runtime.cuda.backend import context_for
    pre = compile_gguf(EXAMPLE, chunk=16).stats["prefetch"]
    fixed = sum(v for k, v in pre["fixed_bytes"].items() if k != "reserve")
    budget = int((fixed + pre["expert_bytes_total"] * 0.6) * 16 / 15)
    js = tmp_path / "b.json"
    assert main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8,20", "--repeat", "1", "--chunk", "16",
                 "--vram-budget", str(budget), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["max_context"] == "per prompt"
    rows = {r["prompt"]: r for r in data["results"]}
    assert rows[8]["max_context"] == context_for(8, 16) and rows[20]["max_context"] == context_for(20, 16) == 32
    assert rows[8]["prefetch"]["max_context"] == rows[8]["max_context"] and rows[8]["prefetch"]["budget_bytes"] == budget
    assert main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8,20", "--repeat", "1", "--chunk", "16",
                 "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["max_context"] == 20 and {r["max_context"] for r in data["results"]} == {20}


def test_context_for_covers_the_padded_tail():
    from ggfuse.passes.lower_cuda import capture_sizes, context_for
    assert capture_sizes(2048) == [2048, 1024, 512, 256]
    assert capture_sizes(2048, sub_chunk_min=512) == [2048, 1024, 512]
    assert context_for(2048, 2048) == 2048 and context_for(8192, 2048) == 8192
    assert context_for(512, 2048) == 512 and context_for(600, 2048) == 1024 and context_for(2100, 2048) == 2304
    assert context_for(600, 2048, capture_sizes(2048, sub_chunks=False)) == 2048


@pytest.mark.parametrize("start,tried", [(18, [18, 20, 22, 24, 23]), (25, [25, 24, 23, 22]), (39, [39, 40])])
def test_llama_bench_searches_the_fastest_setting_that_fits(tmp_path, monkeypatch, start, tried):
    """Without --n-cpu-moe under a budget: up from the plan's equivalent in steps of 2 until a
    setting fits, then the one in between; or down while it still fits. Fake peaks: n layers on
    the CPU take 24 - n / 2 GiB (23 is the fewest that fit 12.5 GiB); 40 (all) fits anything."""
    assert bench._n_expert_layers(EXAMPLE) >= 1
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE_NCM)
    exe.chmod(0o755)
    ran = []
    real_run = bench.subprocess.run

    def run(cmd, **kw):
        ran.append(int(cmd[cmd.index("--n-cpu-moe") + 1]))
        return real_run(cmd, **kw)

    class FakeSampler:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            n = ran[-1]
            self.peak = (24 - n / 2) * 1024 if n < 40 else 1024
            return False

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setattr(bench, "_VramSampler", FakeSampler)
    budget = "12.5GiB" if start != 39 else "1.5GiB"
    out = bench.run_llama_bench(str(exe), EXAMPLE, [2048], repeat=1, vram_budget=budget, search_from=start, n_layers=40)
    assert ran == tried
    fitting = [r["n_cpu_moe"] for r in out["runs"] if r["fits_budget"]]
    assert min(fitting) == (23 if start != 39 else 40)
    with pytest.raises(GGFuseError, match="needs a --vram-budget"):
        bench.run_llama_bench(str(exe), EXAMPLE, [2048], repeat=1, search_from=20)


FAKE_TG = """#!/bin/sh
# fake llama-bench with a decode test: -p gives pp rows, -n N a tgN row
p=0; n=0
while [ $# -gt 0 ]; do [ "$1" = "-p" ] && p=$2; [ "$1" = "-n" ] && n=$2; shift; done
echo "[{\\"n_prompt\\": $p, \\"n_gen\\": 0, \\"avg_ts\\": 1000}, {\\"n_prompt\\": 0, \\"n_gen\\": $n, \\"avg_ts\\": 50}]"
"""


def test_decode_row_beside_llama_bench_tg(tmp_path, capsys):
    """`ggfuse bench --tg N`: a decode row (N one-token steps from an empty context, llama-bench's
    tgN) in the JSON and the table, with llama-bench's tgN in the same run for the ratio."""
    from ggfuse.compiler.cli import main
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE_TG)
    exe.chmod(0o755)
    js = tmp_path / "r.json"
    assert main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8", "--repeat", "1", "--chunk", "16",
                 "--tg", "6", "--against-llama-bench", str(exe), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    d = data["decode"]
    assert d["tg"] == 6 and d["tok_per_s"] > 0 and len(d["runs"]) == 1
    assert data["llama_bench"]["results"]["tg6"] == 50.0 and "-n 6" in data["llama_bench"]["cmd"]
    out = capsys.readouterr().out
    assert "     tg6" in out and f"{d['tok_per_s'] / 50.0:.2f}" in out
    assert main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8", "--repeat", "1", "--chunk", "16",
                 "--tg", "0", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["decode"] is None


FAKE_TG_DEPTH = """#!/bin/sh
# fake llama-bench: -p gives pp rows (none for 0), -n N a tgN row at depth -d D (its n_depth)
p=0; n=0; d=0
echo "$@" >> "$(dirname "$0")/calls"
while [ $# -gt 0 ]; do [ "$1" = "-p" ] && p=$2; [ "$1" = "-n" ] && n=$2; [ "$1" = "-d" ] && d=$2; shift; done
rows=""
[ "$p" != 0 ] && rows="{\\"n_prompt\\": $p, \\"n_gen\\": 0, \\"n_depth\\": $d, \\"avg_ts\\": 1000}"
[ "$n" != 0 ] && rows="${rows:+$rows, }{\\"n_prompt\\": 0, \\"n_gen\\": $n, \\"n_depth\\": $d, \\"avg_ts\\": $((60 - d))}"
echo "[$rows]"
"""


def test_decode_row_at_depth_beside_llama_bench(tmp_path, capsys, monkeypatch):
    """`ggfuse bench --tg N --tg-depth D`: the decode steps follow a D-token prompt (not timed;
    the KV cache sized for it), and llama-bench runs its prompt tests at depth 0 and its tgN in a
    second command with -d D, compared as tgN."""
    from ggfuse.compiler.cli import main
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE_TG_DEPTH)
    exe.chmod(0o755)
    fed = []
    from ggfuse.runtime.api import Model
    orig = Model.prefill

    def prefill(self, ids, *a, **k):
        fed.append(len(ids))
        return orig(self, ids, *a, **k)

    monkeypatch.setattr(Model, "prefill", prefill)
    js = tmp_path / "r.json"
    assert main(["bench", EXAMPLE, "--device", "cpu", "--prompt", "8", "--repeat", "1", "--chunk", "16",
                 "--tg", "4", "--tg-depth", "20", "--against-llama-bench", str(exe), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    d = data["decode"]
    assert d["tg"] == 4 and d["depth"] == 20 and d["tok_per_s"] > 0
    assert fed.count(20) == 2           # the warm-up run and the timed one each prefill the depth prompt
    assert data["results"][0]["max_context"] >= 20 + 4
    assert data["args"]["tg_depth"] == 20
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and "-n 0" in calls[0] and "-d" not in calls[0].split()
    assert "-p 0 -n 4 -d 20" in calls[1]
    lb = data["llama_bench"]
    assert lb["results"]["tg4"] == 40.0 and lb["results"]["8"] == 1000.0 and "0" not in lb["results"]
    out = capsys.readouterr().out
    assert "tg4@d20" in out and f"{d['tok_per_s'] / 40.0:.2f}" in out


def test_bad_tg_depth_is_one_line():
    from ggfuse.compiler.cli import main
    assert main(["bench", EXAMPLE, "--device", "cpu", "--tg-depth", "-3"]) == 2
