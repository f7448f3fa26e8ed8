// Token-recurrent gated delta rule: the definition (kernels/deltanet/ref.py gated_delta_rule),
// for head dims the chunked tensor-core kernel does not cover (it takes K, V in {64, 128}), and
// the decode step (T = 1) of every head dim: one token is a matrix-vector update, no chunk to factor.
//   q, k: [T, Hk, K] rows of stride qk_ld (elements); v: [T, Hv, V] rows of stride v_ld;
//   g, beta: [T, Hv]; state: [Hv, K, V] f32, read as the initial state and written back;
//   out: [T, Hv, V]. head_map 0: key head h % Hk ("tile"), 1: h / (Hv / Hk) ("interleave").
// Two kernel families, q, k, v stored as <in> (f32 or bf16) and out as <out>, the state and the
// arithmetic f32:
// gdr_recurrent_<in>_<out> (gdr_recurrent_f32 = f32_f32), any T: one block per (value head, 32
//   value columns); thread j owns state column S[:, j] in shared memory; the tokens are walked in
//   order. Exact f32 arithmetic in the definition's order, no tensor cores: a fallback.
// gdr_step_<in>_<out>, T = 1 only (row 0 of q, k, v; no row strides): the state read once into
//   registers and written once, 256 threads per (value head, 32 value columns); K <= 256,
//   V % 4 == 0, state 16-byte aligned (layout and why: its section below). The launcher
//   (launch.py gated_delta_rule_recurrent) picks it for one token and the loop kernel otherwise.
#include "pdl.cuh"
#include "common.cuh"
#include "deltanet/gates.cuh"

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
                                int Hv, int K, int V, float scale, int head_map) { ggf_pdl_entry();           \
    gdr_recurrent_impl<TI, TO>(q, k, qk_ld, v, v_ld, g, beta, state, out, T, Hk, Hv, K, V, scale, head_map);   \
}
GDR_RECURRENT(gdr_recurrent_f32, float, float)
GDR_RECURRENT(gdr_recurrent_bf16_f32, __nv_bfloat16, float)
GDR_RECURRENT(gdr_recurrent_f32_bf16, float, __nv_bfloat16)
GDR_RECURRENT(gdr_recurrent_bf16_bf16, __nv_bfloat16, __nv_bfloat16)

// ---- one token: gdr_step_<in>_<out> ----------------------------------------------------------
// The decode step (T = 1), the state read once and written once, straight from registers:
//   decay = exp(g), delta_j = beta (v_j - decay (S^T k)_j), S' = decay S + k delta^T,
//   o_j = scale (S'^T q)_j = scale (decay (S^T q)_j + delta_j (k . q)),
// so one pass over S gives both S^T k and S^T q (the sums reassociated against the loop above:
// f32 rounding differences only). Layout, for bandwidth and latency: a block of STEP_THREADS =
// 256 per (value head, 32 value columns); thread t holds the float4 of columns 4 (t % 8) .. +3 in
// rows t / 8 + 32 r (r < ceil(K / 32) <= STEP_ROWS = 8: K <= 256), so each warp load instruction
// reads 4 whole 128-byte rows of the column block and a block issues its 16 KB of state (K = 128)
// as 1024 independent 16-byte loads before any arithmetic; the Qwen3.5 decode shape (Hv 32, K =
// V = 128) is 128 blocks, one wave on the H200's 132 SMs with all 2 MB of state in flight at once.
// (A lane per column with scalar loads would need 4x the load instructions for the same bytes.)
// The 9 partial sums per thread (S^T k, S^T q for its 4 columns, k . q) are reduced over the 4
// row groups of a warp by shuffles, over the 8 warps through 2 KB of shared memory (one barrier).
// Takes K <= 256 and V % 4 == 0 (a float4 never straddles the end of a row) with the state 16-byte
// aligned; a last column block past V idles its spare threads. q, k, v: only row 0 is read, so no
// row strides; the other arguments as gdr_recurrent's.
constexpr int STEP_THREADS = 256, STEP_COLS = 32, STEP_ROWS = 8;

// What the fused step (gdr_step_fused_*) computes itself instead of reading g, beta and
// normalised q, k: llama.cpp's l2 normalisation of q and k (x / sqrt(sum x^2 + eps)) and the
// DeltaNet gates (deltanet/gates.cuh, as dense/elementwise.cu deltanet_gates; both 0 for a
// padding token), from the projections' raw outputs.
struct StepFold {
    float eps_q, eps_k;
    const float* alpha; long long a_sg;
    const float* beta_lin; long long b_sg;
    int group;
    const float* dt_bias;
    const float* ssm_a;
    const int* n_valid;
};

