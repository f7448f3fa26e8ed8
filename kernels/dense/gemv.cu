// Few-row products straight from a GGUF weight: the LM head of time-to-first-token (one row:
// the last valid token of the chunk), the decode step's matmuls and other M <= 8 matmuls, which
// are bound by reading W.
//
//   gemv_<a>_<w>(x, ldx, M, w, w_row_bytes, N, K, y, ldy, nvalid, wpr)
//       y[m, n] = sum_k x[r + m, k] * W[n, k]      m < M <= 8, n < N
//       r = nvalid ? max(nvalid[0] - 1, 0) : 0     (nvalid: device int32 [1], the chunk's valid
//       rows, read at run time so a captured graph follows the prompt length; then M must be 1)
//   x: f32 or bf16 rows (leading dimension ldx elements); W: N rows of K elements as GGML
//   blocks (or bf16 / f32 / f16); y: f32 [M, ldy]. K a multiple of 8 (of the block size for
//   quantised W). 256 threads = 8 warps; wpr (1, 2, 4 or 8) warps share one output row n, each
//   taking every wpr-th 256-element stretch of K, so a block works on 8 / wpr rows at a time
//   (the launcher raises wpr for small N, e.g. the [2048 -> 32] DeltaNet gates, so that enough
//   warps read at once). The M rows of x sit in shared memory as f32 (M * K * 4 bytes of dynamic
//   shared memory); the block asks L2 for its first rows while it stages them.
// Each lane dequantises 8 consecutive elements (dq8: dequant8's values by word loads) per step,
// 4 steps unrolled so their loads are in flight together; a warp reads 32 x 8 consecutive
// elements of its row per step: 512 contiguous bytes of bf16, one whole Q4_K/Q6_K block.
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"

template<int W, typename A>
__device__ __forceinline__ void gemv_impl(const A* __restrict__ x, long long ldx, int M,
                                          const unsigned char* __restrict__ w, long long row_bytes,
                                          int N, int K, float* __restrict__ y, long long ldy,
                                          const int* __restrict__ nvalid, int wpr) {
    extern __shared__ float xs[];
    __shared__ float part[8][8];                 // [warp][m]: the row's partial sums (wpr > 1)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rpb = 8 / wpr, sub = warp % wpr;   // rows per block step, this warp's share of K
    const int n0 = blockIdx.x * rpb + warp / wpr;
    if (n0 < N) {                                // the first row's bytes on their way to L2
        const unsigned char* row = w + (long long)n0 * row_bytes;
        for (long long b = (long long)(sub * 32 + lane) * 128; b < row_bytes; b += 32LL * 128 * wpr)
            asm volatile("prefetch.global.L2 [%0];" :: "l"(row + b));
    }
    const long long r0 = nvalid ? (long long)max(nvalid[0] - 1, 0) : 0;
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
        const int m = i / K, k = i - m * K;
        xs[i] = load_f(x + (r0 + m) * ldx + k);
    }
    __syncthreads();
    const int groups = K >> 3;
    // every thread walks the same block steps (the barriers below need all of them)
    for (int base = blockIdx.x * rpb; base < N; base += gridDim.x * rpb) {
        const int n = base + warp / wpr;
        float acc[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
        if (n < N) {
            const unsigned char* row = w + (long long)n * row_bytes;
#pragma unroll 4
            for (int g = sub * 32 + lane; g < groups; g += 32 * wpr) {
                float v[8];
                dq8<W>(row, 8 * g, v);          // dequant8's values, word loads (quant/dq8.cuh)
#pragma unroll
                for (int m = 0; m < 8; ++m) {
                    if (m < M) {
                        const float4 a = *reinterpret_cast<const float4*>(xs + m * K + g * 8);
                        const float4 b = *reinterpret_cast<const float4*>(xs + m * K + g * 8 + 4);
                        acc[m] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w
                                + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
                    }
                }
            }
        }
        if (wpr == 1) {
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                if (m < M) {
                    const float s = warp_sum(acc[m]);
                    if (lane == 0 && n < N) y[(long long)m * ldy + n] = s;
                }
            }
            continue;
        }
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            if (m < M) {
                const float s = warp_sum(acc[m]);
                if (lane == 0) part[warp][m] = s;
            }
        }
        __syncthreads();
        if (sub == 0 && lane < M && n < N) {     // the row's first warp adds its warps' sums in order
            float s = 0.0f;
            for (int i = 0; i < wpr; ++i) s += part[warp + i][lane];
            y[(long long)lane * ldy + n] = s;
        }
        __syncthreads();
    }
}

#define GEMV(WNAME, WTYPE, ATYPE, ANAME)                                                              \
extern "C" __global__ void __launch_bounds__(256)                                                     \
gemv_##ANAME##_##WNAME(const ATYPE* x, long long ldx, int M, const unsigned char* w,                  \
                       long long row_bytes, int N, int K, float* y, long long ldy, const int* nvalid,  \
                       int wpr) {                                                                     \
    gemv_impl<WTYPE, ATYPE>(x, ldx, M, w, row_bytes, N, K, y, ldy, nvalid, wpr);                      \
}
#define GEMV_BOTH(WNAME, WTYPE) GEMV(WNAME, WTYPE, float, f32a) GEMV(WNAME, WTYPE, __nv_bfloat16, bf16a)

GEMV_BOTH(f32, GGML_F32)
GEMV_BOTH(f16, GGML_F16)
GEMV_BOTH(bf16, GGML_BF16)
GEMV_BOTH(q4_0, GGML_Q4_0)
GEMV_BOTH(q4_1, GGML_Q4_1)
GEMV_BOTH(q5_0, GGML_Q5_0)
GEMV_BOTH(q5_1, GGML_Q5_1)
GEMV_BOTH(q8_0, GGML_Q8_0)
GEMV_BOTH(q2_k, GGML_Q2_K)
GEMV_BOTH(q3_k, GGML_Q3_K)
GEMV_BOTH(q4_k, GGML_Q4_K)
GEMV_BOTH(q5_k, GGML_Q5_K)
GEMV_BOTH(q6_k, GGML_Q6_K)
