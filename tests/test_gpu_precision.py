"""The kernels of precision="f32" (kernels/dense/gemm_qf32.cu, kernels/moe/grouped_f32.cu)
against float64 numpy on the dequantised weights (gguf.quants), eagerly and inside a captured
CUDA graph: f32 accuracy (relative RMS < 1e-5; a bf16 operand rounding would be ~3e-3), every
output element written (outputs poisoned with NaN first), strided views, padding slots and
padded tokens of the MoE layout."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu, run_captured  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.dense import qf32  # noqa: E402
from ggfuse.kernels.gemm.weights import random_weight  # noqa: E402
from ggfuse.kernels.moe import launch_f32 as moe32  # noqa: E402
from ggfuse.kernels.moe import ref as moe_ref  # noqa: E402

W_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k")


def rng_for(*parts):
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def dev_weight(w_type, shape, rng):
    raw, dense = random_weight(w_type, shape, rng)
    return cp.asarray(np.ascontiguousarray(raw).view(np.uint8)), dense.astype(np.float64)


def assert_f32_close(got, ref, what, rtol_rms=1e-5, atol_rel=1e-4):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{what}: {int((~np.isfinite(got)).sum())} non-finite (unwritten?) elements"
    d = got - ref
    rms = float(np.sqrt((d ** 2).mean() / max((ref ** 2).mean(), 1e-30)))
    mx = float(np.abs(d).max() / max(np.abs(ref).max(), 1e-30))
    assert rms < rtol_rms and mx < atol_rel, f"{what}: rel RMS {rms:.3g}, max-abs/max {mx:.3g}"


def eager_and_graph(run, reset, check):
    """run(stream) eagerly, check; reset, capture run into a CUDA graph, replay, check again."""
    reset()
    run(None)
    cp.cuda.Device().synchronize()
    check("eager")
    reset()
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    run_captured(s, run)
    check("graph")


def silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("w_type", W_TYPES)
@pytest.mark.parametrize("M,N,K", [(37, 100, 256), (130, 64, 512), (1, 257, 256)])
def test_gemm_qf32(w_type, M, N, K):
    rng = rng_for("gemm", w_type, M, N, K)
    w, W = dev_weight(w_type, (N, K), rng)
    # a: a column slice of a wider buffer (row stride K + 24); c: a column slice too
    a_buf = cp.asarray(rng.standard_normal((M, K + 24), dtype=np.float32))
    a = a_buf[:, 8:8 + K]
    c_buf = cp.empty((M, N + 5), dtype=cp.float32)
    c = c_buf[:, 2:2 + N]
    A = cp.asnumpy(a).astype(np.float64)
    ref = A @ W.T
    eager_and_graph(lambda s: qf32.gemm_qf32(a, w, w_type, N, K, c, stream=s),
                    lambda: c_buf.fill(np.nan),
                    lambda how: assert_f32_close(cp.asnumpy(c), ref, f"gemm_qf32 {w_type} {how}"))
    # accumulate: c += a W^T on top of what is there; the columns around c are untouched
    base = rng.standard_normal((M, N + 5)).astype(np.float32)
    eager_and_graph(lambda s: qf32.gemm_qf32(a, w, w_type, N, K, c, accumulate=True, stream=s),
                    lambda: c_buf.set(base),
                    lambda how: (assert_f32_close(cp.asnumpy(c), base[:, 2:2 + N] + ref, f"accumulate {how}"),
                                 np.testing.assert_array_equal(cp.asnumpy(c_buf)[:, :2], base[:, :2])))


@pytest.mark.parametrize("w_type", ("f32", "q8_0", "q4_k", "q6_k"))
def test_gemm_swiglu_qf32(w_type):
    M, N, K = 77, 96, 256
    rng = rng_for("swiglu", w_type)
    wg, WG = dev_weight(w_type, (N, K), rng)
    wu, WU = dev_weight(w_type, (N, K), rng)
    a = cp.asarray(rng.standard_normal((M, K), dtype=np.float32) * 30)
    c = cp.empty((M, N), dtype=cp.float32)
    A = cp.asnumpy(a).astype(np.float64)
    ref = silu(A @ WG.T) * (A @ WU.T)
    eager_and_graph(lambda s: qf32.gemm_swiglu_qf32(a, wg, wu, w_type, N, K, c, stream=s),
                    lambda: c.fill(np.nan),
                    lambda how: assert_f32_close(cp.asnumpy(c), ref, f"gemm_swiglu_qf32 {w_type} {how}"))


def _layout(T, n_valid, E, k, tile, rng):
    """ids / weights of n_valid routed tokens (padded tokens: no slot, weight 0) and the device
    layout of kernels/moe/route.cu for T tokens."""
    logits = rng.standard_normal((T, E))
    ids = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    wts[n_valid:] = 0
    slots, offs = moe_ref.route_layout(ids[:n_valid], n_expert=E, tile=tile)
    full = np.full(moe_ref.padded_length(T, k, E, tile), -1, np.int32)
    full[:slots.size] = slots
    return wts, full, offs


@pytest.mark.parametrize("T,n_valid,E,k,D,F,gu,dn,merged", [
    (16, 16, 4, 2, 256, 32, "f32", "f32", False),        # the test fixtures' shapes
    (16, 11, 4, 2, 256, 32, "q8_0", "q8_0", True),       # padded chunk, merged gate_up
    (40, 40, 8, 2, 256, 64, "q4_k", "q5_0", False),
    (256, 200, 64, 8, 512, 256, "q4_k", "q6_k", False),  # many experts (Q6_K down: F a multiple of 256)
    (3, 3, 32, 4, 256, 96, "bf16", "q8_0", True),        # few tokens: most experts empty
])
def test_moe_experts_f32(T, n_valid, E, k, D, F, gu, dn, merged):
    tile = 128
    rng = rng_for("moe", T, n_valid, E, k, D, F, gu, dn, merged)
    wts, slots, offs = _layout(T, n_valid, E, k, tile, rng)
    if merged:
        w_gate, WGU = dev_weight(gu, (E, 2 * F, D), rng)
        w_up, WG, WU = None, WGU[:, :F], WGU[:, F:]
    else:
        w_gate, WG = dev_weight(gu, (E, F, D), rng)
        w_up, WU = dev_weight(gu, (E, F, D), rng)
    w_down, WD = dev_weight(dn, (E, D, F), rng)
    x_host = (rng.standard_normal((T, D)) * 3).astype(np.float32)
    x = cp.asarray(x_host)
    S = slots.size
    h = cp.empty((S, F), dtype=cp.float32)
    y = cp.empty((T * k, D), dtype=cp.float32)
    out = cp.empty((T, D), dtype=cp.float32)
    d_slots, d_offs, d_w = cp.asarray(slots), cp.asarray(offs), cp.asarray(wts)
    ref = moe_ref.moe_grouped_gemm(x_host[:n_valid].astype(np.float64), wts[:n_valid].astype(np.float64),
                                   slots, offs, w_down=WD, w_gate=WG, w_up=WU).astype(np.float64)

    def run(s):
        moe32.moe_experts_f32(x, w_gate, w_up, gu, w_down, dn, E, F, D, d_slots, d_offs, d_w, h, y, out,
                              tile=tile, stream=s)

    def reset():
        for a in (h, y, out):
            a.fill(np.nan)

    def check(how):
        got = cp.asnumpy(out)
        assert_f32_close(got[:n_valid], ref, f"moe_experts_f32 {gu}/{dn} {how}")
        assert (got[n_valid:] == 0).all(), "padded tokens must get nothing from the experts"
        hh = cp.asnumpy(h)
        pad = [i for i in range(int(offs[-1])) if slots[i] < 0]
        assert (hh[pad] == 0).all(), "padding rows of the layout must be 0 in h"
    eager_and_graph(run, reset, check)
