// GQA attention on CUDA cores, one warp per (query row, head): Gemma 4's sliding-window layers
// over their ring of earlier keys, and causal attention over the KV cache at head dims the
// tensor-core kernel (flash_attn.cu) does not have (32, 512). Reference semantics:
// kernels/attention/ref.py attention_window (R > 0) and attention_cache (R == 0).
//
//   q      [T, Hq, D]  f32 or bf16 view (q_st, q_sh elements; unit stride along D)
//   out    [T, Hq, D]  f32 or bf16, contiguous
//   R > 0  (ATTENTION_WINDOW):
//          k_ring, v_ring [R, Hkv, D] bf16 contiguous: the key (value) at position p < P sits at
//                         row p % R (the last R positions before the chunk are there)
//          k, v           [T, Hkv, D] f32 views (k_st, k_sh, v_st, v_sh): the chunk's own keys
//                         and values, at positions P .. P+T-1
//   R == 0 (ATTENTION):   k_ring, v_ring are the caches [max_ctx, Hkv, D] bf16, position p at
//                         row p, the chunk's rows already appended (k, v unused)
//   *past = P, *n_valid = valid rows of the chunk (device scalars: they change between replays).
//
// Query t (position P + t) sees the keys at p0 <= P + t with P + t - p0 < window (window 0:
// every earlier key); query head h reads KV head h / (Hq / Hkv). The key loop starts at the
// window's first key, so keys outside it are never read; a window of W over a ring R >= W - 1
// reads at most W - 1 ring rows and the chunk rows up to the query (window_keys.cuh: the runs
// of rows). Rows t >= n_valid get zeros.
//
// Lane l of the warp holds dims d = i * 32 + l (i < D / 32) of q and of the output accumulator,
// so every key row is read with coalesced 32-element loads; scores use an online softmax in
// log2 units (exp2 of score * scale * log2 e). Blocks of 4 warps: 4 consecutive queries of a head.
#include "pdl.cuh"
#include "common.cuh"
#include "attention/window_keys.cuh"

namespace wa {

constexpr int WARPS = 4;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Fold n consecutive key rows (k row j at kr + j * kstep, v row at vr + j * vstep) into the
// running softmax state (m, l, acc).
template <int DPL, typename KT>
__device__ __forceinline__ void attend(const KT* __restrict__ kr, const KT* __restrict__ vr, long long kstep,
                                       long long vstep, int n, const float (&qv)[DPL], float& m, float& l,
                                       float (&acc)[DPL], int lane) {
    for (int j = 0; j < n; ++j) {
        const KT* kj = kr + j * kstep;
        const KT* vj = vr + j * vstep;
        float vv[DPL];
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            dot = fmaf(qv[i], tof(kj[i * 32 + lane]), dot);
            vv[i] = tof(vj[i * 32 + lane]);
        }
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float corr = exp2f(m - m_new);      // m = -inf at the first key: corr = 0
        const float p = exp2f(dot - m_new);
        l = fmaf(l, corr, p);
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] = fmaf(acc[i], corr, p * vv[i]);
        m = m_new;
    }
}

template <int D, typename QT, typename OT>
__device__ __forceinline__ void window_attn(
        const QT* __restrict__ q, long long q_st, long long q_sh,
        const float* __restrict__ k, long long k_st, long long k_sh,
        const float* __restrict__ v, long long v_st, long long v_sh,
        const __nv_bfloat16* __restrict__ k_ring, const __nv_bfloat16* __restrict__ v_ring,
        OT* __restrict__ out, int T, int Hq, int Hkv, int R, int window, float scale,
        const int* __restrict__ past_dev, const int* __restrict__ n_valid_dev) {
    static_assert(D % 32 == 0 && D <= 512, "head dim must be a multiple of 32, at most 512");
    constexpr int DPL = D / 32;
    const int lane = threadIdx.x & 31;
    const long long wid = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    if (wid >= static_cast<long long>(T) * Hq) return;            // warp-uniform
    // consecutive warps take consecutive queries of one head: a block's 4 queries read nearly
    // the same keys (the window slides by one row), so they share them through L1
    const int h = static_cast<int>(wid / T), t = static_cast<int>(wid % T);
    const int hk = h / (Hq / Hkv);
    const int P = *past_dev;
    const int nv = min(max(*n_valid_dev, 0), T);
    OT* o = out + (static_cast<long long>(t) * Hq + h) * D;
    if (t >= nv) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) put(o + i * 32 + lane, 0.f);
        return;
    }
    const float sl2 = scale * LOG2E;
    float qv[DPL], acc[DPL];
    const QT* qr = q + t * q_st + h * q_sh;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        qv[i] = tof(qr[i * 32 + lane]) * sl2;
        acc[i] = 0.f;
    }
    float m = __int_as_float(0xff800000), l = 0.f;
    const long long rs = static_cast<long long>(Hkv) * D;         // ring / cache row stride
    const __nv_bfloat16* kb = k_ring + static_cast<long long>(hk) * D;
    const __nv_bfloat16* vb = v_ring + static_cast<long long>(hk) * D;
    wk::Run runs[3];
    wk::key_runs(P, t, R, window, runs);                           // the window's keys only
#pragma unroll
    for (int i = 0; i < 3; ++i) {        // unrolled: the runs stay in registers
        const wk::Run r = runs[i];
        if (r.src == wk::kRing)
            attend<DPL>(kb + r.row * rs, vb + r.row * rs, rs, rs, r.n, qv, m, l, acc, lane);
        else
            attend<DPL>(k + r.row * k_st + static_cast<long long>(hk) * k_sh,
                        v + r.row * v_st + static_cast<long long>(hk) * v_sh, k_st, v_st, r.n, qv, m, l, acc, lane);
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) put(o + i * 32 + lane, acc[i] * inv);
}

}  // namespace wa

#define WA_KERNEL(D, QT, qname, OT, oname)                                                            \
    extern "C" __global__ void __launch_bounds__(wa::WARPS * 32) window_attn_d##D##_q##qname##_o##oname( \
            const QT* q, long long q_st, long long q_sh, const float* k, long long k_st, long long k_sh, \
            const float* v, long long v_st, long long v_sh, const __nv_bfloat16* k_ring,             \
            const __nv_bfloat16* v_ring, OT* out, int T, int Hq, int Hkv, int R, int window,         \
            float scale, const int* past_dev, const int* n_valid_dev) { ggf_pdl_entry();             \
        wa::window_attn<D, QT, OT>(q, q_st, q_sh, k, k_st, k_sh, v, v_st, v_sh, k_ring, v_ring, out, T, \
                                   Hq, Hkv, R, window, scale, past_dev, n_valid_dev);                 \
    }
#define WA_KERNELS(D)                                                                                 \
    WA_KERNEL(D, float, f32, float, f32) WA_KERNEL(D, float, f32, __nv_bfloat16, bf16)                \
    WA_KERNEL(D, __nv_bfloat16, bf16, float, f32) WA_KERNEL(D, __nv_bfloat16, bf16, __nv_bfloat16, bf16)

// Names: window_attn_d<D>_q<q dtype>_o<out dtype>.
WA_KERNELS(32)
WA_KERNELS(64)
WA_KERNELS(128)
WA_KERNELS(256)
WA_KERNELS(512)
