"""Few-row products from GGUF weights (kernels/dense/gemv.cu) against float64 numpy on the
dequantised weight: every weight type, f32 and bf16 activations, M = 1..8, the run-time row
(nvalid - 1) of the last-token LM head, eagerly and in a captured CUDA graph. Outputs are
poisoned with NaN first so an unwritten element fails; N is not a multiple of the 8 rows a
block covers."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors, require_gpu  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.dense import launch  # noqa: E402
from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits, random_weight  # noqa: E402

TYPES = ("bf16", "q4_0", "q8_0", "q4_k", "q5_k", "q6_k")


def _x(M, K, kind, rng):
    x = rng.standard_normal((M, K), dtype=np.float32)
    if kind == "bf16":
        bits = f32_to_bf16_bits(x)
        return cp.asarray(bits), bf16_bits_to_f32(bits).astype(np.float64)
    return cp.asarray(x), x.astype(np.float64)


@pytest.mark.parametrize("a_kind", ["f32", "bf16"])
@pytest.mark.parametrize("w_type", TYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_gemv(w_type, a_kind, M):
    rng = np.random.default_rng(zlib.crc32(f"{w_type} {a_kind} {M}".encode()))
    N, K = 1000, 2048
    raw, dense = random_weight(w_type, (N, K), rng)
    w = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
    x, xh = _x(M, K, a_kind, rng)
    y = cp.full((M, N + 24), np.nan, dtype=cp.float32)
    launch.gemv(x, w, w_type, N, K, y[:, :N])
    cp.cuda.Device().synchronize()
    ref = xh @ dense.astype(np.float64).T
    got = cp.asnumpy(y)
    assert np.isnan(got[:, N:]).all(), "wrote past N"
    rms, mx = errors(got[:, :N], ref)
    assert rms < 1e-4 and mx < 1e-4, (rms, mx)


@pytest.mark.parametrize("w_type", ["bf16", "q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("N,K,wpr", [(32, 2048, 8), (61, 2048, 8), (500, 4096, 8), (2100, 4096, 2), (700, 256, 1)],
                         ids=["gates32", "n61", "n500", "n2100", "k256"])
@pytest.mark.parametrize("M", [1, 5])
def test_gemv_rows_shared_by_warps(w_type, N, K, wpr, M):
    """Small N: several warps of a block share each row (wpr), their sums added in shared memory."""
    assert launch.gemv_warps_per_row(N, K) == wpr
    rng = np.random.default_rng(zlib.crc32(f"{w_type} {N} {K} {M}".encode()))
    raw, dense = random_weight(w_type, (N, K), rng)
    w = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
    x, xh = _x(M, K, "bf16", rng)
    y = cp.full((M, N + 8), np.nan, dtype=cp.float32)
    launch.gemv(x, w, w_type, N, K, y[:, :N])
    cp.cuda.Device().synchronize()
    got = cp.asnumpy(y)
    assert np.isnan(got[:, N:]).all(), "wrote past N"
    rms, mx = errors(got[:, :N], xh @ dense.astype(np.float64).T)
    assert rms < 1e-4 and mx < 1e-4, (rms, mx)


@pytest.mark.parametrize("a_kind", ["f32", "bf16"])
@pytest.mark.parametrize("w_type", ["q4_k", "q6_k"])
@pytest.mark.parametrize("N,K", [(8192, 2048), (33, 2048), (300, 1280), (70, 256), (1000, 4096), (8192, 256),
                                 (33, 768)],
                         ids=["qkv", "n33", "k1280", "k256", "k4096", "n8192-k256", "n33-k768"])
def test_gemv_one_row(w_type, N, K, a_kind, monkeypatch):
    """M = 1 on Q4_K / Q6_K runs the kernel laid out for their blocks (gemv1_*): Q4_K 8 lanes per
    block and the x sums per 16 elements for the mins, Q6_K 4 lanes per block; K not a multiple of
    the blocks a warp step covers (4 / 8). Q6_K blocks are 210 bytes: with K >= 512 odd blocks
    start 2 mod 4, and with K = 256 or 768 (odd blocks per row) so do odd rows."""
    names = []
    real = launch._fn
    monkeypatch.setattr(launch, "_fn", lambda path, name: names.append(name) or real(path, name))
    rng = np.random.default_rng(zlib.crc32(f"one {w_type} {N} {K} {a_kind}".encode()))
    raw, dense = random_weight(w_type, (N, K), rng)
    w = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
    x, xh = _x(1, K, a_kind, rng)
    y = cp.full((1, N + 8), np.nan, dtype=cp.float32)
    launch.gemv(x, w, w_type, N, K, y[:, :N])
    cp.cuda.Device().synchronize()
    assert names == [f"gemv1_{a_kind}a_{w_type}"]
    got = cp.asnumpy(y)
    assert np.isnan(got[:, N:]).all(), "wrote past N"
    rms, mx = errors(got[:, :N], xh @ dense.astype(np.float64).T)
    assert rms < 1e-4 and mx < 1e-4, (rms, mx)


def test_gemv_one_row_q6_k_2_byte_aligned(monkeypatch):
    """A Q6_K matrix at 2 mod 4 (gemv1_q6k's word loads would reach 2 bytes before it) takes the
    8-element-group kernel, with the same result."""
    names = []
    real = launch._fn
    monkeypatch.setattr(launch, "_fn", lambda path, name: names.append(name) or real(path, name))
    rng = np.random.default_rng(11)
    N, K = 100, 512
    raw, dense = random_weight("q6_k", (N, K), rng)
    buf = cp.zeros(raw.nbytes + 16, dtype=cp.uint8)
    w = buf[2:2 + raw.nbytes]
    w.set(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    x, xh = _x(1, K, "f32", rng)
    y = cp.full((1, N), np.nan, dtype=cp.float32)
    launch.gemv(x, w, "q6_k", N, K, y)
    cp.cuda.Device().synchronize()
    assert names == ["gemv_f32a_q6_k"]
    rms, mx = errors(cp.asnumpy(y), xh @ dense.astype(np.float64).T)
    assert rms < 1e-4 and mx < 1e-4, (rms, mx)


@pytest.mark.parametrize("w_type", ["bf16", "q6_k", "q4_k"])
def test_gemv_last_row_in_graph(w_type):
    """The LM head of time-to-first-token: row nvalid-1, read at replay time."""
    rng = np.random.default_rng(7)
    T, N, K = 64, 777, 1024
    raw, dense = random_weight(w_type, (N, K), rng)
    w = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
    x, xh = _x(T, K, "f32", rng)
    nvalid = cp.zeros(1, dtype=cp.int32)
    y = cp.full((1, N), np.nan, dtype=cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    launch.gemv(x, w, w_type, N, K, y, nvalid=nvalid, stream=s)   # eager once (module load)
    s.synchronize()
    s.begin_capture()
    launch.gemv(x, w, w_type, N, K, y, nvalid=nvalid, stream=s)
    g = s.end_capture()
    for n in (1, 17, 64):
        nvalid.set(np.array([n], np.int32), stream=s)
        y.fill(np.nan)
        cp.cuda.Device().synchronize()   # default-stream writes before the replay on s
        g.launch(s)
        s.synchronize()
        ref = xh[n - 1:n] @ dense.astype(np.float64).T
        rms, mx = errors(cp.asnumpy(y), ref)
        assert rms < 1e-4 and mx < 1e-4, (n, rms, mx)


def test_gemv_rejects_bad_shapes():
    x = cp.zeros((9, 64), dtype=cp.float32)
    w = cp.zeros(64 * 64 * 2, dtype=cp.uint8)
    y = cp.zeros((9, 64), dtype=cp.float32)
    with pytest.raises(ValueError, match="M must be"):
        launch.gemv(x, w, "bf16", 64, 64, y)
    big = cp.zeros((8, 4096), dtype=cp.float32)
    with pytest.raises(ValueError, match="shared memory"):
        launch.gemv(big, cp.zeros(64 * 4096 * 2, dtype=cp.uint8), "bf16", 64, 4096, cp.zeros((8, 64), dtype=cp.float32))
    with pytest.raises(ValueError, match="multiple"):
        launch.gemv(x[:1], w, "q4_k", 64, 64, y[:1])


def _group_mats(w_type, Ns, K, xh, rng):
    """A random [n, K] matrix of w_type per n in Ns, each apart in memory, with its output row
    poisoned with NaN past n: (gemv_group's mats, float64 references xh @ W^T, the output rows)."""
    mats, refs, ys = [], [], []
    for n in Ns:
        raw, dense = random_weight(w_type, (n, K), rng)
        w = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
        y = cp.full((1, n + 8), np.nan, dtype=cp.float32)
        mats.append((w, n, y[:, :n]))
        refs.append(xh @ dense.astype(np.float64).T)
        ys.append(y)
    return mats, refs, ys


def _check_group(Ns, ys, refs, tol):
    """Each output row within tol of its reference (relative RMS and max), nothing written past N."""
    for n, y, ref in zip(Ns, ys, refs):
        got = cp.asnumpy(y)
        assert np.isnan(got[:, n:]).all(), "wrote past N"
        rms, mx = errors(got[:, :n], ref)
        assert rms < tol and mx < tol, (n, rms, mx)


@pytest.mark.parametrize("a_kind", ["f32", "bf16"])
@pytest.mark.parametrize("w_type", ["q4_k", "q6_k"])
@pytest.mark.parametrize("Ns", [(8192, 4096, 32, 32), (512, 61), (33,), (4096, 32, 32)],
                         ids=["qkv-z-beta-alpha", "two", "one", "three"])
def test_gemv_group(w_type, Ns, a_kind):
    """Several matrices of one type and K in one launch (launch.gemv_group: the decode step's
    projections of one input): each output equals its own product; rows of neighbouring
    matrices never mix (the matrices sit apart in memory, outputs are poisoned)."""
    rng = np.random.default_rng(zlib.crc32(f"group {w_type} {Ns} {a_kind}".encode()))
    K = 2048
    x, xh = _x(1, K, a_kind, rng)
    mats, refs, ys = _group_mats(w_type, Ns, K, xh, rng)
    launch.gemv_group(x, mats, w_type, K)
    cp.cuda.Device().synchronize()
    _check_group(Ns, ys, refs, 1e-4)


@pytest.mark.parametrize("out_kind", ["f32", "bf16", "none"])
@pytest.mark.parametrize("w_type", ["q4_k", "q6_k"])
@pytest.mark.parametrize("Ns", [(8192, 4096, 32, 32), (1000,)], ids=["qkv-z-beta-alpha", "one"])
def test_gemv_group_with_norm(w_type, Ns, out_kind):
    """gemv_group norm=: the launch computes add_rms_norm(x, b) * w itself (the decode step's
    attn_norm folded into its projections): every product equals the numpy reference on the
    normed row (rounded to bf16 where the normed output is bf16, as the unfolded launch would
    read it); the sum and the normed row are written once, whole, and nothing past them; x and
    b are left as they were."""
    from ggfuse.kernels.elementwise import ref as ew_ref
    rng = np.random.default_rng(zlib.crc32(f"norm {w_type} {Ns} {out_kind}".encode()))
    K, eps = 2048, 1e-6
    a = rng.standard_normal((1, K), dtype=np.float32)
    b = rng.standard_normal((1, K), dtype=np.float32) * 3
    nw = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    normed, total = ew_ref.add_rms_norm(a, b, nw, eps=eps)
    xh = normed.astype(np.float64)
    if out_kind == "bf16":
        xh = bf16_bits_to_f32(f32_to_bf16_bits(normed.astype(np.float32))).astype(np.float64)
    xa, xb = cp.asarray(a), cp.asarray(b)
    osum = cp.full((1, K + 8), np.nan, dtype=cp.float32)
    onorm = None if out_kind == "none" else cp.full((1, K + 8), 0x7FC0 if out_kind == "bf16" else np.nan,
                                                    dtype=cp.uint16 if out_kind == "bf16" else cp.float32)
    mats, refs, ys = _group_mats(w_type, Ns, K, xh, rng)
    launch.gemv_group(xa, mats, w_type, K, norm=(xb, cp.asarray(nw), eps, osum[:, :K],
                                                   None if onorm is None else onorm[:, :K]))
    cp.cuda.Device().synchronize()
    # bf16: an element whose normed value sits on a rounding midpoint may round the other way
    _check_group(Ns, ys, refs, 3e-4 if out_kind == "bf16" else 1e-4)
    s_got = cp.asnumpy(osum)
    np.testing.assert_array_equal(s_got[:, :K], total)
    assert np.isnan(s_got[:, K:]).all()
    if out_kind == "f32":
        got = cp.asnumpy(onorm)
        np.testing.assert_allclose(got[:, :K], normed, rtol=1e-5, atol=1e-6)
        assert np.isnan(got[:, K:]).all()
    elif out_kind == "bf16":
        got = bf16_bits_to_f32(cp.asnumpy(onorm))
        np.testing.assert_allclose(got[:, :K], xh, rtol=8e-3, atol=1e-6)
        assert (cp.asnumpy(onorm)[:, K:] == 0x7FC0).all()
    np.testing.assert_array_equal(cp.asnumpy(xa), a)
    np.testing.assert_array_equal(cp.asnumpy(xb), b)


def test_gemv_group_refuses_bad_input():
    x = cp.zeros((1, 2048), dtype=cp.float32)
    y = cp.zeros((1, 64), dtype=cp.float32)
    w = cp.zeros(64 * 144 * 8, dtype=cp.uint8)
    with pytest.raises(ValueError, match="1 to 4"):
        launch.gemv_group(x, [(w, 64, y)] * 5, "q4_k", 2048)
    with pytest.raises(ValueError, match="one-row kernel"):
        launch.gemv_group(x, [(w, 64, y)], "q8_0", 2048)
    with pytest.raises(ValueError, match="needs"):
        launch.gemv_group(x, [(w[:100], 64, y)], "q4_k", 2048)
    with pytest.raises(ValueError, match="norm b"):
        launch.gemv_group(x, [(w, 64, y)], "q4_k", 2048, norm=(x[:, :100], x[0], 1e-6, x, None))
    with pytest.raises(TypeError, match="with norm"):
        launch.gemv_group(x.astype(cp.uint16), [(w, 64, y)], "q4_k", 2048, norm=(x, x[0], 1e-6, x, None))
