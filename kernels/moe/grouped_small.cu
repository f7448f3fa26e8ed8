// MoE grouped GEMMs for few rows per expert: prefill chunks where each expert sees a handful of
// the chunk's T k slots (512 tokens, 8 of 256 experts: 16 on average). The tile kernels
// (grouped_gemm*.cu) give every expert 128- or 256-row tiles, so at 16 rows they dequantise
// each weight for an MMA that is 7/8 padding, with one block per SM walking its tiles; here the
// weights are the MMA's M side (mma.sync m16n8k16, weight rows x tokens), the tokens its N side
// in steps of 8, every weight element is dequantised once per 32 tokens of its expert, straight
// from global memory into the MMA's registers, and many small blocks per SM keep enough bytes
// in flight to stream the experts at memory speed. Built for sm_80 and up (sm_89 and sm_90
// alike; the same numerics as the tile kernels: bf16 weights and activations, f32 sums).
//
// Layout: moe_route's (kernels/moe/ref.py route_layout): expert e owns the sorted rows
// [expert_offsets[e], expert_offsets[e + 1]), its slots first (slot = t k + j), then -1 padding.
//
//   moe_small_gate_up_<a>a_<w>(x, ldx, w_gate, up_ptr, e_bytes, row_bytes, F, K, h, ldh,
//                              sorted_slots, expert_offsets, E, k, wtab, act)
//       h[r, f] = act(x[t] . Wg_e[f]) * (x[t] . Wu_e[f]) for every valid sorted row r of expert e
//       (t = sorted_slots[r] / k); padding rows are not written.  grid (F / 64, E), 128 threads:
//       warp w computes f in [64 bx + 16 w, +16) of gate and up (two m16 tiles) for every token.
//   moe_small_down_<w>(h, ldh, w_down, e_bytes, row_bytes, D, F, out, ldo, sorted_slots,
//                      expert_offsets, E, k, route_w, wtab)
//       out[t, d] += route_w[slot] * (h[r] . Wd_e[d]) for every valid sorted row r (f32 atomics:
//       the order of an output's k additions, and so its last bit, may vary between runs).
//       grid (D / 128, E), 128 threads: warp w computes d in [128 bx + 32 w, +32) (two m16 tiles).
// Expert e's weights as in grouped_gemm.cu: w + e * e_bytes (gate_up: up at up_ptr + e * e_bytes),
// or with an expert table wtab (kernels/moe/table.py): gate / down at wtab[e], up at wtab[E + e].
// act: 0 SiLU, 1 GELU-tanh. Shapes (launch.py checks): F % 16 == 0, D % 32 == 0, K (D for
// gate_up, F for down) a multiple of 32 and of the weight type's block; x / h rows 16-byte aligned.
//
// Per warp and 32-element group of K, lane (g = lane / 4, q = lane % 4) dequantises the 8
// consecutive elements [8q, 8q + 8) of its 4 weight rows (g, g + 8 of each m16 tile) and reads the
// same 8 elements of token g of each 8-token tile from shared memory (one 16-byte load). Those
// are the A / B fragments of two k16 MMAs with K permuted inside the group (fragment k 2q, 2q+1,
// 2q+8, 2q+9 <- elements 8q + 0..3, then 8q + 4..7): a dot product does not care in which order
// K is summed as long as both operands use the same one.
#include "pdl.cuh"
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"     // dq8: 8 consecutive elements of a row by word loads

