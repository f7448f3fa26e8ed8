"""The precision option's plumbing, on the CPU: load(..., precision=), $GGFUSE_PRECISION and
`ggfuse run --precision`. The f32 kernels themselves: tests/test_gpu_precision.py; the cuda
backend's binding of them: tests/test_cuda_dryrun.py; whole models: tests/test_gpu_models.py."""
import numpy as np
import pytest

import ggfuse
from ggfuse.errors import GGFuseError
from ggfuse.runtime.api import resolve_precision
from test_cli import run_cli
from util import fixture, refs


@pytest.mark.parametrize("bad", ["f64", "fp32", "BF16", ""])
def test_bad_precision_is_a_one_line_error_naming_it(bad, monkeypatch):
    monkeypatch.delenv("GGFUSE_PRECISION", raising=False)
    with pytest.raises(GGFuseError) as e:
        ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", precision=bad)
    msg = str(e.value)
    assert repr(bad) in msg and "\n" not in msg and "bf16" in msg and "f32" in msg


def test_env_and_default(monkeypatch):
    monkeypatch.delenv("GGFUSE_PRECISION", raising=False)
    assert resolve_precision(None) == "bf16"
    monkeypatch.setenv("GGFUSE_PRECISION", "f32")
    assert resolve_precision(None) == "f32"
    assert resolve_precision("bf16") == "bf16"       # the argument wins over the environment
    monkeypatch.setenv("GGFUSE_PRECISION", "f16")
    with pytest.raises(GGFuseError, match="'f16'"):
        ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu")


def test_cpu_accepts_both_and_is_f32_anyway(monkeypatch):
    monkeypatch.delenv("GGFUSE_PRECISION", raising=False)
    tokens = refs("qwen3moe")["tokens"][:12]
    a = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu").prefill(tokens)
    b = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", precision="f32").prefill(tokens)
    c = ggfuse.load(fixture("qwen3moe", "q8_0"), device="cpu", precision="bf16").prefill(tokens)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_cli_precision(monkeypatch):
    monkeypatch.delenv("GGFUSE_PRECISION", raising=False)
    code, out, err = run_cli("run", fixture("qwen3moe", "q8_0"), "--device", "cpu", "--precision", "f32",
                             "--tokens", "1,2,3")
    assert code == 0, err
    assert "top-5" in out
    code, out, err = run_cli("run", fixture("qwen3moe", "q8_0"), "--device", "cpu", "--precision", "double")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggfuse: error: ") and "'double'" in lines[0], err
