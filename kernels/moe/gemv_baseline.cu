// The decode experts as they were before moe/gemv.cu's rewrite (commit e30a141), kept only as
// the baseline and the oracle of kernels/moe/bench.py --decode: nothing in the runtime launches
// them. Four launches a layer (routed gate_up and down, shared gate_up and down) where gemv.cu
// has two; x staged in shared memory before the first weight load; a warp per output row; the
// down kernel walks a token's experts one after another.
//
//   moe_gemv_gate_up_<a>_<w>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h,
//                            slot_expert, wtab, act)        grid (ceil(F / 8), T k), 256 threads,
//                                                           D * 4 bytes of dynamic shared memory
//   moe_gemv_down_<w>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out,
//                     accumulate, wtab)                     grid (ceil(D / 8), T), 256 threads,
//                                                           k F * 4 bytes of dynamic shared memory
// (the shared expert: E = 1, k = 1, slot_expert nullptr, weights its gate, accumulate 1).
#include "pdl.cuh"
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"

// dot of one GGML row (K elements) with an f32 vector in shared memory, summed over the warp
template<int W>
__device__ __forceinline__ float row_dot(const unsigned char* __restrict__ row, const float* __restrict__ xs,
                                         int K, int lane) {
    float acc = 0.0f;
#pragma unroll 4
    for (int g = lane; g < (K >> 3); g += 32) {
        float v[8];
        dq8<W>(row, 8 * g, v);          // dequant8's values, word loads (quant/dq8.cuh)
        const float4 a = *reinterpret_cast<const float4*>(xs + g * 8);
        const float4 b = *reinterpret_cast<const float4*>(xs + g * 8 + 4);
        acc += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
    }
    return warp_sum(acc);
}

template<int W, typename A>
__device__ __forceinline__ void gate_up_impl(const A* __restrict__ x, long long ldx, int T, int k, int E,
                                             const unsigned char* __restrict__ w_gate, unsigned long long up_ptr,
                                             long long e_bytes, long long row_bytes, int F, int D,
                                             float* __restrict__ h, const int* __restrict__ slot_expert,
                                             const unsigned long long* __restrict__ wtab, int act) {
    extern __shared__ __align__(16) float xs[];
    const int j = blockIdx.y, t = j / k;
    const int e = slot_expert ? slot_expert[j] : 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int f = blockIdx.x * 8 + warp;
    if (e < 0) {
        if (f < F && lane == 0) h[(long long)j * F + f] = 0.0f;
        return;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) xs[i] = load_f(x + (long long)t * ldx + i);
    __syncthreads();
    if (f >= F) return;
    const unsigned char* wg = wtab ? reinterpret_cast<const unsigned char*>(wtab[e]) : w_gate + e * e_bytes;
    const unsigned char* wu = wtab ? reinterpret_cast<const unsigned char*>(wtab[E + e])
                                   : reinterpret_cast<const unsigned char*>(up_ptr) + e * e_bytes;
    const float g = row_dot<W>(wg + (long long)f * row_bytes, xs, D, lane);
    const float u = row_dot<W>(wu + (long long)f * row_bytes, xs, D, lane);
    if (lane == 0) h[(long long)j * F + f] = glu_gate_by(g, act) * u;
}

template<int W>
__device__ __forceinline__ void down_impl(const float* __restrict__ h, int T, int k, const float* __restrict__ weights,
                                          const unsigned char* __restrict__ w_down, long long e_bytes,
                                          long long row_bytes, int D, int F, const int* __restrict__ slot_expert,
                                          float* __restrict__ out, int accumulate,
                                          const unsigned long long* __restrict__ wtab) {
    extern __shared__ __align__(16) float hs[];          // k rows of F
    const int t = blockIdx.y;
    for (int i = threadIdx.x; i < k * F; i += blockDim.x) hs[i] = h[(long long)t * k * F + i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int d = blockIdx.x * 8 + warp;
    if (d >= D) return;
    float acc = 0.0f;
    for (int jj = 0; jj < k; ++jj) {
        const int e = slot_expert ? slot_expert[t * k + jj] : 0;
        if (e < 0) continue;
        const unsigned char* wd = wtab ? reinterpret_cast<const unsigned char*>(wtab[e]) : w_down + e * e_bytes;
        acc += weights[(long long)t * k + jj] * row_dot<W>(wd + (long long)d * row_bytes, hs + jj * F, F, lane);
    }
    if (lane == 0) {
        float* o = out + (long long)t * D + d;
        *o = accumulate ? *o + acc : acc;
    }
}

#define MOE_GEMV(WNAME, WTYPE, ATYPE, ANAME)                                                                   \
extern "C" __global__ void __launch_bounds__(256)                                                              \
moe_gemv_gate_up_##ANAME##_##WNAME(const ATYPE* x, long long ldx, int T, int k, int E,                        \
                                   const unsigned char* w_gate, unsigned long long up_ptr, long long e_bytes,  \
                                   long long row_bytes, int F, int D, float* h, const int* slot_expert,         \
                                   const unsigned long long* wtab, int act) { ggf_pdl_entry();                  \
    gate_up_impl<WTYPE, ATYPE>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h, slot_expert,      \
                               wtab, act);                                                                     \
}
#define MOE_GEMV_W(WNAME, WTYPE)                                                                               \
MOE_GEMV(WNAME, WTYPE, float, f32a) MOE_GEMV(WNAME, WTYPE, __nv_bfloat16, bf16a)                               \
extern "C" __global__ void __launch_bounds__(256)                                                              \
moe_gemv_down_##WNAME(const float* h, int T, int k, const float* weights, const unsigned char* w_down,         \
                      long long e_bytes, long long row_bytes, int D, int F, const int* slot_expert, float* out,  \
                      int accumulate, const unsigned long long* wtab) { ggf_pdl_entry();                        \
    down_impl<WTYPE>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out, accumulate, wtab);  \
}

MOE_GEMV_W(q8_0, GGML_Q8_0)
MOE_GEMV_W(q4_k, GGML_Q4_K)
MOE_GEMV_W(q6_k, GGML_Q6_K)