namespace gs {

typedef unsigned char u8;
typedef unsigned int u32;

constexpr int THREADS = 128;
constexpr int KC = 256;                 // K elements per shared-memory chunk of the tokens
constexpr int NT = 4;                   // 8-token MMA tiles per pass: 32 tokens
constexpr int MT = 8 * NT;
// a token's row in shared memory: KC bf16 + 64 bytes, so that the 16-byte loads of one phase
// (tokens g, g + 1, four lanes each) cover the 32 banks once; the integer-valued path reads 8 bytes
// per lane (a phase: tokens g .. g + 3) and pads by 32 bytes
constexpr int XS = KC + 32;
constexpr int XSQ = KC + 16;
constexpr int STEPS = KC / 16;          // k16 steps per chunk (the integer-valued path: one block)

// The valid rows of expert e's segment (slots first, then -1): a block-wide count.
__device__ __forceinline__ int segment_count(const int* __restrict__ sorted_slots, int off0, int off1) {
    int n = 0;
    for (int base = off0; base < off1; base += THREADS) {
        const int r = base + (int)threadIdx.x;
        n += __syncthreads_count(r < off1 && sorted_slots[r] >= 0);
    }
    return n;
}

// One chunk of the tokens' K elements [c, c + kc) into shared memory as bf16, token row i < n_rows
// of the pass from rows[i] of `src` (ld elements; -1: zeros).
template<typename XT, int LDS>
__device__ __forceinline__ void load_chunk(const XT* __restrict__ src, long long ld, const int* rows, int c, int kc,
                                           int n_rows, __nv_bfloat16* xs) {
    const int per = kc >> 3;
    for (int idx = threadIdx.x; idx < n_rows * per; idx += THREADS) {
        const int i = idx / per, j = idx - i * per;
        const int r = rows[i];
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (r >= 0) {
            const XT* p = src + (long long)r * ld + c + 8 * j;
            if constexpr (sizeof(XT) == 2) {
                u = *reinterpret_cast<const uint4*>(p);
            } else {
                const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
                u = make_uint4(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w), pack_bf16x2(b.x, b.y), pack_bf16x2(b.z, b.w));
            }
        }
        *reinterpret_cast<uint4*>(xs + i * LDS + 8 * j) = u;
    }
}

// acc[m][t] (+)= W rows (m16 tile m: rows rr[2m], rr[2m + 1] of this lane) x tokens of tile t,
// over the chunk's K elements [c, c + kc).
template<int W>
__device__ __forceinline__ void chunk_mma(const u8* const* rr, const __nv_bfloat16* xs, int c, int kc, int nt,
                                          int lane, float acc[2][NT][4]) {
    const int g = lane >> 2, q = lane & 3;
#pragma unroll 4
    for (int gi = 0; gi < (kc >> 5); ++gi) {
        const int e0 = c + 32 * gi + 8 * q;
        float w[4][8];
#pragma unroll
        for (int r = 0; r < 4; ++r) dq8<W>(rr[r], e0, w[r]);
        u32 a[2][2][4];       // [m tile][k16 step][fragment register]
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                a[m][s][0] = pack_bf16x2(w[2 * m][4 * s], w[2 * m][4 * s + 1]);
                a[m][s][1] = pack_bf16x2(w[2 * m + 1][4 * s], w[2 * m + 1][4 * s + 1]);
                a[m][s][2] = pack_bf16x2(w[2 * m][4 * s + 2], w[2 * m][4 * s + 3]);
                a[m][s][3] = pack_bf16x2(w[2 * m + 1][4 * s + 2], w[2 * m + 1][4 * s + 3]);
            }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t >= nt) break;       // warp-uniform
            const uint4 xv = *reinterpret_cast<const uint4*>(xs + (8 * t + g) * XS + 32 * gi + 8 * q);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                const u32 b0[2] = {xv.x, xv.y}, b1[2] = {xv.z, xv.w};
                mma_bf16(acc[m][t], a[m][0], b0);
                mma_bf16(acc[m][t], a[m][1], b1);
            }
        }
    }
}


