"""The tensor-core MoE router GEMM (kernels/dense/router_gemm.cu) against float64 and against the
CUDA-core f32 GEMM (gemm_f32) on the same data, eagerly and inside a captured CUDA graph.

Reference (numpy): logits = x.astype(float64) @ w.astype(float64).T. The kernel splits each f32
operand x = hi + lo (hi = round16(x), lo = round16(x - hi)) and sums hi*hi + hi*lo + lo*hi in
f32; split_model() below is that computation in numpy (no tensor-core rounding), which the
f16 split must match to ~2^-22 and the bf16 split to ~2^-17.

Criteria: the default f16 split is within 2x of gemm_f32's error vs float64 (relative RMS and
max-abs; in practice it is ~4x smaller), its max-abs error is < 1e-4 for logits of magnitude
~1-10, and on near-tied expert pairs it orders no more pairs wrongly than gemm_f32 (+ slack).
The bf16 split ("bf16x3") is only held to max-abs < 1e-4 / rel RMS < 2e-5 and its ratio to
gemm_f32 is printed (run pytest -s to see every measured error).

Outputs are poisoned (NaN) and are row-strided views of wider buffers, whose extra columns must
stay NaN; A is a row-strided view too (aligned and unaligned row strides).
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors, require_gpu  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.dense import launch  # noqa: E402
from ggfuse.kernels.dequant.ref import round_bf16  # noqa: E402

F32 = np.float32
PAD = 5  # extra columns of the c buffer (and extra A columns): never written / read


def split_model(x, w, split: str, w_scale: float = launch.ROUTER_W_SCALE):
    """numpy model of the kernel's arithmetic (exact sums): the split-operand product."""
    r16 = (lambda v: v.astype(np.float16).astype(np.float64)) if split == "f16" else \
          (lambda v: round_bf16(v.astype(F32)).astype(np.float64))
    s = w_scale if split == "f16" else 1.0
    x64, w64 = x.astype(np.float64), w.astype(np.float64) * s
    xh, wh = r16(x64), r16(w64)
    xl, wl = r16(x64 - xh), r16(w64 - wh)
    return (xh @ wh.T + xh @ wl.T + xl @ wh.T) / s


