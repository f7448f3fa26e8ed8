// The one-token (decode) step's attention over the KV cache, split along the keys
// (flash-decoding): the prefill kernel runs one block per query head over every key in turn, so a
// decode step at a few thousand positions is a handful of blocks walking the cache one tile after
// another. Here the keys 0..P (the step's own row P appended) are cut into up to `n_split`
// ranges of at least MIN_KEYS keys; block (split, kv head) folds its range for the G = Hq / Hkv
// query heads that read that kv head (a warp each, so the group shares every key row through L1)
// into a partial softmax state, and a second launch combines the ranges. Reference semantics:
// kernels/attention/ref.py attention_cache with T = 1.
//
//   decode_attn_split_d<D>_q<q>:   grid (n_split, Hkv), block G * 32 threads (G <= 16)
//     q       [1, Hq, D]  f32 or bf16 view (unit stride along D; q_sh elements between heads)
//     k_cache, v_cache [max_ctx, Hkv, D] bf16 contiguous, rows 0..P live
//     part_acc [Hq, n_split, D] f32: the range's sum of exp2(s - m) * v (not divided by l)
//     part_ml  [Hq, n_split, 2] f32: the range's (m, l), log2 units; (-inf, 0) for an empty range
//   decode_attn_combine_d<D>_o<o>: grid Hq, block D threads (D <= 512)
//     out     [1, Hq, D] f32 or bf16: sum over ranges of part_acc * exp2(m - M) / sum of l * exp2(m - M)
//   *past = P, *n_valid: 0 gives zeros (a padded step); the grid depends on n_split and Hq only,
//   so a captured graph stays valid as P grows.
//
// Lane l of a warp holds the D / 32 consecutive dims [l * D / 32, (l + 1) * D / 32) of q, of each
// key and value row it reads (one 16-byte load per lane and row at D = 256) and of its output
// accumulator. Keys go four at a time (two at D = 512): their key and value rows' loads in flight
// per warp before the first dot.
#include "pdl.cuh"
#include "common.cuh"

namespace da {

constexpr float LOG2E = 1.4426950408889634f;
constexpr int MIN_KEYS = 32;     // keys per range at least (launch.py DECODE_MIN_KEYS)

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Keys per range of n keys over n_split ranges (the ranges past ceil(n / per) are empty).
__device__ __forceinline__ int range_keys(int n, int n_split) { return max((n + n_split - 1) / n_split, MIN_KEYS); }

// The keys of range `s` of n_split over n keys: [*lo, *hi) (empty when lo >= hi).
__device__ __forceinline__ void key_range(int n, int n_split, int s, int* lo, int* hi) {
    const int per = range_keys(n, n_split);
    *lo = s * per;
    *hi = min(n, *lo + per);
}

// DPL consecutive bf16 values at p, as floats (16-byte loads where DPL is a multiple of 8).
template <int DPL>
__device__ __forceinline__ void load_row(const __nv_bfloat16* __restrict__ p, float (&x)[DPL]) {
    if constexpr (DPL % 8 == 0) {
#pragma unroll
        for (int c = 0; c < DPL / 8; ++c) {
            const uint4 u = *reinterpret_cast<const uint4*>(p + c * 8);
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __bfloat1622float2(h[j]);
                x[c * 8 + 2 * j] = f.x;
                x[c * 8 + 2 * j + 1] = f.y;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i) x[i] = __bfloat162float(p[i]);
    }
}

template <int D, typename QT>
__device__ __forceinline__ void split(const QT* __restrict__ q, long long q_sh,
                                      const __nv_bfloat16* __restrict__ k_cache,
                                      const __nv_bfloat16* __restrict__ v_cache,
                                      float* __restrict__ part_acc, float* __restrict__ part_ml,
                                      int Hq, int Hkv, float scale, const int* __restrict__ past_dev,
                                      const int* __restrict__ n_valid_dev) {
    static_assert(D % 32 == 0 && D <= 512, "head dim must be a multiple of 32, at most 512");
    constexpr int DPL = D / 32;
    constexpr int GROUP = DPL >= 16 ? 2 : 4;      // keys folded per step (registers: 2 x GROUP rows)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int G = Hq / Hkv;
    const int s = blockIdx.x, n_split = gridDim.x, hk = blockIdx.y;
    const int h = hk * G + warp;
    if (warp >= G) return;
    const int nv = *n_valid_dev;
    const int n = nv > 0 ? *past_dev + 1 : 0;       // keys 0..P, the step's own row included
    int lo, hi;
    key_range(n, n_split, s, &lo, &hi);
    float acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] = 0.f;
    float m = __int_as_float(0xff800000), l = 0.f;
    if (lo < hi) {
        const float sl2 = scale * LOG2E;
        float qv[DPL];
        const QT* qr = q + h * q_sh + lane * DPL;
#pragma unroll
        for (int i = 0; i < DPL; ++i) qv[i] = tof(qr[i]) * sl2;
        const long long rs = static_cast<long long>(Hkv) * D;          // cache row stride
        const __nv_bfloat16* kb = k_cache + static_cast<long long>(hk) * D + lane * DPL;
        const __nv_bfloat16* vb = v_cache + static_cast<long long>(hk) * D + lane * DPL;
        for (int j0 = lo; j0 < hi; j0 += GROUP) {
            float kx[GROUP][DPL], vx[GROUP][DPL], dot[GROUP];
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const int j = min(j0 + g, hi - 1);      // past the range: a row read again, masked below
                load_row<DPL>(kb + j * rs, kx[g]);
                load_row<DPL>(vb + j * rs, vx[g]);
            }
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < DPL; ++i) d = fmaf(qv[i], kx[g][i], d);
                dot[g] = j0 + g < hi ? warp_sum(d) : __int_as_float(0xff800000);
            }
            float m_new = m;
