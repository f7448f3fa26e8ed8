// Few-row products straight from a GGUF weight: the LM head of time-to-first-token (one row:
// the last valid token of the chunk) and other M <= 8 matmuls, which are bound by reading W.
//
//   gemv_<a>_<w>(x, ldx, M, w, w_row_bytes, N, K, y, ldy, nvalid)
//       y[m, n] = sum_k x[r + m, k] * W[n, k]      m < M <= 8, n < N
//       r = nvalid ? max(nvalid[0] - 1, 0) : 0     (nvalid: device int32 [1], the chunk's valid
//       rows, read at run time so a captured graph follows the prompt length; then M must be 1)
//   x: f32 or bf16 rows (leading dimension ldx elements); W: N rows of K elements as GGML
//   blocks (or bf16 / f32 / f16); y: f32 [M, ldy]. K a multiple of 8 (of the block size for
//   quantised W). 256 threads = 8 warps, one output row n per warp at a time; the M rows of x
//   sit in shared memory as f32 (M * K * 4 bytes of dynamic shared memory).
// Each lane dequantises 8 consecutive elements (dq8: dequant8's values by word loads) per step,
// so a warp reads 32 x 8 consecutive elements of its row: 512 contiguous bytes of bf16, one
// whole Q4_K/Q6_K block.
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"

template<int W, typename A>
__device__ __forceinline__ void gemv_impl(const A* __restrict__ x, long long ldx, int M,
                                          const unsigned char* __restrict__ w, long long row_bytes,
                                          int N, int K, float* __restrict__ y, long long ldy,
                                          const int* __restrict__ nvalid) {
    extern __shared__ float xs[];
    const long long r0 = nvalid ? (long long)max(nvalid[0] - 1, 0) : 0;
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
        const int m = i / K, k = i - m * K;
        xs[i] = load_f(x + (r0 + m) * ldx + k);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int groups = K >> 3;
    for (int n = blockIdx.x * nwarps + warp; n < N; n += gridDim.x * nwarps) {
        const unsigned char* row = w + (long long)n * row_bytes;
        float acc[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
        for (int g = lane; g < groups; g += 32) {
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
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            if (m < M) {
                const float s = warp_sum(acc[m]);
                if (lane == 0) y[(long long)m * ldy + n] = s;
            }
        }
    }
}

#define GEMV(WNAME, WTYPE, ATYPE, ANAME)                                                              \
extern "C" __global__ void __launch_bounds__(256)                                                     \
gemv_##ANAME##_##WNAME(const ATYPE* x, long long ldx, int M, const unsigned char* w,                  \
                       long long row_bytes, int N, int K, float* y, long long ldy, const int* nvalid) { \
    gemv_impl<WTYPE, ATYPE>(x, ldx, M, w, row_bytes, N, K, y, ldy, nvalid);                           \
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