template<typename TI, typename TO, bool FUSED = false>
__device__ __forceinline__ void gdr_step_impl(const TI* __restrict__ q, const TI* __restrict__ k,
                                              const TI* __restrict__ v, const float* __restrict__ g,
                                              const float* __restrict__ beta, float* __restrict__ state,
                                              TO* __restrict__ out, int Hk, int Hv, int K, int V, float scale,
                                              int head_map, const StepFold fold = StepFold{}) {
    constexpr int GROUPS = STEP_COLS / 4, WARPS = STEP_THREADS / 32, ROW_STEP = STEP_THREADS / GROUPS;
    __shared__ float4 part_k[WARPS][GROUPS], part_q[WARPS][GROUPS];
    __shared__ float part_kq[WARPS], part_qq[WARPS], part_kk[WARPS];
    const int h = blockIdx.x;
    const int c4 = threadIdx.x % GROUPS, row0 = threadIdx.x / GROUPS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = blockIdx.y * STEP_COLS + 4 * c4;
    const bool cols = j < V;
    const int kh = head_map == 0 ? h % Hk : h / (Hv / Hk);
    const TI* q_head = q + (long long)kh * K;
    const TI* k_head = k + (long long)kh * K;
    float* st = state + (long long)h * K * V + j;

    // every load first: state rows, q and k at those rows, v, the gates
    float4 s[STEP_ROWS];
    float qi[STEP_ROWS], ki[STEP_ROWS];
#pragma unroll
    for (int r = 0; r < STEP_ROWS; ++r) {
        const int i = row0 + ROW_STEP * r;
        const bool row = i < K;
        s[r] = row && cols ? *reinterpret_cast<const float4*>(st + (long long)i * V) : make_float4(0.f, 0.f, 0.f, 0.f);
        qi[r] = row ? load_f(q_head + i) : 0.f;
        ki[r] = row ? load_f(k_head + i) : 0.f;
    }
    float vj[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) vj[c] = cols ? load_f(v + (long long)h * V + j + c) : 0.f;
    float decay, b;
    if (FUSED) {
        const int c = h / fold.group, jj = h - c * fold.group;
        float gv = 0.0f, bt = 0.0f;
        if (*fold.n_valid > 0)
            gdn_gates(fold.alpha[c * fold.a_sg + jj], fold.dt_bias[h], fold.ssm_a[h], fold.beta_lin[c * fold.b_sg + jj],
                      gv, bt);
        decay = __expf(gv);
        b = bt;
    } else {
        decay = __expf(g[h]);
        b = beta[h];
    }

    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sq = sk;
    float kq = 0.f, qq = 0.f, kk = 0.f;
#pragma unroll
    for (int r = 0; r < STEP_ROWS; ++r) {
        sk.x += s[r].x * ki[r]; sk.y += s[r].y * ki[r]; sk.z += s[r].z * ki[r]; sk.w += s[r].w * ki[r];
        sq.x += s[r].x * qi[r]; sq.y += s[r].y * qi[r]; sq.z += s[r].z * qi[r]; sq.w += s[r].w * qi[r];
        kq += ki[r] * qi[r];
        if (FUSED) { qq += qi[r] * qi[r]; kk += ki[r] * ki[r]; }
    }
    // lanes c4, c4 + 8, c4 + 16, c4 + 24 of a warp hold the same columns in 4 row groups
#pragma unroll
    for (int o = GROUPS; o < 32; o <<= 1) {
        sk.x += __shfl_xor_sync(GGF_FULL_MASK, sk.x, o); sk.y += __shfl_xor_sync(GGF_FULL_MASK, sk.y, o);
        sk.z += __shfl_xor_sync(GGF_FULL_MASK, sk.z, o); sk.w += __shfl_xor_sync(GGF_FULL_MASK, sk.w, o);
        sq.x += __shfl_xor_sync(GGF_FULL_MASK, sq.x, o); sq.y += __shfl_xor_sync(GGF_FULL_MASK, sq.y, o);
        sq.z += __shfl_xor_sync(GGF_FULL_MASK, sq.z, o); sq.w += __shfl_xor_sync(GGF_FULL_MASK, sq.w, o);
        kq += __shfl_xor_sync(GGF_FULL_MASK, kq, o);
        if (FUSED) {
            qq += __shfl_xor_sync(GGF_FULL_MASK, qq, o);
            kk += __shfl_xor_sync(GGF_FULL_MASK, kk, o);
        }
    }
    if (lane < GROUPS) {
        part_k[warp][lane] = sk;
        part_q[warp][lane] = sq;
        if (lane == 0) {
            part_kq[warp] = kq;
            if (FUSED) { part_qq[warp] = qq; part_kk[warp] = kk; }
        }
    }
    __syncthreads();
    sk = part_k[0][c4]; sq = part_q[0][c4]; kq = part_kq[0];
    if (FUSED) { qq = part_qq[0]; kk = part_kk[0]; }
#pragma unroll
    for (int w = 1; w < WARPS; ++w) {
        const float4 a = part_k[w][c4], c = part_q[w][c4];
        sk.x += a.x; sk.y += a.y; sk.z += a.z; sk.w += a.w;
        sq.x += c.x; sq.y += c.y; sq.z += c.z; sq.w += c.w;
        kq += part_kq[w];
        if (FUSED) { qq += part_qq[w]; kk += part_kk[w]; }
    }
    if (FUSED) {        // the sums are linear in q and k: scale them, and k for the update below
        const float iq = 1.0f / sqrtf(qq + fold.eps_q), ik = 1.0f / sqrtf(kk + fold.eps_k);
        sk.x *= ik; sk.y *= ik; sk.z *= ik; sk.w *= ik;
        sq.x *= iq; sq.y *= iq; sq.z *= iq; sq.w *= iq;
        kq *= iq * ik;
#pragma unroll
        for (int r = 0; r < STEP_ROWS; ++r) ki[r] *= ik;
    }
    const float d0 = (vj[0] - decay * sk.x) * b, d1 = (vj[1] - decay * sk.y) * b,
                d2 = (vj[2] - decay * sk.z) * b, d3 = (vj[3] - decay * sk.w) * b;
    if (row0 == 0 && cols) {
        TO* o = out + (long long)h * V + j;
        store_f(o + 0, scale * (decay * sq.x + d0 * kq));
        store_f(o + 1, scale * (decay * sq.y + d1 * kq));
        store_f(o + 2, scale * (decay * sq.z + d2 * kq));
        store_f(o + 3, scale * (decay * sq.w + d3 * kq));
    }
#pragma unroll
    for (int r = 0; r < STEP_ROWS; ++r) {
        const int i = row0 + ROW_STEP * r;
        if (i < K && cols)
            *reinterpret_cast<float4*>(st + (long long)i * V) =
                make_float4(fmaf(ki[r], d0, decay * s[r].x), fmaf(ki[r], d1, decay * s[r].y),
                            fmaf(ki[r], d2, decay * s[r].z), fmaf(ki[r], d3, decay * s[r].w));
    }
}

