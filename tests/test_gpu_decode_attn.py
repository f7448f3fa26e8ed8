"""The one-token step's key-split attention (kernels/attention/decode_attn.cu) against the float64
reference (kernels/attention/ref.py attention_cache, T = 1) on a bf16 KV cache: every head dim,
query heads per kv head from 1 to 16, one key to thousands, n_valid 0, eagerly and in a captured
graph replayed as P grows. The algorithm itself (ranges, partial states, the combination) is
checked on the CPU: tests/test_attention_ref.py."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors as _errors, from_bf16_bits, require_gpu, to_bf16_bits  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.attention import launch  # noqa: E402
from ggfuse.kernels.attention.ref import attention_cache  # noqa: E402

BF16_NAN = 0x7FC0


class Step:
    def __init__(self, *, Hq, Hkv, D, max_ctx, q_dtype, out_dtype, n_split, seed):
        rng = np.random.default_rng(seed)
        self.Hq, self.Hkv, self.D, self.q_dtype, self.n_split = Hq, Hkv, D, q_dtype, n_split
        self.scale = 1.0 / np.sqrt(D)
        q = (2.0 * rng.standard_normal((1, Hq, D))).astype(np.float32)
        if q_dtype == "bf16":
            bits = to_bf16_bits(q)
            self.q_ref, self.q = from_bf16_bits(bits), cp.asarray(bits)
        else:
            self.q_ref, self.q = q, cp.asarray(q)
        k = rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32)
        v = rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32)
        kb, vb = to_bf16_bits(k), to_bf16_bits(v)
        self.k_ref, self.v_ref = from_bf16_bits(kb), from_bf16_bits(vb)
        self.k_cache, self.v_cache = cp.asarray(kb), cp.asarray(vb)
        self.out_dtype = out_dtype
        self.out = cp.empty((1, Hq, D), dtype=cp.float32 if out_dtype == "f32" else cp.uint16)
        self.ws = cp.empty(launch.decode_workspace_bytes(Hq, D, n_split), dtype=cp.uint8)
        self.past = cp.zeros(1, dtype=cp.int32)
        self.n_valid = cp.zeros(1, dtype=cp.int32)

    def poison_from(self, row):
        self.k_cache[row:] = BF16_NAN
        self.v_cache[row:] = BF16_NAN

    def set(self, P, nv, stream=None):
        self.past.set(np.array([P], np.int32), stream=stream)
        self.n_valid.set(np.array([nv], np.int32), stream=stream)

    def launch(self, stream=None):
        launch.decode_attn(self.q, self.q_dtype, self.D, self.k_cache, self.v_cache, self.out, self.Hq, self.Hkv,
                           self.D, self.scale, self.n_split, self.ws, self.past, self.n_valid, stream=stream)

    def check(self, P, nv, what):
        o = cp.asnumpy(self.out)
        got = o if self.out_dtype == "f32" else from_bf16_bits(o)
        assert np.isfinite(got).all(), f"{what}: non-finite output (a row past P read, or unwritten)"
        if nv == 0:
            assert not got.any(), f"{what}: n_valid 0 must give zeros"
            return
        ref = attention_cache(self.q_ref.astype(np.float64), self.k_ref.astype(np.float64),
                              self.v_ref.astype(np.float64), P, scale=self.scale)
        rel_rms, rel_max = _errors(got, ref)
        tol = 2e-4 if self.out_dtype == "f32" else 6e-3
        assert rel_rms < tol and rel_max < 5 * tol, f"{what}: rel RMS {rel_rms:.2e}, max {rel_max:.2e}"


# (D, Hq, Hkv, P, n_split): one range and many, ranges left empty, a last range short of 32 keys
CASES = [
    pytest.param(256, 16, 2, 0, 128, id="d256-h16/2-P0"),
    pytest.param(256, 16, 2, 31, 128, id="d256-h16/2-P31"),
    pytest.param(256, 16, 2, 300, 128, id="d256-h16/2-P300"),
    pytest.param(256, 16, 2, 5000, 128, id="d256-h16/2-P5000"),
    pytest.param(256, 32, 2, 777, 64, id="d256-h32/2-P777"),
    pytest.param(128, 8, 8, 4095, 32, id="d128-h8/8-P4095"),
    pytest.param(64, 16, 16, 100, 16, id="d64-h16/16-P100"),
    pytest.param(512, 16, 2, 2049, 128, id="d512-h16/2-P2049"),
    pytest.param(512, 8, 1, 40, 3, id="d512-h8/1-P40"),
]


@pytest.mark.parametrize("q_dtype,out_dtype", [("f32", "f32"), ("bf16", "bf16"), ("f32", "bf16")])
@pytest.mark.parametrize("D,Hq,Hkv,P,n_split", CASES)
def test_decode_attn(D, Hq, Hkv, P, n_split, q_dtype, out_dtype):
    c = Step(Hq=Hq, Hkv=Hkv, D=D, max_ctx=P + 40, q_dtype=q_dtype, out_dtype=out_dtype, n_split=n_split,
             seed=D + Hq + P)
    c.poison_from(P + 1)
    c.set(P, 1)
    c.launch()
    cp.cuda.Device().synchronize()
    c.check(P, 1, "eager")
    c.set(P, 0)
    c.launch()
    cp.cuda.Device().synchronize()
    c.check(P, 0, "n_valid 0")


def test_graph_replay_as_the_context_grows():
    """Captured once, replayed at P = 0, 1, 33, 900, 4000: the ranges follow P."""
    c = Step(Hq=16, Hkv=2, D=256, max_ctx=4100, q_dtype="bf16", out_dtype="f32",
             n_split=launch.decode_splits(2, 4100), seed=3)
    s = cp.cuda.Stream(non_blocking=True)
    c.set(0, 1, stream=s)
    c.launch(stream=s)          # module loading outside the capture
    s.synchronize()
    s.begin_capture()
    c.launch(stream=s)
    graph = s.end_capture()
    for P in (0, 1, 33, 900, 4000):
        c.set(P, 1, stream=s)
        graph.launch(s)
        s.synchronize()
        c.check(P, 1, f"replay P={P}")


def test_rejects_bad_arguments():
    c = Step(Hq=16, Hkv=2, D=64, max_ctx=64, q_dtype="f32", out_dtype="f32", n_split=4, seed=0)
    with pytest.raises(ValueError, match="head dim"):
        launch.decode_attn(c.q, "f32", 64, c.k_cache, c.v_cache, c.out, 16, 2, 96, c.scale, 4, c.ws, c.past, c.n_valid)
    with pytest.raises(ValueError, match="at most 16"):
        launch.decode_attn(c.q, "f32", 64, c.k_cache, c.v_cache, c.out, 34, 2, 64, c.scale, 4, c.ws, c.past, c.n_valid)
    with pytest.raises(ValueError, match="workspace"):
        launch.decode_attn(c.q, "f32", 64, c.k_cache, c.v_cache, c.out, 16, 2, 64, c.scale, 8, c.ws, c.past, c.n_valid)
