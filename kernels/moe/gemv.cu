// Routed experts for a few tokens (the decode step): matrix-vector products straight from the
// experts' GGUF rows, reading only the k experts each token picked. The grouped GEMMs
// (grouped_gemm*.cu) cut the same work into 128-row tensor-core tiles, which for one token read
// every tile of the padded layout and leave almost every MMA row empty.
//
//   moe_slot_experts(slots, offsets, E, n_slots, slot_expert)       (one block of 1024 threads)
//       slot_expert[j] = the expert e whose rows of the sorted layout hold slot j, or -1 for a
//       slot the layout does not hold (a padding token's)
//   moe_gemv_gate_up_<a>_<w>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h,
//                            slot_expert, wtab, act)
//       for each slot j < T k (token t = j / k) of expert e = slot_expert[j]:
//       h[j, f] = act(x[t] . Wg_e[f]) * (x[t] . Wu_e[f])            f < F   (act 0 silu, 1 gelu)
//       a slot with e < 0 gets a zero row; slot_expert == nullptr: expert 0 for every slot
//       (the shared expert, E = 1, k = 1).
//   moe_gemv_down_<w>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out,
//                     accumulate, wtab)
//       out[t, d] (+)= sum_j weights[t, j] * (h[t k + j] . Wd_e[d]),  e = slot_expert[t k + j]
//       (slot_expert == nullptr: e = 0 for every slot); slots with e < 0 add nothing.
//       accumulate: add to out (the shared expert after the routed ones), else write it.
//
// Expert e's weights: w_gate + e * e_bytes and up_ptr + e * e_bytes (merged gate_up: up_ptr =
// w_gate + F * row_bytes, e_bytes = 2 F row_bytes), w_down + e * e_bytes; or, with an expert
// table wtab (kernels/moe/table.py; streamed layers), gate at wtab[e], up at wtab[E + e], down
// at wtab[e]. x: f32 or bf16 rows; h: f32 [T k, F]; out: f32 [T, D]. D, F multiples of 8 and
// of the weight type's block. 256 threads = 8 warps, a warp per output row at a time (as
// dense/gemv.cu): grid (ceil(rows / 8), slots) for gate_up, (ceil(D / 8), T) for down; the
// x row (gate_up) or the token's k h rows (down) sit in shared memory as f32.
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

// slot_expert[j] = the expert holding slot j in the sorted layout (ref.route_layout), -1 for a
// slot it does not hold (a padding token's). One block: every sorted row r < offsets[E] looks
// its expert up in the offsets (binary search in shared memory) and writes it at its slot.
extern "C" __global__ void __launch_bounds__(1024)
moe_slot_experts(const int* __restrict__ slots, const int* __restrict__ offsets, int E, int n_slots,
                 int* __restrict__ slot_expert) {
    extern __shared__ int offs[];        // E + 1
    for (int i = threadIdx.x; i <= E; i += blockDim.x) offs[i] = offsets[i];
    for (int j = threadIdx.x; j < n_slots; j += blockDim.x) slot_expert[j] = -1;
    __syncthreads();
    for (int r = threadIdx.x; r < offs[E]; r += blockDim.x) {
        const int j = slots[r];
        if (j < 0 || j >= n_slots) continue;
        int lo = 0, hi = E - 1;              // the last e with offs[e] <= r
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (offs[mid] <= r) lo = mid; else hi = mid - 1;
        }
        slot_expert[j] = lo;
    }
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
                                   const unsigned long long* wtab, int act) {                                   \
    gate_up_impl<WTYPE, ATYPE>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h, slot_expert,      \
                               wtab, act);                                                                     \
}
#define MOE_GEMV_W(WNAME, WTYPE)                                                                               \
MOE_GEMV(WNAME, WTYPE, float, f32a) MOE_GEMV(WNAME, WTYPE, __nv_bfloat16, bf16a)                               \
extern "C" __global__ void __launch_bounds__(256)                                                              \
moe_gemv_down_##WNAME(const float* h, int T, int k, const float* weights, const unsigned char* w_down,         \
                      long long e_bytes, long long row_bytes, int D, int F, const int* slot_expert, float* out,  \
                      int accumulate, const unsigned long long* wtab) {                                         \
    down_impl<WTYPE>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out, accumulate, wtab);  \
}

MOE_GEMV_W(f32, GGML_F32)
MOE_GEMV_W(f16, GGML_F16)
MOE_GEMV_W(bf16, GGML_BF16)
MOE_GEMV_W(q4_0, GGML_Q4_0)
MOE_GEMV_W(q4_1, GGML_Q4_1)
MOE_GEMV_W(q5_0, GGML_Q5_0)
MOE_GEMV_W(q5_1, GGML_Q5_1)
MOE_GEMV_W(q8_0, GGML_Q8_0)
MOE_GEMV_W(q2_k, GGML_Q2_K)
MOE_GEMV_W(q3_k, GGML_Q3_K)
MOE_GEMV_W(q4_k, GGML_Q4_K)
MOE_GEMV_W(q5_k, GGML_Q5_K)
MOE_GEMV_W(q6_k, GGML_Q6_K)
