// Token-recurrent gated delta rule: the definition (kernels/deltanet/ref.py gated_delta_rule),
// for head dims the chunked tensor-core kernel does not cover (it takes K, V in {64, 128}).
// One block per (value head, 32 value columns); thread j owns state column S[:, j] in shared
// memory; the tokens are walked in order. Exact f32 arithmetic, no tensor cores: a fallback.
//   q, k: [T, Hk, K] rows of stride qk_ld (elements); v: [T, Hv, V] rows of stride v_ld;
//   g, beta: [T, Hv]; state: [Hv, K, V] f32, read as the initial state and written back;
//   out: [T, Hv, V] f32. head_map 0: key head h % Hk ("tile"), 1: h / (Hv / Hk) ("interleave").
// gdr_recurrent_<in>_<out>: q, k, v stored as <in> (f32 or bf16) and out as <out>, the state and
// the arithmetic f32 (gdr_recurrent_f32 = f32_f32). The decode step (T = 1) of the chunked
// path's bf16 activations runs here: one token is a matrix-vector update, no chunk to factor.
#include "common.cuh"

template<typename TI, typename TO>
__device__ __forceinline__ void gdr_recurrent_impl(const TI* __restrict__ q, const TI* __restrict__ k,
                                             long long qk_ld, const TI* __restrict__ v, long long v_ld,
                                             const float* __restrict__ g, const float* __restrict__ beta,
                                             float* __restrict__ state, TO* __restrict__ out,
                                             int T, int Hk, int Hv, int K, int V, float scale, int head_map) {
    extern __shared__ float smem[];            // S: [K][32], then q_t: [K], k_t: [K]
    const int h = blockIdx.x;
    const int j = blockIdx.y * 32 + threadIdx.x;
    const bool active = j < V;
    const int kh = head_map == 0 ? h % Hk : h / (Hv / Hk);
    float* S = smem;
    float* qs = smem + K * 32;
    float* ks = qs + K;
    float* st = state + (long long)h * K * V;
    for (int i = 0; i < K; ++i) S[i * 32 + threadIdx.x] = active ? st[(long long)i * V + j] : 0.f;
    for (int t = 0; t < T; ++t) {
        __syncthreads();
        for (int i = threadIdx.x; i < K; i += 32) {
            qs[i] = load_f(q + (long long)t * qk_ld + (long long)kh * K + i);
            ks[i] = load_f(k + (long long)t * qk_ld + (long long)kh * K + i);
        }
        __syncthreads();
        const float decay = __expf(g[(long long)t * Hv + h]);
        const float b = beta[(long long)t * Hv + h];
        float kv = 0.f;
        for (int i = 0; i < K; ++i) {
            const float s = S[i * 32 + threadIdx.x] * decay;
            S[i * 32 + threadIdx.x] = s;
            kv += s * ks[i];
        }
        const float vj = active ? load_f(v + (long long)t * v_ld + (long long)h * V + j) : 0.f;
        const float delta = (vj - kv) * b;
        float o = 0.f;
        for (int i = 0; i < K; ++i) {
            const float s = S[i * 32 + threadIdx.x] + ks[i] * delta;
            S[i * 32 + threadIdx.x] = s;
            o += s * qs[i];
        }
        if (active) store_f(out + ((long long)t * Hv + h) * V + j, o * scale);
    }
    if (active)
        for (int i = 0; i < K; ++i) st[(long long)i * V + j] = S[i * 32 + threadIdx.x];
}

#define GDR_RECURRENT(NAME, TI, TO)                                                                           \
extern "C" __global__ void NAME(const TI* q, const TI* k, long long qk_ld, const TI* v, long long v_ld,      \
                                const float* g, const float* beta, float* state, TO* out, int T, int Hk,      \
                                int Hv, int K, int V, float scale, int head_map) {                            \
    gdr_recurrent_impl<TI, TO>(q, k, qk_ld, v, v_ld, g, beta, state, out, T, Hk, Hv, K, V, scale, head_map);   \
}
GDR_RECURRENT(gdr_recurrent_f32, float, float)
GDR_RECURRENT(gdr_recurrent_bf16_f32, __nv_bfloat16, float)
GDR_RECURRENT(gdr_recurrent_f32_bf16, float, __nv_bfloat16)
GDR_RECURRENT(gdr_recurrent_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
