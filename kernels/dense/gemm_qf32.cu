// Dense GEMMs of precision="f32" (runtime/cuda/ops.py): f32 activations times a weight read as the
// GGUF stores it, dequantised and multiplied in f32 on CUDA cores (core: dense/qf32_tile.cuh).
//
//   gemm_qf32_<w>(A, lda, W, row_bytes, C, ldc, M, N, K, accumulate)
//       C[m, n] (+)= sum_k A[m, k] W[n, k]                     grid (ceil(N/64), ceil(M/64))
//   gemm_swiglu_qf32_<w>(A, lda, Wg, Wu, row_bytes, C, ldc, M, N, K)
//       C[m, n] = silu(A[m] . Wg[n]) * (A[m] . Wu[n])          grid (ceil(N/64), ceil(M/64))
//       (built with GLU_ACT=1: gelu(A[m] . Wg[n]) * (A[m] . Wu[n]), Gemma 4)
// A: f32 rows of stride lda; C: f32 rows of stride ldc; W: N rows of row_bytes; K % 8 == 0.
#include "pdl.cuh"
#include "dense/qf32_tile.cuh"

template<int W, bool SWIGLU>
__device__ __forceinline__ void gemm_qf32_impl(const float* __restrict__ A, long long lda,
                                               const unsigned char* __restrict__ w0,
                                               const unsigned char* __restrict__ w1, long long row_bytes,
                                               float* __restrict__ C, long long ldc, int M, int N, int K,
                                               int accumulate) {
    __shared__ long long a_off[qf32::BM];
    const int m0 = blockIdx.y * qf32::BM, n0 = blockIdx.x * qf32::BN;
    if (threadIdx.x < qf32::BM) {
        const int m = m0 + threadIdx.x;
        a_off[threadIdx.x] = m < M ? (long long)m * lda : -1;
    }
    __syncthreads();
    float acc0[4][4] = {}, acc1[4][4] = {};
    qf32::tile<W, SWIGLU>(a_off, A, w0, w1, row_bytes, n0, N, K, acc0, acc1);
    for_tile4x4(n0, N, [&](int i, int j, int r, int n) {
        if (m0 + r >= M) return;
        float* c = C + (long long)(m0 + r) * ldc + n;
        if (SWIGLU) *c = qf32::glu_gate(acc0[i][j]) * acc1[i][j];
        else *c = accumulate ? *c + acc0[i][j] : acc0[i][j];
    });
}

#define GEMM_QF32(WNAME, WTYPE)                                                                     \
extern "C" __global__ void __launch_bounds__(qf32::THREADS)                                         \
gemm_qf32_##WNAME(const float* A, long long lda, const unsigned char* w, long long row_bytes,        \
                  float* C, long long ldc, int M, int N, int K, int accumulate) { ggf_pdl_entry();   \
    gemm_qf32_impl<WTYPE, false>(A, lda, w, w, row_bytes, C, ldc, M, N, K, accumulate);             \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__(qf32::THREADS)                                         \
gemm_swiglu_qf32_##WNAME(const float* A, long long lda, const unsigned char* wg,                    \
                         const unsigned char* wu, long long row_bytes, float* C, long long ldc,     \
                         int M, int N, int K) { ggf_pdl_entry();                                    \
    gemm_qf32_impl<WTYPE, true>(A, lda, wg, wu, row_bytes, C, ldc, M, N, K, 0);                     \
}

QF32_ALL_TYPES(GEMM_QF32)
