"""tools/serve_bench.py end to end on the CPU with the tiny example model (so that the device run
does not fail on a typo): both servers' paths (llama-server played by a shim that starts
`ggfuse serve` with llama-server's flags), the table, the JSON."""
import json
import os
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "qwen35moe-tiny-q4_k_m.gguf")

SHIM = '''#!{python}
# llama-server's command line (-m M --host H --port P -c N ...) onto `ggfuse serve`
import os, sys
a = sys.argv[1:]
get = lambda f: a[a.index(f) + 1]
os.execv(sys.executable, [sys.executable, "-m", "ggfuse.compiler.cli", "serve", get("-m"), "--host", get("--host"),
                          "--port", get("--port"), "--max-context", get("-c"), "--device", "cpu"])
'''


def test_serve_bench_runs_on_the_cpu(tmp_path):
    shim = tmp_path / "llama-server"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve_bench.py"), EXAMPLE, "--device", "cpu",
                        "--system-tokens", "24", "--user-tokens", "8", "--gen-tokens", "2", "--turns", "2",
                        "--overhead-requests", "2", "--max-context", "512", "--cache-budget", "16MiB",
                        "--llama-server", str(shim), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cold prefill of the last turn" in r.stdout and "llama-server" in r.stdout
    res = json.loads(out.read_text())
    assert res["ggfuse"]["version"] and res["options"]["device"] == "cpu"
    # the options the server ran with (its own defaults), not Options' defaults
    from ggfuse.runtime.serve.cli import SERVE_SUB_CHUNK_MIN
    assert res["options"]["sub_chunk_min"] == SERVE_SUB_CHUNK_MIN and res["options"]["max_context"] == 512
    for name in ("ggfuse serve", "llama-server"):
        s = res["results"][name]["summary"]
        assert len(s["ttft_ms"]) == len(s["ttft_cold_ms"]) == 2
        assert s["new_tokens"][1] < res["results"][name]["turns"][1]["prompt_tokens"]     # turn 2 resumed
        assert s["overhead_ms_median_small"] is not None and s["cold_prefill_last_turn_ms"] > 0
        assert all(t["cached_tokens"] == 0 for t in res["results"][name]["cold_turns"])
    assert (tmp_path / "bench.ggfuse.log").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".serve-bench-")]   # no temporary left