#define GDR_STEP(NAME, TI, TO)                                                                                \
extern "C" __global__ void __launch_bounds__(STEP_THREADS)                                                    \
NAME(const TI* q, const TI* k, const TI* v, const float* g, const float* beta, float* state, TO* out, int Hk,  \
     int Hv, int K, int V, float scale, int head_map) { ggf_pdl_entry();                                       \
    gdr_step_impl<TI, TO>(q, k, v, g, beta, state, out, Hk, Hv, K, V, scale, head_map);                        \
}
// gdr_step_fused_<out>(q, k, v, state, out, Hk, Hv, K, V, scale, head_map, eps_q, eps_k, alpha,
// a_sg, beta_lin, b_sg, group, dt_bias, ssm_a, n_valid): gdr_step on raw q, k (f32) with the l2
// normalisation and the gates folded in (StepFold; alpha, beta_lin at [c * sg + j] for value
// head h = c * group + j), for the decode step whose plan folds those launches into this one.
#define GDR_STEP_FUSED(NAME, TO)                                                                              \
extern "C" __global__ void __launch_bounds__(STEP_THREADS)                                                    \
NAME(const float* q, const float* k, const float* v, float* state, TO* out, int Hk, int Hv, int K, int V,     \
     float scale, int head_map, float eps_q, float eps_k, const float* alpha, long long a_sg,                 \
     const float* beta_lin, long long b_sg, int group, const float* dt_bias, const float* ssm_a,             \
     const int* n_valid) { ggf_pdl_entry();                                                                   \
    gdr_step_impl<float, TO, true>(q, k, v, nullptr, nullptr, state, out, Hk, Hv, K, V, scale, head_map,      \
                                   StepFold{eps_q, eps_k, alpha, a_sg, beta_lin, b_sg, group, dt_bias, ssm_a, \
                                            n_valid});                                                        \
}
GDR_STEP_FUSED(gdr_step_fused_f32, float)
GDR_STEP_FUSED(gdr_step_fused_bf16, __nv_bfloat16)

GDR_STEP(gdr_step_f32_f32, float, float)
GDR_STEP(gdr_step_bf16_f32, __nv_bfloat16, float)
GDR_STEP(gdr_step_f32_bf16, float, __nv_bfloat16)
GDR_STEP(gdr_step_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