def make_inputs(rng, M, N, K, *, logit_std=3.0, ties=True):
    """x like a normed hidden state (rms 1, per-channel gain 0.5-2), w scaled so that logits have
    std ~logit_std; with ties, odd rows of w are the even ones plus a tiny perturbation whose
    size runs log-uniformly over 1e-8..1e-3 (relative), so that pairs of experts are near-tied
    for every token."""
    x = rng.standard_normal((M, K)) * rng.uniform(0.5, 2.0, K)
    x /= np.sqrt((x ** 2).mean(axis=1, keepdims=True))
    w = rng.standard_normal((N, K)) * (logit_std / np.sqrt(K) / 1.2)
    if ties:
        eps = 10.0 ** rng.uniform(-8, -3, N // 2)
        w[1:2 * (N // 2):2] = w[0:2 * (N // 2):2] * (1 + eps[:, None] * rng.standard_normal((N // 2, K)))
    return x.astype(F32), w.astype(F32)


def device_views(x, w, *, unaligned=False):
    """x as a row-strided view (lda = K + PAD, or K + 3 for unaligned rows), w contiguous, and a
    NaN-poisoned c view [M, N] of an [M, N + PAD] buffer."""
    M, K = x.shape
    N = w.shape[0]
    extra = 3 if unaligned else PAD + 3          # K + 8: 16-byte aligned rows
    big = np.zeros((M, K + extra), F32)
    big[:, :K] = x
    xd = cp.asarray(big)[:, :K]
    cbuf = cp.full((M, N + PAD), np.nan, dtype=cp.float32)
    return xd, cp.asarray(w), cbuf, cbuf[:, :N]


def check_out(cbuf, N, ref, what, *, rms_max, abs_max):
    got = cp.asnumpy(cbuf)
    assert np.isnan(got[:, N:]).all(), f"{what}: wrote past column {N}"
    got = got[:, :N]
    assert np.isfinite(got).all(), f"{what}: {int((~np.isfinite(got)).sum())} non-finite (unwritten?) logits"
    rms, _ = errors(got, ref)
    mx = float(np.abs(got - ref).max())
    assert rms < rms_max and mx < abs_max, f"{what}: rel RMS {rms:.3g} (< {rms_max:.3g}), max-abs {mx:.3g} (< {abs_max:.3g})"
    return got, rms, mx


def f32_errors(xd, wd, M, N, ref):
    c = cp.full((M, N), np.nan, dtype=cp.float32)
    launch.gemm_f32(xd, wd, c)
    got = cp.asnumpy(c)
    rms, _ = errors(got, ref)
    return got, rms, float(np.abs(got - ref).max())


def tie_flips(got, ref, min_gap=0.0):
    """How many (token, near-tied pair) orderings differ from float64's, over pairs (2i, 2i+1)
    whose float64 gap exceeds min_gap."""
    n = (got.shape[1] // 2) * 2
    d_got = got[:, 1:n:2].astype(np.float64) - got[:, 0:n:2]
    d_ref = ref[:, 1:n:2] - ref[:, 0:n:2]
    sel = np.abs(d_ref) > min_gap
    return int(((np.sign(d_got) != np.sign(d_ref)) & sel).sum())


SHAPES = [  # (M, N, K)
    pytest.param(1, 256, 2048, id="T1-E256"),
    pytest.param(77, 256, 2048, id="T77-E256"),
    pytest.param(300, 512, 2048, id="T300-E512"),
    pytest.param(129, 64, 2048, id="T129-E64"),
    pytest.param(200, 128, 2048, id="T200-E128"),
    pytest.param(70, 72, 96, id="T70-N72-tail"),
    pytest.param(130, 200, 1024, id="T130-N200-tail"),
    pytest.param(2048, 256, 2048, id="T2048-E256"),
]


TILES = ["128x64", "64x64k2"]   # fresh-fragment accumulation: held to the f32 criterion


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_router_gemm_f16_vs_f32(M, N, K, tile):
    rng = np.random.default_rng(M * 7 + N + K)
    x, w = make_inputs(rng, M, N, K)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    xd, wd, cbuf, c = device_views(x, w)
    f32_got, f32_rms, f32_max = f32_errors(xd, wd, M, N, ref)
    launch.router_gemm(xd, wd, c, tile=tile)
    got, rms, mx = check_out(cbuf, N, ref, f"f16 {tile}", rms_max=max(2 * f32_rms, 1e-7), abs_max=max(2 * f32_max, 1e-6))
    assert mx < 1e-4
    # the numpy model of the split arithmetic agrees to f32 accumulation accuracy
    model = split_model(x, w, "f16")
    assert np.abs(got - model).max() < 2 * f32_max + 1e-6
    flips, f32_flips = tie_flips(got, ref), tie_flips(f32_got, ref)
    print(f"\n[{M}x{N}x{K} {tile} f16] rel RMS {rms:.3g} (gemm_f32 {f32_rms:.3g}), max-abs {mx:.3g} "
          f"(gemm_f32 {f32_max:.3g}), max|logit| {np.abs(ref).max():.3g}; tie flips {flips} (gemm_f32 {f32_flips})")
    assert flips <= f32_flips + max(2, f32_flips // 2)
    assert tie_flips(got, ref, min_gap=1e-4) == 0


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("M,N,K", [pytest.param(77, 256, 2048, id="T77-E256"),
                                   pytest.param(70, 72, 96, id="T70-N72-tail"),
                                   pytest.param(2048, 256, 2048, id="T2048-E256")])
def test_router_gemm_bf16x3(M, N, K, tile):
    rng = np.random.default_rng(M + N + K + 1)
    x, w = make_inputs(rng, M, N, K)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    xd, wd, cbuf, c = device_views(x, w)
    _, f32_rms, f32_max = f32_errors(xd, wd, M, N, ref)
    launch.router_gemm(xd, wd, c, split="bf16", tile=tile)
    got, rms, mx = check_out(cbuf, N, ref, f"bf16 {tile}", rms_max=2e-5, abs_max=1e-4)
    model = split_model(x, w, "bf16")
    assert np.abs(got - model).max() < 2 * f32_max + 1e-6
    print(f"\n[{M}x{N}x{K} {tile} bf16x3] rel RMS {rms:.3g} = {rms / f32_rms:.2f}x gemm_f32, "
          f"max-abs {mx:.3g} = {mx / f32_max:.2f}x gemm_f32")


def test_router_gemm_auto_tile_T8192():
    """The prefill shape the kernel is for; the tile picked by shape (128x64 on an H100)."""
    M, N, K = 8192, 256, 2048
    rng = np.random.default_rng(8192)
    x, w = make_inputs(rng, M, N, K)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    xd, wd, cbuf, c = device_views(x, w)
    _, f32_rms, f32_max = f32_errors(xd, wd, M, N, ref)
    launch.router_gemm(xd, wd, c)
    _, rms, mx = check_out(cbuf, N, ref, "f16 auto", rms_max=2 * f32_rms, abs_max=min(2 * f32_max, 1e-4))
    print(f"\n[T8192 auto={launch.router_tile(M, N)}] rel RMS {rms:.3g} (gemm_f32 {f32_rms:.3g}), "
          f"max-abs {mx:.3g} (gemm_f32 {f32_max:.3g})")


@pytest.mark.parametrize("tile", TILES)
def test_router_gemm_unaligned_rows_and_wide_range(tile):
    """A rows at a 4-byte-aligned stride (the scalar-load path) and activations spanning 1e-4..3e3
    in magnitude (the f16 halves' range: subnormal lo parts for the small ones)."""
    M, N, K = 100, 256, 2048
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((M, K)) * np.exp(rng.uniform(-7, 6, (M, K)))).astype(F32)
    w = (rng.standard_normal((N, K)) * 0.02).astype(F32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    xd, wd, cbuf, c = device_views(x, w, unaligned=True)
    _, f32_rms, f32_max = f32_errors(xd, wd, M, N, ref)
    launch.router_gemm(xd, wd, c, tile=tile)
    _, rms, mx = check_out(cbuf, N, ref, f"f16 {tile} wide", rms_max=2 * f32_rms, abs_max=2 * f32_max)
    print(f"\n[wide-range {tile}] rel RMS {rms:.3g} (gemm_f32 {f32_rms:.3g}), max-abs {mx:.3g} (gemm_f32 {f32_max:.3g})")


@pytest.mark.parametrize("split", ["f16", "bf16"])
def test_router_gemm_in_cuda_graph(split):
    M, N, K = 333, 256, 2048
    rng = np.random.default_rng(11)
    x, w = make_inputs(rng, M, N, K)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    xd, wd, cbuf, c = device_views(x, w)
    launch.router_gemm(xd, wd, c, split=split)    # load the module outside the capture
    cp.cuda.Device().synchronize()
    cbuf.fill(np.nan)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    launch.router_gemm(xd, wd, c, split=split, stream=s)
    g = s.end_capture()
    g.launch(s)
    s.synchronize()
    check_out(cbuf, N, ref, f"{split} graph", rms_max=2e-5, abs_max=1e-4)
    # the replay reads the inputs at replay time
    x2, _ = make_inputs(np.random.default_rng(12), M, N, K, ties=False)
    xd[...] = cp.asarray(x2)
    cbuf.fill(np.nan)
    cp.cuda.Device().synchronize()   # the copy and fill run on the default stream, the replay on s
    g.launch(s)
    s.synchronize()
    check_out(cbuf, N, x2.astype(np.float64) @ w.astype(np.float64).T, f"{split} graph replay", rms_max=2e-5, abs_max=1e-4)


def test_router_gemm_rejects_bad_operands():
    x = cp.zeros((4, 48), cp.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        launch.router_gemm(x, cp.zeros((8, 48), cp.float32), cp.zeros((4, 8), cp.float32))
    with pytest.raises(ValueError, match="power of two"):
        launch.router_gemm(x[:, :32], cp.zeros((8, 32), cp.float32), cp.zeros((4, 8), cp.float32), w_scale=3.0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        launch.router_gemm(x[:, :32], cp.zeros(8 * 32 + 1, cp.float32)[1:].reshape(8, 32), cp.zeros((4, 8), cp.float32))
