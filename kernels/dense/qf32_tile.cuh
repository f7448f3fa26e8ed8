// f32-faithful GEMM tile on CUDA cores with the weight read as the GGUF stores it: the core of
// precision="f32" (dense/gemm_qf32.cu, moe/grouped_f32.cu). Every weight element is dequantised
// by dequant8 (bit-exact with gguf.quants / the CPU reference's f32 weights) and every product is
// an f32 FMA, so the result is the f32 GEMM up to summation order. Speed is secondary (a
// verification mode): 64 x 64 output tile per 256-thread block, 4 x 4 per thread, K in steps of 32.
//
//   qf32::tile<W, DUAL>(a_off, A, w0, w1, row_bytes, n0, N, K, acc0, acc1)
//     acc0[i][j] += sum_k A[a_off[r] + k] * W0[n0 + c][k]   (r = 4 ty + i, c = 4 tx + j)
//     acc1 likewise with W1 when DUAL (the SwiGLU gate / up pair)
//   a_off: shared [64] element offsets of the tile's A rows, -1 for a zero row.
//   W rows: row_bytes apart, K elements as GGML blocks (or f32 / f16 / bf16); K % 8 == 0.
#pragma once
#include "common.cuh"
#include "quant/ggml_quants.cuh"

namespace qf32 {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 256;

template<int W, bool DUAL>
__device__ __forceinline__ void tile(const long long* a_off, const float* __restrict__ A,
                                     const unsigned char* __restrict__ w0, const unsigned char* __restrict__ w1,
                                     long long row_bytes, int n0, int N, int K,
                                     float (&acc0)[4][4], float (&acc1)[4][4]) {
    constexpr int QK = QBlock<W>::QK, BY = QBlock<W>::BYTES, UPB = QK / 8;
    __shared__ float As[BK][BM + 4];
    __shared__ float Ws0[BK][BN + 4];
    __shared__ float Ws1[DUAL ? BK : 1][BN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    for (int k0 = 0; k0 < K; k0 += BK) {
        // A: 64 rows x 32 k, 8 per thread (consecutive threads read consecutive k)
        for (int i = tid; i < BM * BK; i += THREADS) {
            const int r = i / BK, c = i % BK, k = k0 + c;
            const long long off = a_off[r];
            As[c][r] = (off >= 0 && k < K) ? A[off + k] : 0.f;
        }
        // W: 64 rows x 4 groups of 8 elements, one group per thread (and per weight)
        {
            const int r = tid / 4, gi = tid % 4, n = n0 + r, k = k0 + gi * 8;
            float v[8], u[8];
            if (n < N && k < K) {
                const long long g = k / 8;
                dequant8<W>(w0 + (long long)n * row_bytes + (g / UPB) * BY, (int)(g % UPB), v);
                if (DUAL) dequant8<W>(w1 + (long long)n * row_bytes + (g / UPB) * BY, (int)(g % UPB), u);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = u[e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                Ws0[gi * 8 + e][r] = v[e];
                if (DUAL) Ws1[gi * 8 + e][r] = u[e];
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[4], c[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = As[kk][ty * 4 + i];
                b[i] = Ws0[kk][tx * 4 + i];
                if (DUAL) c[i] = Ws1[kk][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc0[i][j] = fmaf(a[i], b[j], acc0[i][j]);
                    if (DUAL) acc1[i][j] = fmaf(a[i], c[j], acc1[i][j]);
                }
        }
        __syncthreads();
    }
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
#ifndef GLU_ACT
#define GLU_ACT 0   // the GLU's gate: 0 SiLU (SwiGLU), 1 GELU-tanh (Gemma 4; the launchers build a module with -DGLU_ACT=1)
#endif
__device__ __forceinline__ float glu_gate(float x) {
#if GLU_ACT == 1
    return gelu_tanh(x);     // common.cuh
#else
    return silu(x);
#endif
}

}  // namespace qf32

// Instantiate MACRO(name, GGML type) for every weight type the kernels take.
#define QF32_ALL_TYPES(MACRO)                                                                       \
MACRO(f32, GGML_F32) MACRO(f16, GGML_F16) MACRO(bf16, GGML_BF16) MACRO(q4_0, GGML_Q4_0)             \
MACRO(q4_1, GGML_Q4_1) MACRO(q5_0, GGML_Q5_0) MACRO(q5_1, GGML_Q5_1) MACRO(q8_0, GGML_Q8_0)         \
MACRO(q2_k, GGML_Q2_K) MACRO(q3_k, GGML_Q3_K) MACRO(q4_k, GGML_Q4_K) MACRO(q5_k, GGML_Q5_K)         \
MACRO(q6_k, GGML_Q6_K)