// ---- the integer-valued path (schedule "smallq"; Q4_K and Q6_K) -------------------------------
// Each quant q becomes the bf16 number 128 + q exactly (0x4300 | q: bf16 has 8 significant bits),
// so the MMA sums x (128 + q) over a scale's elements, and the scale is applied once per
// (weight row, token, scale group) instead of once per weight:
//   Q4_K  w = dl q - ml            sum x w = dl sum x (128 + q) - (128 dl + ml) sum x
//   Q6_K  w = dl (q - 32)          sum x w = dl sum x (128 + q) - 160 dl sum x
// with sum x over the same elements from shared memory (ssum, per k16 step and token). The
// weights enter the MMA exact (the dequantising path rounds each to bf16); the activations are
// bf16 in both. A chunk is one 256-element block. Lane layout: in the k16 step st, lane q holds
// elements 16 st + 4q .. + 3 of its rows (fragment k 2q, 2q+1, 2q+8, 2q+9 <- those four), so every
// step lies inside one Q6_K scale (16 elements) or one half of a Q4_K sub-block (32).
template<int W> struct IQ;
template<> struct IQ<GGML_Q4_K> {
    static constexpr int STEPS_PER_SCALE = 2;
    static __device__ __forceinline__ void scale(const u8* __restrict__ b, int sg, float& dl, float& bl) {
        const u32 dm = *reinterpret_cast<const u32*>(b);
        int sc, m;
        ggf::k4_scale_min(b + 4, sg, sc, m);
        dl = __half2float(__ushort_as_half((unsigned short)(dm & 0xffffu))) * (float)sc;
        bl = 128.0f * dl + __half2float(__ushort_as_half((unsigned short)(dm >> 16))) * (float)m;
    }
    // the quants of elements 16 st + 4q .. + 3 in bytes 0..3 of one word
    static __device__ __forceinline__ u32 quads(const u8* __restrict__ b, int st, int q) {
        const int sb = st >> 1;
        const u32 w = *reinterpret_cast<const u32*>(b + 16 + 32 * (sb >> 1) + 16 * (st & 1) + 4 * q);
        return (w >> (4 * (sb & 1))) & 0x0F0F0F0Fu;
    }
};
template<> struct IQ<GGML_Q6_K> {
    static constexpr int STEPS_PER_SCALE = 1;
    static __device__ __forceinline__ void scale(const u8* __restrict__ b, int sg, float& dl, float& bl) {
        dl = __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(b + 208))) *
             (float)(signed char)b[192 + sg];
        bl = 160.0f * dl;
    }
    // 210-byte blocks: 2-byte aligned only
    static __device__ __forceinline__ u32 quads(const u8* __restrict__ b, int st, int q) {
        const int e0 = 16 * st + 4 * q, h = e0 >> 7, r = e0 & 127;
        const unsigned short* pl = reinterpret_cast<const unsigned short*>(b + 64 * h + (r & 63));
        const unsigned short* ph = reinterpret_cast<const unsigned short*>(b + 128 + 32 * h + (r & 31));
        const u32 lo = (u32)pl[0] | ((u32)pl[1] << 16), hi = (u32)ph[0] | ((u32)ph[1] << 16);
        return ((lo >> (4 * (r >> 6))) & 0x0F0F0F0Fu) | (((hi >> (2 * (r >> 5))) & 0x03030303u) << 4);
    }
};

// bytes q0 q1 of v -> bf16 pair (128 + q0, 128 + q1); q2 q3 with sel 0x4342
__device__ __forceinline__ u32 int_pair(u32 v, u32 sel) { return __byte_perm(v, 0x43434343u, sel); }

// ssum[st][i] = the sum of token i's 16 elements of step st (the chunk in xs), i < n_rows
__device__ __forceinline__ void step_sums(const __nv_bfloat16* xs, int n_rows, float* ssum) {
    for (int idx = threadIdx.x; idx < n_rows * STEPS; idx += THREADS) {
        const int st = idx / n_rows, i = idx - st * n_rows;
        const uint4* p = reinterpret_cast<const uint4*>(xs + i * XSQ + 16 * st);
        float v = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 u = p[h];
            const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) v += __uint_as_float(w[j] << 16) + __uint_as_float(w[j] & 0xFFFF0000u);
        }
        ssum[st * MT + i] = v;
    }
}