#pragma unroll
            for (int g = 0; g < GROUP; ++g) m_new = fmaxf(m_new, dot[g]);
            const float corr = exp2f(m - m_new);            // m = -inf at the first keys: 0
            l *= corr;
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[i] *= corr;
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const float p = exp2f(dot[g] - m_new);      // a masked key: exp2(-inf) = 0
                l += p;
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[i] = fmaf(p, vx[g][i], acc[i]);
            }
            m = m_new;
        }
    }
    float* pa = part_acc + (static_cast<long long>(h) * n_split + s) * D + lane * DPL;
#pragma unroll
    for (int i = 0; i < DPL; ++i) pa[i] = acc[i];
    if (lane == 0) {
        float* pm = part_ml + (static_cast<long long>(h) * n_split + s) * 2;
        pm[0] = m;
        pm[1] = l;
    }
}

template <int D, typename OT>
__device__ __forceinline__ void combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                        OT* __restrict__ out, int n_split, const int* __restrict__ past_dev,
                                        const int* __restrict__ n_valid_dev) {
    const int h = blockIdx.x, d = threadIdx.x;
    if (d >= D) return;
    const int nv = *n_valid_dev;
    const int n = nv > 0 ? *past_dev + 1 : 0;
    const float* pm = part_ml + static_cast<long long>(h) * n_split * 2;
    // the ranges that hold keys: the first `used` (key_range gives the rest nothing)
    const int per = range_keys(n, n_split);
    const int used = n > 0 ? min(n_split, (n + per - 1) / per) : 0;
    float M = __int_as_float(0xff800000);
    for (int s = 0; s < used; ++s) M = fmaxf(M, pm[2 * s]);
    float L = 0.f, acc = 0.f;
    const float* pa = part_acc + static_cast<long long>(h) * n_split * D + d;
    for (int s = 0; s < used; ++s) {
        const float w = exp2f(pm[2 * s] - M);
        L = fmaf(pm[2 * s + 1], w, L);
        acc = fmaf(pa[static_cast<long long>(s) * D], w, acc);
    }
    put(out + static_cast<long long>(h) * D + d, L > 0.f ? acc / L : 0.f);
}

}  // namespace da

#define DA_SPLIT(D, QT, qname)                                                                         \
    extern "C" __global__ void __launch_bounds__(512) decode_attn_split_d##D##_q##qname(              \
            const QT* q, long long q_sh, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,  \
            float* part_acc, float* part_ml, int Hq, int Hkv, float scale, const int* past_dev,        \
            const int* n_valid_dev) { ggf_pdl_entry();                                                \
        da::split<D, QT>(q, q_sh, k_cache, v_cache, part_acc, part_ml, Hq, Hkv, scale, past_dev,      \
                         n_valid_dev);                                                                \
    }
#define DA_COMBINE(D, OT, oname)                                                                       \
    extern "C" __global__ void __launch_bounds__(512) decode_attn_combine_d##D##_o##oname(            \
            const float* part_acc, const float* part_ml, OT* out, int n_split, const int* past_dev,    \
            const int* n_valid_dev) { ggf_pdl_entry();                                                \
        da::combine<D, OT>(part_acc, part_ml, out, n_split, past_dev, n_valid_dev);                    \
    }
#define DA_KERNELS(D)                                                                                  \
    DA_SPLIT(D, float, f32) DA_SPLIT(D, __nv_bfloat16, bf16)                                          \
    DA_COMBINE(D, float, f32) DA_COMBINE(D, __nv_bfloat16, bf16)

// Names: decode_attn_split_d<D>_q<q dtype>, decode_attn_combine_d<D>_o<out dtype>.
DA_KERNELS(64)
DA_KERNELS(128)
DA_KERNELS(256)
DA_KERNELS(512)
