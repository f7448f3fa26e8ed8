// C[M, N] = A[M, K] @ W[N, K]^T in plain f32 (CUDA cores), for the MoE router: llama.cpp keeps
// router weights f32 and multiplies in f32, and random-init routers have near-ties that bf16
// rounding flips. A 64x64 output tile per 256-thread block, 4x4 per thread, K in steps of 16.
// A rows have stride lda, C rows stride ldc (elements); W is contiguous [N, K].
#include "pdl.cuh"
#include "common.cuh"

#define BM 64
#define BN 64
#define BK 16

extern "C" __global__ void __launch_bounds__(256) gemm_f32_nt(
        const float* __restrict__ A, long long lda, const float* __restrict__ W,
        float* __restrict__ C, long long ldc, int M, int N, int K) { ggf_pdl_entry();
    __shared__ float As[BK][BM + 4];
    __shared__ float Ws[BK][BN + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        // 64 rows x 16 k of A and of W: 1024 elements each, 4 per thread
        for (int i = threadIdx.x; i < BM * BK; i += 256) {
            const int r = i / BK, c = i % BK;
            const int m = m0 + r, n = n0 + r, k = k0 + c;
            As[c][r] = (m < M && k < K) ? A[(long long)m * lda + k] : 0.f;
            Ws[c][r] = (n < N && k < K) ? W[(long long)n * K + k] : 0.f;
        }
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], w[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) { a[i] = As[kk][ty * 4 + i]; w[i] = Ws[kk][tx * 4 + i]; }
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
        }
        __syncthreads();
    }
    for_tile4x4(n0, N, [&](int i, int j, int r, int n) {
        if (m0 + r < M) C[(long long)(m0 + r) * ldc + n] = acc[i][j];
    });
}
