"""Flash-attention prefill kernel (kernels/attention/flash_attn.cu) against the float64 numpy
reference computed from the same bf16-rounded q/k/v, eagerly and inside captured CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors as _errors, from_bf16_bits, require_gpu, to_bf16_bits  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.attention import launch  # noqa: E402
from ggfuse.kernels.attention.ref import attention_cache  # noqa: E402

BF16_NAN = 0x7FC0


class Case:
    """Random q and a bf16 KV cache; the reference of any (P, n_valid) on them."""

    def __init__(self, *, T, Hq, Hkv, D, max_ctx, q_dtype, out_dtype, seed, q_head_pitch=None):
        rng = np.random.default_rng(seed)
        self.T, self.Hq, self.Hkv, self.D = T, Hq, Hkv, D
        self.q_dtype, self.out_dtype = q_dtype, out_dtype
        self.scale = 1.0 / np.sqrt(D)
        pitch = q_head_pitch or D  # > D: q is a view into a wider [T, Hq, pitch] buffer (q + gate)
        # Scores of O(few) so the softmax is neither flat nor one-hot.
        q_full = (2.0 * rng.standard_normal((T, Hq, pitch))).astype(np.float32)
        q_bits = to_bf16_bits(q_full)
        self.q_ref = from_bf16_bits(q_bits)[:, :, :D]  # the kernel rounds f32 q to bf16 as well
        k = rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32)
        v = rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32)
        self.k_bits, self.v_bits = to_bf16_bits(k), to_bf16_bits(v)
        self.k_ref, self.v_ref = from_bf16_bits(self.k_bits), from_bf16_bits(self.v_bits)
        q_host = q_full if q_dtype == "f32" else q_bits
        self.q_buf = cp.asarray(q_host)
        self.q = self.q_buf[:, :, :D]
        self.q_stride_t, self.q_stride_h = Hq * pitch, pitch
        self.k_cache = cp.asarray(self.k_bits)
        self.v_cache = cp.asarray(self.v_bits)
        self.out = cp.empty((T, Hq, D), dtype=cp.float32 if out_dtype == "f32" else cp.uint16)
        self.past = cp.zeros(1, dtype=cp.int32)
        self.n_valid = cp.zeros(1, dtype=cp.int32)

    def poison_cache_from(self, row: int):
        """NaN in every cache row >= row: the kernel must never read them."""
        self.k_cache[row:] = BF16_NAN
        self.v_cache[row:] = BF16_NAN

    def poison_out(self):
        if self.out_dtype == "f32":
            self.out.fill(np.nan)
        else:
            self.out.fill(0xFFFF)

    def set_scalars(self, P, n_valid, stream=None):
        with (stream or cp.cuda.Stream.null):
            self.past.set(np.array([P], np.int32), stream=stream)
            self.n_valid.set(np.array([n_valid], np.int32), stream=stream)

    def launch(self, stream=None):
        launch.flash_attn_prefill(self.q, self.q_dtype, self.q_stride_t, self.q_stride_h, self.k_cache,
                                  self.v_cache, self.out, self.T, self.Hq, self.Hkv, self.D, self.D,
                                  self.scale, self.past, self.n_valid, stream=stream)

    def result(self) -> np.ndarray:
        o = cp.asnumpy(self.out)
        return o if self.out_dtype == "f32" else from_bf16_bits(o)

    def check(self, P, n_valid, what=""):
        got = self.result()
        assert np.isfinite(got).all(), f"{what}: non-finite output (unwritten or poisoned reads)"
        nv = min(max(n_valid, 0), self.T)
        assert not got[nv:].any(), f"{what}: rows >= n_valid={nv} must be zero"
        if nv == 0:
            return
        ref = attention_cache(self.q_ref[:nv].astype(np.float64), self.k_ref.astype(np.float64),
                              self.v_ref.astype(np.float64), P, scale=self.scale).astype(np.float64)
        # attention_cache puts the chunk at rows P..P+nv-1; with nv < T the kernel's query t still
        # sits at P + t, which is the same thing for t < nv.
        rel_rms, rel_max = _errors(got[:nv], ref)
        tol_rms = 1e-2 if self.out_dtype == "f32" else 1.2e-2   # bf16 output adds its own rounding
        assert rel_rms < tol_rms and rel_max < 2e-2, f"{what}: rel RMS {rel_rms:.2e}, max-abs/max|ref| {rel_max:.2e}"


# (D, Hq, Hkv, T, P, n_valid): P = 0 and not a multiple of 64, T not a multiple of 64, n_valid < T.
SHAPES = [
    pytest.param(256, 16, 2, 64, 0, 64, id="d256-h16/2-T64-P0"),
    pytest.param(256, 16, 2, 100, 0, 100, id="d256-h16/2-T100-P0"),
    pytest.param(256, 16, 2, 200, 37, 200, id="d256-h16/2-T200-P37"),
    pytest.param(256, 16, 2, 130, 256, 97, id="d256-h16/2-T130-P256-nv97"),
    pytest.param(256, 16, 2, 1, 300, 1, id="d256-h16/2-T1-P300"),
    pytest.param(256, 8, 8, 129, 70, 129, id="d256-h8/8-T129-P70"),
    pytest.param(256, 16, 2, 96, 5, 0, id="d256-h16/2-T96-P5-nv0"),
    pytest.param(128, 16, 2, 150, 0, 150, id="d128-h16/2-T150-P0"),
    pytest.param(128, 8, 8, 200, 333, 131, id="d128-h8/8-T200-P333-nv131"),
    pytest.param(64, 16, 2, 65, 63, 65, id="d64-h16/2-T65-P63"),
    pytest.param(64, 8, 8, 256, 1000, 200, id="d64-h8/8-T256-P1000-nv200"),
]
DTYPES = [
    pytest.param("f32", "f32", id="qf32-of32"),
    pytest.param("bf16", "bf16", id="qbf16-obf16"),
]


@pytest.mark.parametrize("q_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("D,Hq,Hkv,T,P,n_valid", SHAPES)
def test_flash_attn_prefill(D, Hq, Hkv, T, P, n_valid, q_dtype, out_dtype):
    c = Case(T=T, Hq=Hq, Hkv=Hkv, D=D, max_ctx=P + T + 50, q_dtype=q_dtype, out_dtype=out_dtype,
             seed=1000 * D + T + P)
    c.poison_cache_from(P + n_valid)    # the chunk's rows past n_valid and the unused tail
    c.set_scalars(P, n_valid)
    c.poison_out()
    c.launch()
    cp.cuda.Device().synchronize()
    c.check(P, n_valid, "eager")


@pytest.mark.parametrize("q_dtype,out_dtype", [
    pytest.param("f32", "bf16", id="qf32-obf16"), pytest.param("bf16", "f32", id="qbf16-of32")])
def test_mixed_dtypes_strided_q(q_dtype, out_dtype):
    """q as a view into [T, Hq, 2D] (the projection that also carries the output gate)."""
    T, P = 150, 77
    c = Case(T=T, Hq=16, Hkv=2, D=256, max_ctx=P + T, q_dtype=q_dtype, out_dtype=out_dtype, seed=7,
             q_head_pitch=512)
    c.set_scalars(P, T)
    c.poison_out()
    c.launch()
    cp.cuda.Device().synchronize()
    c.check(P, T, "strided q")


@pytest.mark.parametrize("D,Hq,Hkv", [pytest.param(256, 16, 2, id="d256-h16/2"), pytest.param(128, 8, 8, id="d128-h8/8")])
def test_graph_replay_with_changing_past(D, Hq, Hkv):
    """Capture once, then change P and n_valid through the device scalars between replays."""
    T = 160
    steps = [(0, T), (37, T), (300, 101), (64, T), (555, 1)]
    c = Case(T=T, Hq=Hq, Hkv=Hkv, D=D, max_ctx=max(p for p, _ in steps) + T + 10, q_dtype="f32",
             out_dtype="f32", seed=D + Hq)
    launch.prepare(D, "f32", np.float32)   # module load + smem opt-in stay outside the capture
    s = cp.cuda.Stream(non_blocking=True)
    c.set_scalars(*steps[0], stream=s)
    s.synchronize()
    s.begin_capture()
    c.launch(stream=s)
    graph = s.end_capture()
    for P, nv in steps:
        c.set_scalars(P, nv, stream=s)
        with s:
            c.poison_out()
        graph.launch(s)
        s.synchronize()
        c.check(P, nv, f"graph replay P={P} n_valid={nv}")


def test_rejects_bad_arguments():
    c = Case(T=8, Hq=4, Hkv=2, D=64, max_ctx=16, q_dtype="f32", out_dtype="f32", seed=0)
    with pytest.raises(ValueError, match="head dims"):
        launch.flash_attn_prefill(c.q, "f32", c.q_stride_t, c.q_stride_h, c.k_cache, c.v_cache, c.out,
                                  8, 4, 2, 96, 96, c.scale, c.past, c.n_valid)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        launch.flash_attn_prefill(c.q, "f32", c.q_stride_t, c.q_stride_h, c.k_cache, c.v_cache, c.out,
                                  8, 4, 3, 64, 64, c.scale, c.past, c.n_valid)
    with pytest.raises(ValueError, match="q_dtype bf16"):
        launch.flash_attn_prefill(c.q, "bf16", c.q_stride_t, c.q_stride_h, c.k_cache, c.v_cache, c.out,
                                  8, 4, 2, 64, 64, c.scale, c.past, c.n_valid)