// acc[m][t] (+)= W rows x tokens of tile t over the chunk's block (elements [c, c + 256)).
template<int W>
__device__ __forceinline__ void chunk_mma_iq(const u8* const* rr, const __nv_bfloat16* xs, const float* ssum, int c,
                                             int nt, int lane, float acc[2][NT][4]) {
    constexpr int SPS = IQ<W>::STEPS_PER_SCALE;
    const int g = lane >> 2, q = lane & 3;
    const u8* blk[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) blk[r] = rr[r] + (long long)(c >> 8) * QBlock<W>::BYTES;
#pragma unroll 2
    for (int sg = 0; sg < STEPS / SPS; ++sg) {
        float dl[4], bl[4];
        u32 a[SPS][2][4];     // [step][m tile][fragment register]
#pragma unroll
        for (int r = 0; r < 4; ++r) IQ<W>::scale(blk[r], sg, dl[r], bl[r]);
#pragma unroll
        for (int s = 0; s < SPS; ++s) {
            u32 v[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) v[r] = IQ<W>::quads(blk[r], sg * SPS + s, q);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                a[s][m][0] = int_pair(v[2 * m], 0x4140);
                a[s][m][1] = int_pair(v[2 * m + 1], 0x4140);
                a[s][m][2] = int_pair(v[2 * m], 0x4342);
                a[s][m][3] = int_pair(v[2 * m + 1], 0x4342);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t >= nt) break;       // warp-uniform
            float tmp[2][4] = {};
            float2 S = make_float2(0.0f, 0.0f);
#pragma unroll
            for (int s = 0; s < SPS; ++s) {
                const int st = sg * SPS + s;
                const uint2 xv = *reinterpret_cast<const uint2*>(xs + (8 * t + g) * XSQ + 16 * st + 4 * q);
#pragma unroll
                const u32 b[2] = {xv.x, xv.y};
#pragma unroll
                for (int m = 0; m < 2; ++m) mma_bf16(tmp[m], a[s][m], b);
                const float2 s2 = *reinterpret_cast<const float2*>(ssum + st * MT + 8 * t + 2 * q);
                S.x += s2.x;
                S.y += s2.y;
            }
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                // C: (row g, tokens 2q, 2q+1), (row g + 8, same tokens)
                acc[m][t][0] += dl[2 * m] * tmp[m][0] - bl[2 * m] * S.x;
                acc[m][t][1] += dl[2 * m] * tmp[m][1] - bl[2 * m] * S.y;
                acc[m][t][2] += dl[2 * m + 1] * tmp[m][2] - bl[2 * m + 1] * S.x;
                acc[m][t][3] += dl[2 * m + 1] * tmp[m][3] - bl[2 * m + 1] * S.y;
            }
        }
    }
}

// The block's passes over its expert's tokens (MT at a time): rows[] and slots[] of each pass in
// shared memory, the tokens' K in chunks of KC, then the epilogue `store(acc, pass base, nt)`.
template<int W, bool IQP, typename XT, typename Store>
__device__ __forceinline__ void expert_passes(const XT* __restrict__ src, long long ld, bool gather,
                                              const int* __restrict__ sorted_slots, int off0, int count, int k,
                                              const u8* const* rr, bool live, int K, Store store) {
    constexpr int LDS = IQP ? XSQ : XS;
    __shared__ __align__(16) __nv_bfloat16 xs[MT * LDS];
    __shared__ __align__(16) float ssum[IQP ? STEPS * MT : 1];
    __shared__ int rows[MT];
    const int lane = threadIdx.x & 31;
    for (int base = 0; base < count; base += MT) {
        const int nt = min(NT, (count - base + 7) >> 3);
        __syncthreads();              // the previous pass is done with rows[] and xs
        if (threadIdx.x < MT) {
            const int i = base + (int)threadIdx.x;
            rows[threadIdx.x] = i < count ? (gather ? sorted_slots[off0 + i] / k : off0 + i) : -1;
        }
        float acc[2][NT][4];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][t][i] = 0.0f;
        for (int c = 0; c < K; c += KC) {
            const int kc = min(KC, K - c);
            __syncthreads();          // rows[] written / xs free
            load_chunk<XT, LDS>(src, ld, rows, c, kc, 8 * nt, xs);   // the pass's 8-token tiles only
            __syncthreads();
            if constexpr (IQP) {
                step_sums(xs, 8 * nt, ssum);
                __syncthreads();
                if (live) chunk_mma_iq<W>(rr, xs, ssum, c, nt, lane, acc);
            } else {
                if (live) chunk_mma<W>(rr, xs, c, kc, nt, lane, acc);
            }
        }
        if (live) store(acc, base, nt);
    }
}

