"""Tensor-core GEMMs (kernels/gemm/gemm.cu, and gemm90.cu on cc 9.0) against float64 numpy on the same bf16-rounded
operands, for every weight type and both activation storages, eagerly and in a CUDA graph.

The kernel rounds A and the dequantised W to bf16 and accumulates in f32, so the reference is
float64 matmul of round_bf16(A) and round_bf16(dequantize(W)): f32 outputs must agree to
~1e-5 relative RMS (we allow 1e-3); bf16 outputs to the context's 1e-2 / 2e-2 tolerances.
Outputs are poisoned with NaN first so an unwritten element fails. M and N are not multiples of
the 128 x 128 tile. Every test runs once per kernel family (the `impl` fixture: the launchers' impl= and variants):
mma (mma.sync) everywhere, wgmma (sm_90a) on a cc 9.0 device for the types it has.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import Family, require_gpu  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.dense import ref as dense_ref  # noqa: E402
from ggfuse.kernels.gemm import launch  # noqa: E402
from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits, random_weight, round_bf16  # noqa: E402

TYPES = launch.WEIGHT_TYPES


@pytest.fixture(params=[*launch.IMPLS, "wgmma_tiles", "wgmma_generic"])
def impl(request):
    """The GEMM kernel family under test (gpu_util.Family: its launcher arguments in .gemm):
    wgmma_generic = the wgmma kernels with the element-wise dequant8 instead of the word-wise one;
    wgmma = persistent blocks, wgmma_tiles = a block per tile."""
    if request.param.startswith("wgmma") and launch.device_cc() != 90:
        pytest.skip("the wgmma kernels need a compute capability 9.0 device")
    return Family(request.param)


def need(impl, w_type, K):
    if impl.startswith("wgmma") and (w_type not in launch.SM90_TYPES or K % 64):
        pytest.skip(f"no wgmma kernel for {w_type} / K={K}")
    if impl == "wgmma_generic" and w_type == "bf16":
        pytest.skip("bf16 weights are not dequantised")


def rel_rms(x, ref):
    return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-30))


def check(out, ref, out_kind):
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), f"{np.count_nonzero(~np.isfinite(out))} non-finite outputs (unwritten?)"
    e = rel_rms(out, ref)
    m = float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
    tol = 1e-3 if out_kind == "f32" else 1e-2
    assert e < tol and m < 2e-2, f"rel rms {e:.3g}, max-abs/max {m:.3g}"


def make_a(M, K, a_kind, rng, lda=None):
    """A [M, lda] on the device and its bf16-rounded float64 [M, K] meaning."""
    lda = K if lda is None else lda
    a = rng.standard_normal((M, lda), dtype=np.float32)
    if a_kind == "bf16":
        bits = f32_to_bf16_bits(a)
        return cp.asarray(bits), bf16_bits_to_f32(bits)[:, :K].astype(np.float64)
    return cp.asarray(a), round_bf16(a)[:, :K].astype(np.float64)


def host(c, kind):
    h = cp.asnumpy(c)
    return bf16_bits_to_f32(h) if kind == "bf16" else h


def new_c(M, ldc, kind):
    c = cp.empty((M, ldc), dtype=cp.float32 if kind == "f32" else cp.uint16)
    c.fill(np.nan if kind == "f32" else 0xFFFF)
    return c


def weight(w_type, N, K, seed):
    raw, dense = random_weight(w_type, (N, K), np.random.default_rng(seed))
    return cp.asarray(raw), round_bf16(dense).astype(np.float64)


@pytest.mark.parametrize("M", [1, 77, 300], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("a_kind", ["f32", "bf16"])
@pytest.mark.parametrize("w_type", TYPES)
def test_gemm(w_type, a_kind, M, impl):
    rng = np.random.default_rng(zlib.crc32(f'{w_type}/{a_kind}/{M}'.encode()))
    N, K = 192, 1024
    need(impl, w_type, K)     # N: one full and one half column tile; K: 4 super-blocks / 32 steps
    w, W = weight(w_type, N, K, 1)
    a, A = make_a(M, K, a_kind, rng)
    c = new_c(M, N, "f32")
    launch.prepare(a_kind, w_type, impl.gemm["impl"], impl.gemm["dequant"])
    launch.gemm(a, a_kind, K, w, w_type, N, K, c, "f32", N, M, **impl.gemm)
    check(host(c, "f32"), A @ W.T, "f32")


@pytest.mark.parametrize("w_type", ["bf16", "q4_k", "q6_k", "q8_0"])
def test_gemm_strided_bf16_out_and_accumulate(w_type, impl):
    """lda > K, ldc > N, N odd-ish tail (N = 200), bf16 output, then accumulate into it."""
    rng = np.random.default_rng(7)
    M, N, K, lda, ldc = 130, 200, 512, 520, 208
    need(impl, w_type, K)
    w, W = weight(w_type, N, K, 2)
    a, A = make_a(M, K, "bf16", rng, lda=lda)
    c = new_c(M, ldc, "bf16")
    launch.gemm(a, "bf16", lda, w, w_type, N, K, c, "bf16", ldc, M, **impl.gemm)
    out = host(c, "bf16")
    ref = A @ W.T
    check(out[:, :N], ref, "bf16")
    assert np.isnan(out[:, N:]).all(), "columns past N were written"
    # accumulate: c += A W^T (f32 output, known initial values)
    c2 = cp.asarray(rng.standard_normal((M, ldc), dtype=np.float32))
    init = cp.asnumpy(c2).astype(np.float64)
    launch.gemm(a, "bf16", lda, w, w_type, N, K, c2, "f32", ldc, M, accumulate=True, **impl.gemm)
    got = cp.asnumpy(c2)
    check(got[:, :N], init[:, :N] + ref, "f32")
    assert np.array_equal(got[:, N:], init[:, N:].astype(np.float32))


def test_gemm_matches_dense_ref(impl):
    """The IR's matmul reference (f32, unrounded) within the bf16 tensor-core tolerance."""
    rng = np.random.default_rng(3)
    M, N, K = 64, 256, 2048
    need(impl, "q4_k", K)
    raw, dense = random_weight("q4_k", (N, K), rng)
    x = rng.standard_normal((M, K), dtype=np.float32)
    c = new_c(M, N, "f32")
    launch.gemm(cp.asarray(x), "f32", K, cp.asarray(raw), "q4_k", N, K, c, "f32", N, M, **impl.gemm)
    ref = dense_ref.matmul(x, dense).astype(np.float64)
    out = cp.asnumpy(c).astype(np.float64)
    assert rel_rms(out, ref) < 1e-2
    assert np.abs(out - ref).max() < 2e-2 * np.abs(ref).max()


def silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("c_kind", ["bf16", "f32"])
@pytest.mark.parametrize("a_kind", ["f32", "bf16"])
@pytest.mark.parametrize("w_type", TYPES)
def test_gemm_swiglu(w_type, a_kind, c_kind, impl):
    rng = np.random.default_rng(zlib.crc32(f'swiglu/{w_type}/{a_kind}/{c_kind}'.encode()))
    M, F, K = 150, 160, 512     # F: two full 64-column blocks and a half one
    need(impl, w_type, K)
    wg, WG = weight(w_type, F, K, 4)
    wu, WU = weight(w_type, F, K, 5)
    a, A = make_a(M, K, a_kind, rng)
    c = new_c(M, F, c_kind)
    launch.gemm_swiglu(a, a_kind, K, wg, wu, w_type, F, K, c, c_kind, F, M, **impl.gemm)
    check(host(c, c_kind), silu(A @ WG.T) * (A @ WU.T), c_kind)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("c_kind", ["bf16", "f32"])
@pytest.mark.parametrize("w_type", ["bf16", "q4_k", "q6_k", "q8_0", "q5_0"])
def test_gemm_geglu(w_type, c_kind, impl):
    """Gemma 4's GELU GLU: the gemm_swiglu kernels built with the GELU-tanh gate (act "gelu",
    GLU_ACT=1), against gelu(A Wg^T) * (A Wu^T); also inside a captured graph, and the IR's
    reference (kernels/elementwise/ref.py ffn_geglu) at the bf16 tolerance."""
    from gpu_util import run_captured
    from ggfuse.kernels.elementwise import ref as ew_ref
    rng = np.random.default_rng(zlib.crc32(f'geglu/{w_type}/{c_kind}'.encode()))
    M, F, K = 150, 160, 512
    need(impl, w_type, K)
    rw_g, dg = random_weight(w_type, (F, K), np.random.default_rng(14))
    rw_u, du = random_weight(w_type, (F, K), np.random.default_rng(15))
    wg, wu = cp.asarray(rw_g), cp.asarray(rw_u)
    WG, WU = round_bf16(dg).astype(np.float64), round_bf16(du).astype(np.float64)
    x = rng.standard_normal((M, K), dtype=np.float32)
    a, A = cp.asarray(x), round_bf16(x).astype(np.float64)
    launch.prepare("f32", w_type, impl.gemm["impl"], impl.gemm["dequant"], act="gelu")
    c = new_c(M, F, c_kind)
    launch.gemm_swiglu(a, "f32", K, wg, wu, w_type, F, K, c, c_kind, F, M, act="gelu", **impl.gemm)
    want = gelu(A @ WG.T) * (A @ WU.T)
    check(host(c, c_kind), want, c_kind)
    assert not np.allclose(host(c, c_kind), silu(A @ WG.T) * (A @ WU.T), rtol=1e-2, atol=1e-2), "silu, not gelu"
    c2 = new_c(M, F, c_kind)
    run_captured(cp.cuda.Stream(non_blocking=True),
                 lambda s: launch.gemm_swiglu(a, "f32", K, wg, wu, w_type, F, K, c2, c_kind, F, M, stream=s, act="gelu",
                                              **impl.gemm))
    assert np.array_equal(cp.asnumpy(c2), cp.asnumpy(c))
    ref = ew_ref.ffn_geglu(x, dg, du).astype(np.float64)
    out = host(c, c_kind).astype(np.float64)
    assert np.abs(out - ref).max() < 2e-2 * np.abs(ref).max()


