"""The cuBLAS bf16 x bf16 path for dense matrices (kernels/gemm/blas.py) against float64 numpy on
the same bf16 operands: strided A, f32 and bf16 outputs, accumulate, and inside a captured CUDA
graph (the reason it calls cuBLAS directly: CuPy's matmul refuses capture). Outputs are poisoned
with NaN first so an unwritten element fails."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors, require_gpu, run_captured  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.gemm import blas  # noqa: E402
from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: E402


@pytest.mark.parametrize("M,N,K,lda_pad", [(77, 300, 256, 0), (1000, 1024, 2048, 64), (1, 257, 512, 8)])
@pytest.mark.parametrize("c_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_cublas_bf16(M, N, K, lda_pad, c_dtype, graph):
    assert blas.usable("bf16", "bf16"), blas.unavailable()
    rng = np.random.default_rng(M * 7 + N + K)
    lda = K + lda_pad
    a_bits = f32_to_bf16_bits(rng.standard_normal((M, lda), dtype=np.float32))
    w_bits = f32_to_bf16_bits(rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K))
    A = bf16_bits_to_f32(a_bits)[:, :K].astype(np.float64)
    W = bf16_bits_to_f32(w_bits).astype(np.float64)
    a, w = cp.asarray(a_bits), cp.asarray(w_bits)
    ldc = N + 3
    c0 = rng.standard_normal((M, ldc), dtype=np.float32)
    for accumulate in (False, True):
        if c_dtype == "f32":
            c = cp.asarray(c0) if accumulate else cp.full((M, ldc), np.nan, dtype=cp.float32)
            base = c0[:, :N].astype(np.float64)
        else:
            cb = f32_to_bf16_bits(c0)
            c = cp.asarray(cb) if accumulate else cp.full((M, ldc), 0xFFFF, dtype=cp.uint16)
            base = bf16_bits_to_f32(cb)[:, :N].astype(np.float64)
        run = lambda s: blas.gemm_bf16(a, lda, w, N, K, c, c_dtype, ldc, M, s, accumulate=accumulate)  # noqa: E731
        if graph:
            s = cp.cuda.Stream(non_blocking=True)
            run_captured(s, run)
        else:
            run(None)
            cp.cuda.Device().synchronize()
        got = cp.asnumpy(c)
        got = (got if c_dtype == "f32" else bf16_bits_to_f32(got)).astype(np.float64)
        ref = A @ W.T + (base if accumulate else 0.0)
        e_rms, e_max = errors(got[:, :N], ref)
        tol = 1e-5 if c_dtype == "f32" else 1e-2
        assert np.isfinite(got[:, :N]).all()
        assert e_rms < tol and e_max < (2e-5 if c_dtype == "f32" else 2e-2), (accumulate, e_rms, e_max)
        # the columns past N are the caller's (ldc > N): untouched
        if c_dtype == "f32" and not accumulate:
            assert np.isnan(got[:, N:]).all()


def test_cublas_only_for_bf16_pairs():
    assert not blas.usable("f32", "bf16") and not blas.usable("bf16", "q4_k")