template<int W, bool IQP, typename XT>
__device__ __forceinline__ void gate_up(const XT* __restrict__ x, long long ldx, const u8* __restrict__ w_gate,
                                        unsigned long long up_ptr, long long e_bytes, long long row_bytes, int F,
                                        int K, __nv_bfloat16* __restrict__ h, long long ldh,
                                        const int* __restrict__ sorted_slots, const int* __restrict__ expert_offsets,
                                        int E, int k, const unsigned long long* __restrict__ wtab, int act) {
    const int e = blockIdx.y;
    const int off0 = expert_offsets[e], off1 = expert_offsets[e + 1];
    if (off1 <= off0) return;
    const int count = segment_count(sorted_slots, off0, off1);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int f0 = blockIdx.x * 64 + 16 * warp;
    const bool live = f0 < F;
    const u8* wg = wtab ? reinterpret_cast<const u8*>(wtab[e]) : w_gate + e * e_bytes;
    const u8* wu = wtab ? reinterpret_cast<const u8*>(wtab[E + e]) : reinterpret_cast<const u8*>(up_ptr) + e * e_bytes;
    const int f = live ? f0 + g : 0;
    const u8* rr[4] = {wg + f * row_bytes, wg + (f + 8) * row_bytes, wu + f * row_bytes, wu + (f + 8) * row_bytes};
    expert_passes<W, IQP, XT>(x, ldx, true, sorted_slots, off0, count, k, rr, live, K,
        [&](float (&acc)[2][NT][4], int base, int nt) {
            for (int t = 0; t < nt; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int tok = base + 8 * t + 2 * q + (i & 1);
                    if (tok < count)
                        h[(long long)(off0 + tok) * ldh + f + 8 * (i >> 1)] =
                            __float2bfloat16_rn(glu_gate_by(acc[0][t][i], act) * acc[1][t][i]);
                }
        });
}

template<int W, bool IQP>
__device__ __forceinline__ void down(const __nv_bfloat16* __restrict__ hh, long long ldh, const u8* __restrict__ w_down,
                                     long long e_bytes, long long row_bytes, int D, int F, float* __restrict__ out,
                                     long long ldo, const int* __restrict__ sorted_slots,
                                     const int* __restrict__ expert_offsets, int E, int k,
                                     const float* __restrict__ route_w, const unsigned long long* __restrict__ wtab) {
    const int e = blockIdx.y;
    const int off0 = expert_offsets[e], off1 = expert_offsets[e + 1];
    if (off1 <= off0) return;
    const int count = segment_count(sorted_slots, off0, off1);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int d0 = blockIdx.x * 128 + 32 * warp;
    const bool live = d0 < D;
    const u8* wd = wtab ? reinterpret_cast<const u8*>(wtab[e]) : w_down + e * e_bytes;
    const int d = live ? d0 + g : 0;
    const u8* rr[4] = {wd + d * row_bytes, wd + (d + 8) * row_bytes, wd + (d + 16) * row_bytes,
                       wd + (d + 24) * row_bytes};
    expert_passes<W, IQP, __nv_bfloat16>(hh, ldh, false, sorted_slots, off0, count, k, rr, live, F,
        [&](float (&acc)[2][NT][4], int base, int nt) {
            for (int t = 0; t < nt; ++t)
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int tok = base + 8 * t + 2 * q + i;
                    if (tok >= count) continue;
                    const int slot = sorted_slots[off0 + tok];
                    float* o = out + (long long)(slot / k) * ldo + d;
                    const float wgt = route_w[slot];
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        atomicAdd(o + 16 * m, wgt * acc[m][t][i]);
                        atomicAdd(o + 16 * m + 8, wgt * acc[m][t][2 + i]);
                    }
                }
        });
}

}  // namespace gs