def test_gemm_swiglu_merged_views(impl):
    """gate/up as the two halves of one merged [2F, K] tensor (byte views)."""
    rng = np.random.default_rng(11)
    M, F, K = 40, 128, 256
    need(impl, "q4_k", K)
    raw, dense = random_weight("q4_k", (2 * F, K), rng)
    w = cp.asarray(raw)
    W = round_bf16(dense).astype(np.float64)
    a, A = make_a(M, K, "bf16", rng)
    c = new_c(M, F, "bf16")
    launch.gemm_swiglu(a, "bf16", K, w[:F], w[F:], "q4_k", F, K, c, "bf16", F, M, **impl.gemm)
    check(host(c, "bf16"), silu(A @ W[:F].T) * (A @ W[F:].T), "bf16")


@pytest.mark.parametrize("w_type", ["bf16", "q4_k", "q6_k"])
def test_gemm_graph_replay(w_type, impl):
    """Captured once, replayed with new A contents: the graph reads the buffers, not copies."""
    rng = np.random.default_rng(21)
    M, N, K = 257, 384, 512
    need(impl, w_type, K)
    w, W = weight(w_type, N, K, 6)
    a, A = make_a(M, K, "bf16", rng)
    c = new_c(M, N, "f32")
    h = new_c(M, N // 2, "bf16")
    launch.prepare("bf16", w_type, impl.gemm["impl"], impl.gemm["dequant"])
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    launch.gemm(a, "bf16", K, w, w_type, N, K, c, "f32", N, M, stream=s, **impl.gemm)
    launch.gemm_swiglu(a, "bf16", K, w[:N // 2], w[N // 2:], w_type, N // 2, K, h, "bf16", N // 2, M, stream=s, **impl.gemm)
    g = s.end_capture()
    for _ in range(2):
        a2, A2 = make_a(M, K, "bf16", rng)
        a[...] = a2
        c.fill(np.nan)
        h.fill(0xFFFF)
        cp.cuda.Device().synchronize()   # default-stream writes before the replay on s
        g.launch(s)
        s.synchronize()
        check(host(c, "f32"), A2 @ W.T, "f32")
        F = N // 2
        check(host(h, "bf16"), silu(A2 @ W[:F].T) * (A2 @ W[F:].T), "bf16")


def test_smem_budget_fits():
    """Every variant's shared memory fits one block on sm_89 and two blocks on sm_90 (mma.sync),
    one block of at most 227 KB (wgmma)."""
    for t in TYPES:
        assert launch.smem_bytes(t, 89) + 128 <= 99 * 1024, t
        assert 2 * (launch.smem_bytes(t, 90) + 128 + 1024) <= 228 * 1024, t
    for t in launch.SM90_TYPES:
        for a in ("bf16", "f32"):
            assert launch.cfg90(t, a)[2] <= 227 * 1024, (t, a)
        if t != "bf16":   # the MoE kernels' wide tiles
            assert launch.cfg90(t, "bf16", wide=True)[2] <= 227 * 1024, t


@pytest.mark.parametrize("M", [1, 77, 4096], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("w_type", ["bf16", "q4_k", "q6_k", "q8_0"])
def test_gemm_prefill_shape(w_type, M, impl):
    """Prefill-sized M with N not a multiple of any tile (1000) and K = 2048; bf16 output.
    K = 2048 gives 32 wgmma steps, more than the 4-deep ring wraps, so the barrier phases flip."""
    N, K = 1000, 2048
    need(impl, w_type, K)
    rng = np.random.default_rng(zlib.crc32(f'prefill/{w_type}/{M}'.encode()))
    w, W = weight(w_type, N, K, 8)
    a, A = make_a(M, K, "bf16", rng)
    c = new_c(M, N, "bf16")
    launch.prepare("bf16", w_type, impl.gemm["impl"], impl.gemm["dequant"])
    launch.gemm(a, "bf16", K, w, w_type, N, K, c, "bf16", N, M, **impl.gemm)
    check(host(c, "bf16"), A @ W.T, "bf16")


def test_gemm_auto_falls_back_for_k_not_multiple_of_64():
    """K = 96: no wgmma kernel, the automatic choice is the mma.sync one (on any device)."""
    assert launch.pick_impl("bf16", 96) == "mma"
    rng = np.random.default_rng(13)
    M, N, K = 50, 130, 96
    w, W = weight("bf16", N, K, 9)
    a, A = make_a(M, K, "bf16", rng)
    c = new_c(M, N, "f32")
    launch.gemm(a, "bf16", K, w, "bf16", N, K, c, "f32", N, M)
    check(host(c, "f32"), A @ W.T, "f32")
