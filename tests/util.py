"""Helpers shared by the tests: fixture paths and running a graph on the CPU reference."""
from __future__ import annotations

import os

import numpy as np

from ggfuse.ir.interpret import interpret
from ggfuse.ir.types import shape_eval
from ggfuse.runtime.weights import WeightStore

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
ARCHS = ("qwen35moe", "qwen35", "qwen3next", "qwen3moe")
# Gemma 4 fixtures (arch gemma4): an E2B-like dense model and a 26B-A4B-like MoE. Not in ARCHS:
# tests over ARCHS read Qwen-only hparams or expect Qwen ops; MODELS is for model-level checks.
GEMMA4 = ("gemma4-dense", "gemma4-moe")
MODELS = ARCHS + GEMMA4
QUANTS = ("f32", "q8_0", "q4_k_m")

# Fixture cases where the default (bf16 tensor-core) GEMMs flip a near-tied expert of a
# top-2-of-4 router (2nd - 3rd router logit ~0.01) at one position, which moves that position's
# logits by 0.06-0.23 of max |logit|: not a kernel error but bf16 operand rounding itself. The
# CPU reference with the GPU's bf16 roundings put back (tests/precision_emulation.py) reproduces
# it (0.233 / 0.062 / 0.193 vs the GPU's 0.232 / 0.058 / 0.193), so these cases are checked
# against that emulation at the same tolerance (tests/test_gpu_models.py, and the CUDA backend
# emulated on the CPU, tests/test_cuda_emulated.py); precision="f32" matches the f32 references
# (test_gpu_models.py test_gpu_precision_f32_matches_cpu_and_llama).
BF16_NEAR_TIES = {("qwen35moe", "f32"), ("qwen35moe", "q8_0"), ("qwen3next", "f32")}


def fixture(arch: str, quant: str = "f32") -> str:
    return os.path.join(FIXTURES, arch, f"{quant}.gguf")


def refs(arch: str) -> dict:
    with np.load(os.path.join(FIXTURES, arch, "refs.npz")) as z:
        return {k: z[k] for k in z.files}


def run_graph(graph, gf, tokens, chunk: int) -> np.ndarray:
    """Logits of `tokens` fed through `graph` in chunks of `chunk`, state carried."""
    weights = WeightStore(gf)
    states = graph.states()
    inputs = set(graph.inputs())
    state = {k: np.zeros(shape_eval(n.outputs[0].shape, {"P": 0, "T": 0}), np.float32) for k, n in states.items()}
    out = []
    tokens = np.asarray(tokens, dtype=np.int32)
    for s in range(0, len(tokens), chunk):
        t = tokens[s:s + chunk]
        feeds = {**state, "tokens": t, "positions": (s + np.arange(len(t))).astype(np.int32)}
        res = interpret(graph, {k: v for k, v in feeds.items() if k in inputs}, weights, {"T": len(t), "P": s})
        for k in states:
            state[k] = res[k]
        out.append(res["logits"])
    return np.concatenate(out)


def rel_err(a, b) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