#define MOE_SMALL_GU(PFX, IQP, WNAME, WTYPE, ATYPE, ANAME)                                                    \
extern "C" __global__ void __launch_bounds__(gs::THREADS, 4)                                                   \
PFX##_gate_up_##ANAME##_##WNAME(const ATYPE* x, long long ldx, const unsigned char* w_gate,                    \
                                unsigned long long up_ptr, long long e_bytes, long long row_bytes, int F,      \
                                int K, __nv_bfloat16* h, long long ldh, const int* sorted_slots,               \
                                const int* expert_offsets, int E, int k, const unsigned long long* wtab,        \
                                int act) { ggf_pdl_entry();                                                     \
    gs::gate_up<WTYPE, IQP, ATYPE>(x, ldx, w_gate, up_ptr, e_bytes, row_bytes, F, K, h, ldh, sorted_slots,     \
                                   expert_offsets, E, k, wtab, act);                                           \
}
#define MOE_SMALL_P(PFX, IQP, WNAME, WTYPE)                                                                    \
MOE_SMALL_GU(PFX, IQP, WNAME, WTYPE, float, f32a) MOE_SMALL_GU(PFX, IQP, WNAME, WTYPE, __nv_bfloat16, bf16a)   \
extern "C" __global__ void __launch_bounds__(gs::THREADS, 4)                                                   \
PFX##_down_##WNAME(const __nv_bfloat16* h, long long ldh, const unsigned char* w_down, long long e_bytes,       \
                   long long row_bytes, int D, int F, float* out, long long ldo, const int* sorted_slots,       \
                   const int* expert_offsets, int E, int k, const float* route_w,                               \
                   const unsigned long long* wtab) { ggf_pdl_entry();                                           \
    gs::down<WTYPE, IQP>(h, ldh, w_down, e_bytes, row_bytes, D, F, out, ldo, sorted_slots, expert_offsets, E,   \
                         k, route_w, wtab);                                                                     \
}
#define MOE_SMALL(WNAME, WTYPE) MOE_SMALL_P(moe_small, false, WNAME, WTYPE)

MOE_SMALL(f32, GGML_F32)
MOE_SMALL(f16, GGML_F16)
MOE_SMALL(bf16, GGML_BF16)
MOE_SMALL(q4_0, GGML_Q4_0)
MOE_SMALL(q4_1, GGML_Q4_1)
MOE_SMALL(q5_0, GGML_Q5_0)
MOE_SMALL(q5_1, GGML_Q5_1)
MOE_SMALL(q8_0, GGML_Q8_0)
MOE_SMALL(q2_k, GGML_Q2_K)
MOE_SMALL(q3_k, GGML_Q3_K)
MOE_SMALL(q4_k, GGML_Q4_K)
MOE_SMALL(q5_k, GGML_Q5_K)
MOE_SMALL(q6_k, GGML_Q6_K)
// the integer-valued path: moe_smallq_*
MOE_SMALL_P(moe_smallq, true, q4_k, GGML_Q4_K)
MOE_SMALL_P(moe_smallq, true, q6_k, GGML_Q6_K)
