"""Gemma 4's CUDA kernels against their numpy references (run by the lead on the device):
windowed attention over a ring at head dims 512 / 256 / 32 (and the CUDA-core causal path over a
KV cache), the ring append wrapping across chunks of every size, replayed from a captured graph
as the runtime does; the PLE gather; norm_add / norm_add_norm; GELU, the GELU GLU of the f32
GEMM, softcap; norm_rope with Gemma's rope_freqs; the per-expert route-weight scale.
(The tensor-core GELU GLUs: tests/test_gpu_gemm.py test_gemm_geglu, tests/test_gpu_moe.py
test_moe_layer_gelu_gemma4_shapes.)"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors, from_bf16_bits, require_gpu, round_bf16, to_bf16_bits  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.attention import launch as fa  # noqa: E402
from ggfuse.kernels.attention import ref as attn_ref  # noqa: E402
from ggfuse.kernels.dense import launch as d  # noqa: E402
from ggfuse.kernels.dense import ref as dense_ref  # noqa: E402
from ggfuse.kernels.elementwise import ref as ew_ref  # noqa: E402
from ggfuse.kernels.gemm.weights import random_weight  # noqa: E402

BF16_NAN = 0x7FC0


def _scalar(v):
    return cp.asarray(np.array([v], np.int32))


# ---- windowed attention over the ring, chunk after chunk ----------------------------------------

class RingLayer:
    """One sliding layer's device state and buffers: rings [R, Hkv, D] bf16, a chunk of Tmax rows
    of q / k / v (f32), the output; its reference ring (f32 holding bf16 values)."""

    def __init__(self, *, Tmax, Hq, Hkv, D, R, window, scale, q_kind, out_kind, seed):
        self.Tmax, self.Hq, self.Hkv, self.D, self.R, self.window, self.scale = Tmax, Hq, Hkv, D, R, window, scale
        self.q_kind, self.out_kind = q_kind, out_kind
        self.rng = np.random.default_rng(seed)
        self.k_ring = cp.zeros((R, Hkv, D), dtype=cp.uint16)
        self.v_ring = cp.zeros((R, Hkv, D), dtype=cp.uint16)
        self.ref_k = np.zeros((R, Hkv, D), np.float32)
        self.ref_v = np.zeros((R, Hkv, D), np.float32)
        self.q = cp.zeros((Tmax, Hq, D), dtype=cp.float32 if q_kind == "f32" else cp.uint16)
        # k / v as views of a wider projection buffer, as the runtime hands them over
        self.kv_buf = cp.zeros((Tmax, 2, Hkv, D), dtype=cp.float32)
        self.k, self.v = self.kv_buf[:, 0], self.kv_buf[:, 1]
        self.out = cp.zeros((Tmax, Hq, D), dtype=cp.float32 if out_kind == "f32" else cp.uint16)
        self.past, self.nv = _scalar(0), _scalar(0)
        self.P = 0

    def launches(self, s):
        fa.window_attn(self.q, self.q_kind, self.k, self.v, self.k_ring, self.v_ring, self.out, self.Tmax, self.Hq,
                       self.Hkv, self.D, self.R, self.window, self.scale, self.past, self.nv, stream=s)
        d.kv_ring_append(self.k, self.k_ring, self.past, self.nv, stream=s)
        d.kv_ring_append(self.v, self.v_ring, self.past, self.nv, stream=s)

    def stage(self, n, s):
        """Random inputs of an n-row chunk (rows n.. of the buffers hold NaN: padding never read)."""
        q = (self.rng.standard_normal((self.Tmax, self.Hq, self.D)) * 0.5).astype(np.float32)
        kv = self.rng.standard_normal((self.Tmax, 2, self.Hkv, self.D)).astype(np.float32)
        q[n:], kv[n:] = np.nan, np.nan
        self.q_host = from_bf16_bits(to_bf16_bits(q)) if self.q_kind == "bf16" else q
        self.q.set(to_bf16_bits(q) if self.q_kind == "bf16" else q, stream=s)
        self.kv_host = kv
        self.kv_buf.set(kv, stream=s)
        self.past.set(np.array([self.P], np.int32), stream=s)
        self.nv.set(np.array([n], np.int32), stream=s)
        # ring rows holding positions no query of this chunk sees: NaN (they must not be read)
        pos = attn_ref.ring_positions(self.P, self.R)
        stale = (pos >= 0) & (pos < self.P - self.window + 1)
        if stale.any():
            with s:          # on the chunk's stream, ordered before its launches
                rows = cp.asarray(np.nonzero(stale)[0])
                self.k_ring[rows] = BF16_NAN
                self.v_ring[rows] = BF16_NAN

    def check(self, n):
        k, v = self.kv_host[:n, 0], self.kv_host[:n, 1]
        want = attn_ref.attention_window(self.q_host[:n], k, v, self.ref_k, self.ref_v, P=self.P,
                                         window=self.window, scale=self.scale)
        got = cp.asnumpy(self.out)
        got = from_bf16_bits(got) if self.out_kind == "bf16" else got
        assert np.isfinite(got).all(), "NaN: a key outside the window (or a padding row) was read"
        rms, mx = errors(got[:n], want.astype(np.float64))
        tol = (1e-4, 1e-3) if self.out_kind == "f32" else (1e-2, 1e-2)
        assert rms < tol[0] and mx < tol[1], (self.P, n, rms, mx)
        assert (got[n:] == 0).all(), "padding rows must be zero"
        # the rings after the chunk: the reference ring of bf16-rounded keys, row for row (rows
        # poisoned as stale and not rewritten are outside every later window: skip them)
        self.ref_k = attn_ref.kv_ring_append(self.ref_k, round_bf16(k), P=self.P)
        self.ref_v = attn_ref.kv_ring_append(self.ref_v, round_bf16(v), P=self.P)
        self.P += n
        pos = attn_ref.ring_positions(self.P, self.R)
        live = (pos >= 0) & (pos >= self.P - self.window + 1)
        for dev, ref in ((self.k_ring, self.ref_k), (self.v_ring, self.ref_v)):
            np.testing.assert_array_equal(from_bf16_bits(cp.asnumpy(dev))[live], ref[live])


@pytest.mark.parametrize("D,Hq,Hkv,window,R,q_kind,out_kind", [
    (512, 8, 2, 64, 64, "f32", "f32"),       # Gemma's full-size head dim; ring = window
    (512, 4, 1, 48, 60, "bf16", "bf16"),     # ring longer than the window: stale rows poisoned
    (256, 8, 4, 64, 63, "f32", "bf16"),      # ring = window - 1, the least that works
    (32, 2, 1, 8, 8, "f32", "f32"),          # the test fixtures' sliding head dim and window
], ids=lambda x: str(x))
def test_window_attention_over_the_ring_across_chunks(D, Hq, Hkv, window, R, q_kind, out_kind):
    """Chunks of 1..Tmax valid rows (padded to Tmax) at growing P: the first eagerly, the rest by
    replaying one captured graph with new inputs, P and n_valid, as the runtime does. The ring
    wraps many times; the window crosses every chunk boundary."""
    Tmax = 40
    L = RingLayer(Tmax=Tmax, Hq=Hq, Hkv=Hkv, D=D, R=R, window=window, scale=1.0 / np.sqrt(D), q_kind=q_kind,
                  out_kind=out_kind, seed=D + window + R)
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()       # the buffers' initialisation (default stream) is done
    sizes = [7, 40, 1, 33, 40, 40, 2, 17, 40, 5, 40, 40, 39]
    L.stage(sizes[0], s)
    with s:
        L.launches(s)
    s.synchronize()
    L.check(sizes[0])
    s.begin_capture()
    L.launches(s)
    graph = s.end_capture()
    for n in sizes[1:]:
        L.stage(n, s)
        graph.launch(s)
        s.synchronize()
        L.check(n)
    assert L.P > 4 * R


def test_window_attention_gemma_scale_and_shared_layers():
    """Attention scale 1.0 on RMS-normed q / k (Gemma 4), and a KV-shared layer: a second
    attention reading the same chunk k / v and rings gives the same result as its source."""
    D, Hq, Hkv, W = 256, 8, 1, 32
    rng = np.random.default_rng(5)
    T, P = 24, 50
    unit = lambda x: x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True))  # noqa: E731
    q = unit(rng.standard_normal((T, Hq, D))).astype(np.float32) * 0.3
    k = unit(rng.standard_normal((T, Hkv, D))).astype(np.float32) * 0.3
    v = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    kr = round_bf16(unit(rng.standard_normal((W, Hkv, D))).astype(np.float32) * 0.3)
    vr = round_bf16(rng.standard_normal((W, Hkv, D)).astype(np.float32))
    want = attn_ref.attention_window(q, k, v, kr, vr, P=P, window=W, scale=1.0)
    outs = []
    for _ in range(2):
        out = cp.full((T, Hq, D), np.nan, dtype=cp.float32)
        fa.window_attn(cp.asarray(q), "f32", cp.asarray(k), cp.asarray(v), cp.asarray(to_bf16_bits(kr)),
                       cp.asarray(to_bf16_bits(vr)), out, T, Hq, Hkv, D, W, W, 1.0, _scalar(P), _scalar(T))
        outs.append(cp.asnumpy(out))
    rms, mx = errors(outs[0], want)
    assert rms < 1e-4 and mx < 1e-3, (rms, mx)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("D", [512, 32])
def test_cuda_core_attention_over_the_cache(D):
    """ring_rows 0: causal attention over the bf16 KV cache (the full layers at head dims the
    tensor-core kernel lacks), against ref.attention_cache; cache rows past P + T poisoned."""
    Hq, Hkv, T, P, max_ctx = 8, 2, 37, 90, 160
    rng = np.random.default_rng(D)
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    k_bits = to_bf16_bits(rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32))
    v_bits = to_bf16_bits(rng.standard_normal((max_ctx, Hkv, D)).astype(np.float32))
    k_bits[P + T:] = BF16_NAN
    v_bits[P + T:] = BF16_NAN
    scale = 1.0 / np.sqrt(D)
    n_valid = 30
    out = cp.full((T, Hq, D), np.nan, dtype=cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    qd, kc, vc, past, nv = cp.asarray(q), cp.asarray(k_bits), cp.asarray(v_bits), _scalar(P), _scalar(n_valid)
    cp.cuda.Device().synchronize()       # nothing but the launch inside the capture
    s.begin_capture()
    fa.window_attn(qd, "f32", None, None, kc, vc, out, T, Hq, Hkv, D, 0, 0, scale, past, nv, stream=s)
    s.end_capture().launch(s)
    s.synchronize()
    got = cp.asnumpy(out)
    want = attn_ref.attention_cache(q[:n_valid], from_bf16_bits(k_bits), from_bf16_bits(v_bits), P, scale=scale)
    rms, mx = errors(got[:n_valid], want)
    assert rms < 1e-4 and mx < 1e-3, (rms, mx)
    assert (got[n_valid:] == 0).all()


# ---- PLE gather ---------------------------------------------------------------------------------

@pytest.mark.parametrize("w_type", ["q8_0", "q6_k", "q4_k", "q5_0", "f16", "bf16"])
def test_ple_gather(w_type):
    """Per-layer embedding rows gathered by token id and dequantised on the device, times sqrt(P):
    ref.ple_gather on the same table (dequantisation bit-exact, one f32 multiply)."""
    V, L, P, T = 300, 5, 256, 29
    rng = np.random.default_rng(17)
    raw, dense = random_weight(w_type, (V, L * P), rng)
    raw = np.ascontiguousarray(raw).view(np.uint8)            # the table's GGUF bytes, as uploaded
    ids = rng.integers(0, V, T).astype(np.int32)
    ids[3] = ids[7]                      # repeated tokens
    ids_dev = cp.asarray(np.concatenate([ids, np.zeros(3, np.int32)]))    # a padded chunk's ids
    out = cp.full((T, L, P), np.nan, dtype=cp.float32)
    table = cp.asarray(raw)
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    s.begin_capture()
    d.ple_gather(table, w_type, ids_dev, out, float(np.sqrt(P)), stream=s)
    s.end_capture().launch(s)
    s.synchronize()
    want = dense_ref.ple_gather(dense.astype(np.float32), ids, n_layer=L, width=P, scale=float(np.sqrt(P)))
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-6, atol=1e-6)


# ---- norm_add / norm_add_norm -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 2560), (21, 5376), (19, 4, 32), (9, 35, 256), (5, 256)], ids=str)
@pytest.mark.parametrize("out_kind", ["f32", "bf16"])
def test_norm_add_and_norm_add_norm(shape, out_kind):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    D = shape[-1]
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    w2 = rng.standard_normal(D).astype(np.float32)
    s = np.array([0.37], np.float32)
    eps, eps2 = 1e-6, 1e-5
    # norm_add with the layer_output_scale, in place into the residual
    res = cp.asarray(r)
    d.norm_add(cp.asarray(x), cp.asarray(w), res, res, scale=cp.asarray(s), eps=eps)
    np.testing.assert_allclose(cp.asnumpy(res), ew_ref.norm_add(x, w, r, s, eps=eps), rtol=1e-5, atol=1e-5)
    # norm_add_norm without the scale: (normed, sum)
    total = cp.full(shape, np.nan, dtype=cp.float32)
    normed = cp.full(shape, np.nan, dtype=cp.float32) if out_kind == "f32" else cp.full(shape, 0xFFFF, dtype=cp.uint16)
    d.norm_add(cp.asarray(x), cp.asarray(w), cp.asarray(r), total, w_next=cp.asarray(w2), out_norm=normed, eps=eps,
               eps_next=eps2)
    want_n, want_s = ew_ref.norm_add_norm(x, w, r, w2, eps=eps, eps_next=eps2)
    np.testing.assert_allclose(cp.asnumpy(total), want_s, rtol=1e-5, atol=1e-5)
    got_n = cp.asnumpy(normed)
    got_n = from_bf16_bits(got_n) if out_kind == "bf16" else got_n
    tol = 1e-5 if out_kind == "f32" else 8e-3
    np.testing.assert_allclose(got_n, want_n, rtol=tol, atol=tol * np.abs(want_n).max())


# ---- elementwise: GELU, GELU GLU, softcap; rope factors; expert scale ----------------------------

def test_gelu_gelu_mul_softcap():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((33, 300)) * 4).astype(np.float32)
    y = rng.standard_normal((33, 300)).astype(np.float32)
    out = cp.empty_like(cp.asarray(x))
    d.gelu(cp.asarray(x), out)
    np.testing.assert_allclose(cp.asnumpy(out), dense_ref.gelu(x), rtol=1e-5, atol=1e-6)
    d.gelu_mul(cp.asarray(x), cp.asarray(y), out)
    np.testing.assert_allclose(cp.asnumpy(out), ew_ref.gelu_mul(x, y), rtol=1e-5, atol=1e-6)
    ob = cp.empty(x.shape, dtype=cp.uint16)
    d.gelu_mul(cp.asarray(x), cp.asarray(y), ob)
    np.testing.assert_allclose(from_bf16_bits(cp.asnumpy(ob)), ew_ref.gelu_mul(x, y), rtol=8e-3, atol=1e-6)
    logits = (rng.standard_normal((7, 1000)) * 80).astype(np.float32)
    lg = cp.asarray(logits)
    d.softcap(lg, lg, 30.0)          # in place, as the LM head applies it
    np.testing.assert_allclose(cp.asnumpy(lg), dense_ref.softcap(logits, cap=30.0), rtol=1e-5, atol=1e-5)


def test_norm_rope_with_gemma_rope_freqs():
    """Full layers: NEOX over all 512 dims with rope_freqs (1 on the first quarter of the pairs,
    1e30 on the rest: those pairs do not rotate), base 1e6, positions up to 1e5."""
    T, H, D = 9, 3, 512
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    ff = np.where(np.arange(D // 2) < D // 8, 1.0, 1e30).astype(np.float32)
    pos = np.array([0, 1, 2, 511, 512, 4000, 33333, 65000, 100000], np.int32)
    out = cp.full((T, H, D), np.nan, dtype=cp.float32)
    d.norm_rope(cp.asarray(x), cp.asarray(w), cp.asarray(pos), out, eps=1e-6, n_dims=D, freq_base=1e6, mode="neox",
                freq_factors=cp.asarray(ff))
    want = ew_ref.norm_rope(x, w, pos, eps=1e-6, n_dims=D, freq_base=1e6, mode="neox", freq_scale=1.0,
                            freq_factors=ff)
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-4, atol=1e-4)


def test_scale_by_expert():
    rng = np.random.default_rng(6)
    T, k, E = 50, 8, 128
    ids = rng.integers(0, E, (T, k)).astype(np.int32)
    wts = rng.random((T, k)).astype(np.float32)
    sc = rng.random(E).astype(np.float32) * 3
    dev = cp.asarray(wts)
    d.scale_by_expert(dev, cp.asarray(ids), cp.asarray(sc))
    np.testing.assert_array_equal(cp.asnumpy(dev), wts * sc[ids])


@pytest.mark.parametrize("w_type", ["q4_k", "q8_0", "q5_0"])
def test_qf32_gelu_glu(w_type):
    """precision f32: the f32 GLU GEMM with the GELU gate (GLU_ACT=1) against ffn_geglu."""
    from ggfuse.kernels.dense import qf32
    rng = np.random.default_rng(8)
    M, F, K = 40, 96, 512
    rg, dg = random_weight(w_type, (F, K), rng)
    ru, du = random_weight(w_type, (F, K), rng)
    x = rng.standard_normal((M, K)).astype(np.float32)
    out = cp.full((M, F), np.nan, dtype=cp.float32)
    qf32.gemm_swiglu_qf32(cp.asarray(x), cp.asarray(rg), cp.asarray(ru), w_type, F, K, out, act="gelu")
    want = ew_ref.ffn_geglu(x, dg, du)
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
