"""The ggfuse command: compile / inspect / run, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from badfiles import make_bad_files
from ggfuse.compiler import cli
from ggfuse.compiler.plan import PLAN_VERSION
from util import fixture

HAVE_FIXTURES = os.path.exists(fixture("qwen35moe"))
needs_fixtures = pytest.mark.skipif(not HAVE_FIXTURES, reason="fixtures not built")


def run_cli(*args):
    """Run `python -m ggfuse.compiler.cli ARGS` in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "ggfuse.compiler.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["truncated_header", "truncated_data", "wrong_magic", "data_past_end",
                                  "absurd_array_length", "absurd_string_length", "absurd_tensor_count",
                                  "unsupported_type", "empty_file", "not_gguf", "missing"])
@pytest.mark.parametrize("command", ["compile", "run"])
def test_bad_gguf_is_one_line_exit_2(bad, case, command):
    code, out, err = run_cli(command, bad[case])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: ") and str(bad[case]) in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_traceback(bad):
    code, out, err = run_cli("--debug", "compile", bad["wrong_magic"])
    assert code != 0 and "Traceback" in err


def test_unsupported_architecture(tmp_path):
    import gguf
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, out, err = run_cli("compile", p)
    assert code == 2 and "architecture 'llama' is not supported" in err and "qwen35moe" in err


@needs_fixtures
def test_missing_key_and_tensor_and_shape_mismatch(tmp_path):
    """Copy a real fixture, dropping a required key / a tensor / changing a shape."""
    import gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    src = GGUFFile(fixture("qwen3moe"))

    def rewrite(path, drop_key=None, drop_tensor=None, reshape=None):
        r = gguf.GGUFReader(src.path)
        w = gguf.GGUFWriter(str(path), src.arch)
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.name in ("general.architecture", drop_key):
                continue
            val = f.contents()
            vtype = f.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(f.name, val, vtype, sub_type=f.types[-1])
            else:
                w.add_key_value(f.name, val, vtype)
        for t in r.tensors:
            if t.name == drop_tensor:
                continue
            data = src.dequantize(t.name)
            if t.name == reshape:
                data = data.reshape(-1)[: data.size // 2].reshape(data.shape[0] // 2, -1) if data.ndim == 2 else data[:-1]
            w.add_tensor(t.name, np.ascontiguousarray(data))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return path

    p = rewrite(tmp_path / "nokey.gguf", drop_key="qwen3moe.expert_count")
    code, _, err = run_cli("compile", p)
    assert code == 2 and "missing required metadata key 'qwen3moe.expert_count'" in err
    p = rewrite(tmp_path / "notensor.gguf", drop_tensor="blk.1.ffn_down_exps.weight")
    code, _, err = run_cli("compile", p)
    assert code == 2 and "missing tensor 'blk.1.ffn_down_exps.weight'" in err
    p = rewrite(tmp_path / "shape.gguf", reshape="blk.0.attn_k_norm.weight")
    code, _, err = run_cli("compile", p)
    assert code == 2 and "blk.0.attn_k_norm.weight" in err and "expected" in err


@needs_fixtures
def test_compile_inspect_run_roundtrip(tmp_path):
    plan = tmp_path / "m.ggfuse.json"
    code, out, err = run_cli("compile", fixture("qwen35moe", "q4_k_m"), "-o", plan, "--chunk", "16",
                             "--dump-dir", tmp_path / "dump")
    assert code == 0, err
    d = json.loads(plan.read_text())
    assert d["version"] == list(PLAN_VERSION) and d["chunk"] == 16 and d["arch"] == "qwen35moe"
    assert d["source"]["size"] == os.path.getsize(fixture("qwen35moe", "q4_k_m"))
    assert {w["ggml_type"] for w in d["weights"]} >= {"Q4_K"}
    assert all({"name", "ggml_type", "shape", "offset", "nbytes"} <= set(w) for w in d["weights"])
    assert all({"op", "inputs", "outputs", "attrs"} <= set(s) for s in d["steps"])
    assert sorted(os.listdir(tmp_path / "dump"))[0] == "00-frontend.txt"
    code, out, err = run_cli("inspect", plan)
    assert code == 0 and "ops by kind" in out and "weights by type" in out and "FLOPs" in out
    code, out, err = run_cli("inspect", plan, "--json")
    j = json.loads(out)
    assert j["flops_per_chunk"] > 0 and "Q4_K" in j["weights_by_type"]
    code, out, err = run_cli("inspect", plan, "--dot", tmp_path / "g.dot")
    assert code == 0 and (tmp_path / "g.dot").read_text().startswith("digraph")
    code, out, err = run_cli("run", plan, "--tokens", "1,2,3,4", "--logits", tmp_path / "l.npy", "--device", "cpu")
    assert code == 0, err
    assert "top-5" in out and len([l for l in out.splitlines() if "logit" in l]) == 5
    logits = np.load(tmp_path / "l.npy")
    assert logits.shape[0] == 4 and np.isfinite(logits).all()


@needs_fixtures
def test_plan_refuses_other_gguf_and_unknown_version(tmp_path):
    plan = tmp_path / "m.json"
    assert run_cli("compile", fixture("qwen3moe"), "-o", plan)[0] == 0
    d = json.loads(plan.read_text())
    d["source"]["path"] = fixture("qwen3moe", "q8_0")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    code, out, err = run_cli("run", other, "--device", "cpu")
    assert code == 2 and "different GGUF" in err and "recompile" in err
    d = json.loads(plan.read_text())
    d["version"] = [PLAN_VERSION[0] + 1, 0]
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(d))
    code, out, err = run_cli("inspect", newer)
    assert code == 2 and "format version" in err and "recompile" in err
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    code, out, err = run_cli("inspect", junk)
    assert code == 2 and "not a readable plan" in err


def test_cuda_without_gpu_is_a_clear_error():
    from ggfuse.runtime.api import cuda_available
    if cuda_available():
        pytest.skip("a GPU is present")
    path = fixture("qwen35moe") if HAVE_FIXTURES else cli.EXAMPLE_MODEL
    code, out, err = run_cli("run", path, "--device", "cuda")
    assert code == 2 and "cuda" in err and "not available" in err


def test_run_without_model_uses_the_example():
    if not os.path.exists(cli.EXAMPLE_MODEL):
        pytest.skip("example model not built")
    code, out, err = run_cli("run", "--tokens", "1,2,3", "--device", "cpu")
    assert code == 0, err
    assert "example model" in err and "top-5" in out


def test_bad_tokens_and_budget():
    code, out, err = run_cli("run", cli.EXAMPLE_MODEL, "--tokens", "1,x")
    assert code == 2 and "--tokens" in err
    if os.path.exists(cli.EXAMPLE_MODEL):
        code, out, err = run_cli("run", cli.EXAMPLE_MODEL, "--tokens", "999999", "--device", "cpu")
        assert code == 2 and "outside the vocabulary" in err
