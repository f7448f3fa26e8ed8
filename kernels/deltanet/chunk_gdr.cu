// Chunked gated delta rule on tensor cores (the WY/UT form; meaning: kernels/deltanet/ref.py).
//
// Two kernels per layer, chunk length C = 64:
//
//   gdr_prep_*   grid (NT, Hk * ceil(R/2)), 128 threads, R = Hv / Hk. One CTA per (chunk, key head,
//                pair of the value heads that read it). K K^T and Q K^T once per key head (mma.sync),
//                then per value head: G = cumsum(g) inside the chunk, D_ij = exp(G_i - G_j) (j <= i),
//                A = tril(beta_i (K K^T)_ij D_ij, -1), Tinv = (I + A)^-1 by forward substitution in f32
//                (one thread per column), P = scale * tril(Q K^T * D). Writes Tinv, P (bf16 [64, 64])
//                and the per-token factors F = [exp(G), beta, exp(G_L - G), exp(G_L)] (f32 [4, 64]).
//                f32 inputs are also copied to bf16 (the recurrence reads bf16 only).
//
//   gdr_recur_*  grid (Hv * V / VB), VB / 16 warps. One CTA per (value head, block of VB value
//                columns); it walks the chunks in order with the state in registers. Each warp owns
//                16 value columns and keeps S^T (16 x K, f32) as mma accumulators, which are
//                already laid out as the A operand of the next product (no shared-memory round trip
//                on the critical path). Per chunk, in the transposed domain ([value col, token]):
//                    X^T  = S^T K^T                                    (K S)
//                    R^T  = beta * (V^T - exp(G) * X^T)
//                    U^T  = R^T Tinv^T                                 (U = Tinv R = u - w S)
//                    o^T  = scale exp(G) * (S^T Q^T) + U^T P^T         (inter + intra chunk)
//                    S^T <- exp(G_L) S^T + (U^T * exp(G_L - G)) K
//                Every product is separable along the value columns, so splitting V across CTAs
//                and warps duplicates no work. Loads of chunk c + 1 (cp.async) overlap chunk c.
//
// Operands are bf16, accumulators and the state f32. Rows past T are zero-filled on load; with
// beta = 0 and g = 0 there they leave the state unchanged and their outputs are not stored.
//
// Compile-time configuration (defines, with these defaults):
//   GDR_DK 128   key dim        GDR_DV 128   value dim
//   GDR_VB 64    value columns per recurrence CTA (16 per warp)
//   GDR_STAGES 2 shared-memory stages of the recurrence (1 where 2 do not fit: sm_89)

#include "pdl.cuh"
#include <cuda_bf16.h>

#ifndef GDR_DK
#define GDR_DK 128
#endif
#ifndef GDR_DV
#define GDR_DV 128
#endif
#ifndef GDR_VB
#define GDR_VB 64
#endif
#ifndef GDR_STAGES
#define GDR_STAGES 2
#endif

typedef unsigned int u32;
typedef __nv_bfloat16 bf16;

namespace gdr {

constexpr int C = 64;    // chunk length
constexpr int TP = 72;   // padded row (bf16 elements) of the 64 x 64 tiles in shared memory

// ---------------------------------------------------------------------------------------------
// small device helpers (local to this file)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(u32& d0, u32& d1, u32& d2, u32& d3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3) : "r"(addr) : "memory");
}

__device__ __forceinline__ void ldsm_x4_t(u32& d0, u32& d1, u32& d2, u32& d3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3) : "r"(addr) : "memory");
}

// c += a * b, m16n8k16, bf16 operands, f32 accumulators
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

__device__ __forceinline__ float2 unpack(u32 x) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&x);
    return __bfloat1622float2(v);
}

// 16-byte async copy global -> shared; src_bytes = 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// 8 consecutive inputs (16-byte aligned) as 8 bf16 in a uint4
__device__ __forceinline__ uint4 load8(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint4 load8(const float* p) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    return make_uint4(pack(a.x, a.y), pack(a.z, a.w), pack(b.x, b.y), pack(b.z, b.w));
}

template <typename T> struct is_f32 { static constexpr bool value = false; };
template <> struct is_f32<float> { static constexpr bool value = true; };

__device__ __forceinline__ void store2(float* p, float a) { *p = a; }
__device__ __forceinline__ void store2(bf16* p, float a) { *p = __float2bfloat16_rn(a); }

// value head h reads key head h % Hk ("tile") or h / (Hv / Hk) ("interleave")
__device__ __forceinline__ int key_head(int h, int Hk, int Hv, int head_map) {
    return head_map ? h / (Hv / Hk) : h % Hk;
}
// the j-th value head (in increasing order) that reads key head kh
__device__ __forceinline__ int value_head(int kh, int j, int Hk, int Hv, int head_map) {
    return head_map ? kh * (Hv / Hk) + j : kh + j * Hk;
}

// ---------------------------------------------------------------------------------------------
// prep: per (chunk, key head, value-head pair)

constexpr int AP = 68;   // padded row (f32) of A^T in shared memory

// Column c of (I + A)^-1 by right-looking forward substitution: once x_j is final, subtract its
// contribution from every later row (independent FMAs, one short dependency per column step).
// AT = A^T (row j holds column j of A). Rows below J0 are known zero for this warp's columns.
template <int J0>
__device__ __forceinline__ void solve_column(const float* __restrict__ AT, int c, bf16* __restrict__ Tcol) {
    float x[C];
#pragma unroll
    for (int i = 0; i < C; ++i) x[i] = (i == c) ? 1.f : 0.f;
#pragma unroll
    for (int j = J0; j < C - 1; ++j) {
        const float xj = x[j];
#pragma unroll
        for (int i4 = (j + 1) & ~3; i4 < C; i4 += 4) {
            const float4 a = *reinterpret_cast<const float4*>(AT + j * AP + i4);
            if (i4 + 0 > j) x[i4 + 0] -= a.x * xj;
            if (i4 + 1 > j) x[i4 + 1] -= a.y * xj;
            if (i4 + 2 > j) x[i4 + 2] -= a.z * xj;
            if (i4 + 3 > j) x[i4 + 3] -= a.w * xj;
        }
    }
#pragma unroll
    for (int i = 0; i < C; ++i) Tcol[i * C] = __float2bfloat16_rn(x[i]);
}

template <int DK, typename TIN>
__device__ __forceinline__ void prep_impl(
    const TIN* __restrict__ q, const TIN* __restrict__ k, long long qk_stride,
    const TIN* __restrict__ v, long long v_stride, int DV,
    const float* __restrict__ g, const float* __restrict__ beta,
    bf16* __restrict__ Tg, bf16* __restrict__ Pg, float* __restrict__ Fg,
    bf16* __restrict__ qc, bf16* __restrict__ kc, bf16* __restrict__ vc,
    int T, int Hk, int Hv, float scale, int head_map)
{
    constexpr int KP = DK + 8;
    constexpr int KS_B = C * KP * 2;
    constexpr int R0_B = (2 * KS_B > 2 * C * TP * 2 + 2 * C * C * 2) ? 2 * KS_B : 2 * C * TP * 2 + 2 * C * C * 2;
    constexpr int AT_B = 2 * C * AP * 4;
    extern __shared__ __align__(16) unsigned char smem[];
    // phase 1: Ks, Qs;  phase 2 (same bytes): Ps[2], Ts[2]
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Qs = Ks + C * KP;
    bf16* Ps = reinterpret_cast<bf16*>(smem);
    bf16* Ts = Ps + 2 * C * TP;
    float* AT = reinterpret_cast<float*>(smem + R0_B);
    float* Fs = reinterpret_cast<float*>(smem + R0_B + AT_B);   // [2][5][C]: G, exp G, beta, exp(GL-G), exp GL

    const int chunk = blockIdx.x;
    const int R = Hv / Hk;
    const int npairs = (R + 1) / 2;
    const int kh = blockIdx.y / npairs, pair = blockIdx.y % npairs;
    const int nh = min(2, R - 2 * pair);
    const int t0 = chunk * C;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    constexpr bool COPY = is_f32<TIN>::value;

    // ---- load K and Q (bf16, zero rows past T); f32 inputs are also copied out as bf16
    {
        constexpr int CH = DK / 8;
        const TIN* kb = k + (long long)kh * DK;
        const TIN* qb = q + (long long)kh * DK;
#pragma unroll 4
        for (int idx = tid; idx < C * CH; idx += 128) {
            const int row = idx / CH, ch = idx % CH, t = t0 + row;
            uint4 kv = make_uint4(0, 0, 0, 0), qv = make_uint4(0, 0, 0, 0);
            if (t < T) {
                kv = load8(kb + t * qk_stride + ch * 8);
                qv = load8(qb + t * qk_stride + ch * 8);
                if (COPY && pair == 0) {
                    const long long o = ((long long)t * Hk + kh) * DK + ch * 8;
                    *reinterpret_cast<uint4*>(kc + o) = kv;
                    *reinterpret_cast<uint4*>(qc + o) = qv;
                }
            }
            *reinterpret_cast<uint4*>(Ks + row * KP + ch * 8) = kv;
            *reinterpret_cast<uint4*>(Qs + row * KP + ch * 8) = qv;
        }
        if (COPY) {
            const int CHV = DV / 8;
            for (int j = 0; j < nh; ++j) {
                const int hv = value_head(kh, 2 * pair + j, Hk, Hv, head_map);
                for (int idx = tid; idx < C * CHV; idx += 128) {
                    const int row = idx / CHV, ch = idx % CHV, t = t0 + row;
                    if (t < T)
                        *reinterpret_cast<uint4*>(vc + ((long long)t * Hv + hv) * DV + ch * 8) =
                            load8(v + t * v_stride + (long long)hv * DV + ch * 8);
                }
            }
        }
    }
    // ---- cumulative log decay and the per-token factors (warp j: value head j)
    if (warp < nh) {
        const int hv = value_head(kh, 2 * pair + warp, Hk, Hv, head_map);
        const int ta = t0 + 2 * lane, tb = ta + 1;
        const float ga = ta < T ? g[(long long)ta * Hv + hv] : 0.f;
        const float gb = tb < T ? g[(long long)tb * Hv + hv] : 0.f;
        const float ba = ta < T ? beta[(long long)ta * Hv + hv] : 0.f;
        const float bb = tb < T ? beta[(long long)tb * Hv + hv] : 0.f;
        float s = ga + gb;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, s, off);
            if (lane >= off) s += y;
        }
        const float Gb = s, Ga = s - gb;
        const float GL = __shfl_sync(0xffffffffu, s, 31);
        float* F = Fs + warp * 5 * C;
        F[0 * C + 2 * lane] = Ga;               F[0 * C + 2 * lane + 1] = Gb;
        F[1 * C + 2 * lane] = __expf(Ga);       F[1 * C + 2 * lane + 1] = __expf(Gb);
        F[2 * C + 2 * lane] = ba;               F[2 * C + 2 * lane + 1] = bb;
        F[3 * C + 2 * lane] = __expf(GL - Ga);  F[3 * C + 2 * lane + 1] = __expf(GL - Gb);
        F[4 * C + 2 * lane] = __expf(GL);       F[4 * C + 2 * lane + 1] = __expf(GL);
    }
    __syncthreads();

    // ---- K K^T and Q K^T, rows 16 warp .. 16 warp + 15 (lower triangle only)
    const int gq = lane >> 2, qq = lane & 3;
    float kk[8][4], qk[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) kk[n][e] = qk[n][e] = 0.f;
    {
        const int arow = 16 * warp + (lane & 7) + (((lane >> 3) & 1) << 3), acol = (lane >> 4) << 3;
        const int brow = (lane & 7) + ((lane >> 4) << 3), bcol = ((lane >> 3) & 1) << 3;
        const u32 ka = smem_addr(Ks + arow * KP + acol), qa = smem_addr(Qs + arow * KP + acol);
        const u32 kb = smem_addr(Ks + brow * KP + bcol);
#pragma unroll
        for (int ks = 0; ks < DK / 16; ++ks) {
            u32 a0, a1, a2, a3, c0, c1, c2, c3;
            ldsm_x4(a0, a1, a2, a3, ka + ks * 32);
            ldsm_x4(c0, c1, c2, c3, qa + ks * 32);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                if (np <= warp) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, kb + (16 * np * KP + 16 * ks) * 2);
                    mma(kk[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(kk[2 * np + 1], a0, a1, a2, a3, b2, b3);
                    mma(qk[2 * np], c0, c1, c2, c3, b0, b1);
                    mma(qk[2 * np + 1], c0, c1, c2, c3, b2, b3);
                }
            }
        }
    }
    __syncthreads();   // Ks/Qs dead: their bytes become Ps/Ts

    // ---- A^T (f32) and P (bf16) per value head
    for (int j = 0; j < nh; ++j) {
        const float* F = Fs + j * 5 * C;
        float* ATj = AT + j * C * AP;
        bf16* Pj = Ps + j * C * TP;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                const int i = 16 * warp + gq + 8 * hi;
                const int c0 = 8 * n + 2 * qq;
                const float Gi = F[i], bi = F[2 * C + i];
                float pv[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int jj = c0 + e;
                    const float d = jj <= i ? __expf(Gi - F[jj]) : 0.f;
                    ATj[jj * AP + i] = jj < i ? bi * kk[n][2 * hi + e] * d : 0.f;
                    pv[e] = scale * qk[n][2 * hi + e] * d;
                }
                *reinterpret_cast<u32*>(Pj + i * TP + c0) = pack(pv[0], pv[1]);
            }
        }
    }
    __syncthreads();

    // ---- Tinv = (I + A)^-1: thread (head warp/2, column 32 (warp%2) + lane)
    {
        const int j = warp >> 1, c = ((warp & 1) << 5) + lane;
        if (j < nh) {
            if (warp & 1) solve_column<32>(AT + j * C * AP, c, Ts + j * C * C + c);
            else          solve_column<0>(AT + j * C * AP, c, Ts + j * C * C + c);
        }
    }
    __syncthreads();

    // ---- write Tinv, P, F
    for (int j = 0; j < nh; ++j) {
        const int hv = value_head(kh, 2 * pair + j, Hk, Hv, head_map);
        const long long blk = (long long)chunk * Hv + hv;
        bf16* Tdst = Tg + blk * C * C;
        bf16* Pdst = Pg + blk * C * C;
#pragma unroll
        for (int idx = tid; idx < C * C / 8; idx += 128) {
            const int row = idx >> 3, ch = idx & 7;
            *reinterpret_cast<uint4*>(Tdst + idx * 8) = *reinterpret_cast<const uint4*>(Ts + j * C * C + idx * 8);
            *reinterpret_cast<uint4*>(Pdst + idx * 8) = *reinterpret_cast<const uint4*>(Ps + j * C * TP + row * TP + ch * 8);
        }
        if (tid < C) {   // 4 rows x 64 floats = 64 float4
            const float* F = Fs + j * 5 * C + C;   // skip raw G
            reinterpret_cast<float4*>(Fg + blk * 4 * C)[tid] = reinterpret_cast<const float4*>(F)[tid];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// recurrence: per (value head, block of VB value columns), sequential over chunks

template <int DK, int DV, int VB, int STAGES>
struct RecurLayout {
    static constexpr int NW = VB / 16, NTHR = NW * 32;
    static constexpr int KP = DK + 8, VP = VB + 8;
    static constexpr int KS_B = C * KP * 2, TS_B = C * TP * 2, VS_B = C * VP * 2, FS_B = 4 * C * 4;
    static constexpr int STAGE_B = 2 * KS_B + 2 * TS_B + VS_B + FS_B;
    static constexpr int SMEM_B = STAGES * STAGE_B;
};

template <int DK, int DV, int VB, int STAGES, typename TOUT>
__device__ __forceinline__ void recur_impl(
    const bf16* __restrict__ q, const bf16* __restrict__ k, long long qk_stride,
    const bf16* __restrict__ v, long long v_stride,
    const bf16* __restrict__ Tg, const bf16* __restrict__ Pg, const float* __restrict__ Fg,
    float* __restrict__ state, TOUT* __restrict__ out,
    int T, int Hk, int Hv, float scale, int head_map)
{
    using L = RecurLayout<DK, DV, VB, STAGES>;
    constexpr int KP = L::KP, VP = L::VP, NTHR = L::NTHR, NKT = DK / 8;
    extern __shared__ __align__(16) unsigned char smem[];

    const int nvb = DV / VB;
    const int h = blockIdx.x / nvb, vblk = blockIdx.x % nvb;
    const int kh = key_head(h, Hk, Hv, head_map);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, qq = lane & 3;
    const int NT = (T + C - 1) / C;

    const bf16* kb = k + (long long)kh * DK;
    const bf16* qb = q + (long long)kh * DK;
    const bf16* vb = v + (long long)h * DV + vblk * VB;

    auto issue_loads = [&](int chunk, unsigned char* base) {
        bf16* Ks = reinterpret_cast<bf16*>(base);
        bf16* Qs = Ks + C * KP;
        bf16* Ts = Qs + C * KP;
        bf16* Ps = Ts + C * TP;
        bf16* Vs = Ps + C * TP;
        float* Fs = reinterpret_cast<float*>(Vs + C * VP);
        const int t0 = chunk * C;
        constexpr int CK = DK / 8;
#pragma unroll
        for (int idx = tid; idx < C * CK; idx += NTHR) {
            const int row = idx / CK, ch = idx % CK, t = t0 + row;
            const bool ok = t < T;
            const long long off = (long long)(ok ? t : 0) * qk_stride + ch * 8;
            cp_async16(smem_addr(Ks + row * KP + ch * 8), kb + off, ok ? 16 : 0);
            cp_async16(smem_addr(Qs + row * KP + ch * 8), qb + off, ok ? 16 : 0);
        }
        constexpr int CV = VB / 8;
#pragma unroll
        for (int idx = tid; idx < C * CV; idx += NTHR) {
            const int row = idx / CV, ch = idx % CV, t = t0 + row;
            const bool ok = t < T;
            cp_async16(smem_addr(Vs + row * VP + ch * 8), vb + (long long)(ok ? t : 0) * v_stride + ch * 8, ok ? 16 : 0);
        }
        const long long blk = (long long)chunk * Hv + h;
        const bf16* Tsrc = Tg + blk * C * C;
        const bf16* Psrc = Pg + blk * C * C;
#pragma unroll
        for (int idx = tid; idx < C * C / 8; idx += NTHR) {
            const int row = idx >> 3, ch = idx & 7;
            cp_async16(smem_addr(Ts + row * TP + ch * 8), Tsrc + idx * 8, 16);
            cp_async16(smem_addr(Ps + row * TP + ch * 8), Psrc + idx * 8, 16);
        }
        for (int idx = tid; idx < C; idx += NTHR)   // 4 x 64 floats
            cp_async16(smem_addr(Fs + 4 * idx), Fg + blk * 4 * C + 4 * idx, 16);
    };

    // state S[key][v] as S^T accumulators: s[n] covers v rows (v0, v0 + 8), keys 8n + 2qq + {0,1}
    const int v0 = vblk * VB + 16 * warp + gq;
    float* S = state + (long long)h * DK * DV;
    float s[NKT][4];
#pragma unroll
    for (int n = 0; n < NKT; ++n) {
        const int key = 8 * n + 2 * qq;
        s[n][0] = S[key * DV + v0];
        s[n][1] = S[(key + 1) * DV + v0];
        s[n][2] = S[key * DV + v0 + 8];
        s[n][3] = S[(key + 1) * DV + v0 + 8];
    }

    // per-lane ldmatrix offsets (elements)
    const int r_nt = (lane & 7) + ((lane >> 4) << 3), c_nt = ((lane >> 3) & 1) << 3;   // B from [n][k] rows
    const int r_t = (lane & 7) + (((lane >> 3) & 1) << 3), c_t = (lane >> 4) << 3;     // B^T from [k][n] rows

    if (STAGES > 1) { issue_loads(0, smem); cp_async_commit(); }

    for (int chunk = 0; chunk < NT; ++chunk) {
        unsigned char* base = smem + (chunk % STAGES) * L::STAGE_B;
        if (STAGES > 1) {
            cp_async_wait<0>();
            __syncthreads();   // chunk's data visible; everyone is done with the other buffer
            if (chunk + 1 < NT) issue_loads(chunk + 1, smem + ((chunk + 1) % STAGES) * L::STAGE_B);
            cp_async_commit();
        } else {
            issue_loads(chunk, base);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
        }
        const bf16* Ks = reinterpret_cast<const bf16*>(base);
        const bf16* Qs = Ks + C * KP;
        const bf16* Ts = Qs + C * KP;
        const bf16* Ps = Ts + C * TP;
        const bf16* Vs = Ps + C * TP;
        const float* Fs = reinterpret_cast<const float*>(Vs + C * VP);   // exp G, beta, exp(GL-G), exp GL

        // X^T = S^T K^T and (QS)^T = S^T Q^T: [16 v x 64 tok], contraction over keys
        float x[8][4], o[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) x[n][e] = o[n][e] = 0.f;
        {
            const u32 ka = smem_addr(Ks + r_nt * KP + c_nt), qa = smem_addr(Qs + r_nt * KP + c_nt);
#pragma unroll
            for (int ks = 0; ks < DK / 16; ++ks) {
                const u32 a0 = pack(s[2 * ks][0], s[2 * ks][1]), a1 = pack(s[2 * ks][2], s[2 * ks][3]);
                const u32 a2 = pack(s[2 * ks + 1][0], s[2 * ks + 1][1]), a3 = pack(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, ka + (16 * np * KP + 16 * ks) * 2);
                    mma(x[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(x[2 * np + 1], a0, a1, a2, a3, b2, b3);
                    ldsm_x4(b0, b1, b2, b3, qa + (16 * np * KP + 16 * ks) * 2);
                    mma(o[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(o[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
        }
        // R^T = beta * (V^T - exp(G) X^T)   (in x)
        {
            const u32 va = smem_addr(Vs + r_nt * VP + 16 * warp + c_nt);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 w[4];
                ldsm_x4_t(w[0], w[1], w[2], w[3], va + 16 * np * VP * 2);
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int n = 2 * np + hf, tok = 8 * n + 2 * qq;
                    const float2 eg = *reinterpret_cast<const float2*>(Fs + tok);
                    const float2 bt = *reinterpret_cast<const float2*>(Fs + C + tok);
                    const float2 lo = unpack(w[2 * hf]), hi = unpack(w[2 * hf + 1]);
                    x[n][0] = bt.x * (lo.x - eg.x * x[n][0]);
                    x[n][1] = bt.y * (lo.y - eg.y * x[n][1]);
                    x[n][2] = bt.x * (hi.x - eg.x * x[n][2]);
                    x[n][3] = bt.y * (hi.y - eg.y * x[n][3]);
                }
            }
        }
        // U^T = R^T Tinv^T (Tinv lower triangular: token tile n needs k-steps kk <= n / 2)
        float u[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) u[n][e] = 0.f;
        {
            const u32 ta = smem_addr(Ts + r_nt * TP + c_nt);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u32 a0 = pack(x[2 * kk][0], x[2 * kk][1]), a1 = pack(x[2 * kk][2], x[2 * kk][3]);
                const u32 a2 = pack(x[2 * kk + 1][0], x[2 * kk + 1][1]), a3 = pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
                for (int np = kk; np < 4; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, ta + (16 * np * TP + 16 * kk) * 2);
                    mma(u[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(u[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
        }
        // o^T = scale exp(G) (QS)^T + U^T P^T   (P carries scale and the causal mask)
        {
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const float2 eg = *reinterpret_cast<const float2*>(Fs + 8 * n + 2 * qq);
                o[n][0] *= scale * eg.x; o[n][1] *= scale * eg.y;
                o[n][2] *= scale * eg.x; o[n][3] *= scale * eg.y;
            }
            const u32 pa = smem_addr(Ps + r_nt * TP + c_nt);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u32 a0 = pack(u[2 * kk][0], u[2 * kk][1]), a1 = pack(u[2 * kk][2], u[2 * kk][3]);
                const u32 a2 = pack(u[2 * kk + 1][0], u[2 * kk + 1][1]), a3 = pack(u[2 * kk + 1][2], u[2 * kk + 1][3]);
#pragma unroll
                for (int np = kk; np < 4; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, pa + (16 * np * TP + 16 * kk) * 2);
                    mma(o[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(o[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
            const int t0 = chunk * C;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const int ta = t0 + 8 * n + 2 * qq;
                if (ta < T) {
                    TOUT* p = out + ((long long)ta * Hv + h) * DV + v0;
                    store2(p, o[n][0]);
                    store2(p + 8, o[n][2]);
                }
                if (ta + 1 < T) {
                    TOUT* p = out + ((long long)(ta + 1) * Hv + h) * DV + v0;
                    store2(p, o[n][1]);
                    store2(p + 8, o[n][3]);
                }
            }
        }
        // S^T <- exp(G_L) S^T + (U^T * exp(G_L - G)) K
        {
            const float eL = Fs[3 * C];
#pragma unroll
            for (int n = 0; n < NKT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] *= eL;
            const u32 ka = smem_addr(Ks + r_t * KP + c_t);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const float2 f0 = *reinterpret_cast<const float2*>(Fs + 2 * C + 16 * kk + 2 * qq);
                const float2 f1 = *reinterpret_cast<const float2*>(Fs + 2 * C + 16 * kk + 8 + 2 * qq);
                const u32 a0 = pack(u[2 * kk][0] * f0.x, u[2 * kk][1] * f0.y);
                const u32 a1 = pack(u[2 * kk][2] * f0.x, u[2 * kk][3] * f0.y);
                const u32 a2 = pack(u[2 * kk + 1][0] * f1.x, u[2 * kk + 1][1] * f1.y);
                const u32 a3 = pack(u[2 * kk + 1][2] * f1.x, u[2 * kk + 1][3] * f1.y);
#pragma unroll
                for (int np = 0; np < DK / 16; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, ka + (16 * kk * KP + 16 * np) * 2);
                    mma(s[2 * np], a0, a1, a2, a3, b0, b1);
                    mma(s[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
        }
        if (STAGES == 1) __syncthreads();   // the next chunk's loads overwrite this buffer
    }

#pragma unroll
    for (int n = 0; n < NKT; ++n) {
        const int key = 8 * n + 2 * qq;
        S[key * DV + v0] = s[n][0];
        S[(key + 1) * DV + v0] = s[n][1];
        S[key * DV + v0 + 8] = s[n][2];
        S[(key + 1) * DV + v0 + 8] = s[n][3];
    }
}

}  // namespace gdr

// ---------------------------------------------------------------------------------------------
// entry points

#define GDR_PREP_ARGS(TIN)                                                                        \
    const TIN* q, const TIN* k, long long qk_stride, const TIN* v, long long v_stride,           \
    const float* g, const float* beta, bf16* Tg, bf16* Pg, float* Fg, bf16* qc, bf16* kc,        \
    bf16* vc, int T, int Hk, int Hv, float scale, int head_map
#define GDR_PREP_PASS q, k, qk_stride, v, v_stride, GDR_DV, g, beta, Tg, Pg, Fg, qc, kc, vc, T, Hk, Hv, scale, head_map

extern "C" __global__ void __launch_bounds__(128, 3) gdr_prep_bf16(GDR_PREP_ARGS(bf16)) { ggf_pdl_entry();
    gdr::prep_impl<GDR_DK, bf16>(GDR_PREP_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 3) gdr_prep_f32(GDR_PREP_ARGS(float)) { ggf_pdl_entry();
    gdr::prep_impl<GDR_DK, float>(GDR_PREP_PASS);
}

#define GDR_RECUR_ARGS(TOUT)                                                                      \
    const bf16* q, const bf16* k, long long qk_stride, const bf16* v, long long v_stride,        \
    const bf16* Tg, const bf16* Pg, const float* Fg, float* state, TOUT* out, int T, int Hk,     \
    int Hv, float scale, int head_map
#define GDR_RECUR_PASS q, k, qk_stride, v, v_stride, Tg, Pg, Fg, state, out, T, Hk, Hv, scale, head_map

extern "C" __global__ void __launch_bounds__(GDR_VB * 2, 1) gdr_recur_f32(GDR_RECUR_ARGS(float)) { ggf_pdl_entry();
    gdr::recur_impl<GDR_DK, GDR_DV, GDR_VB, GDR_STAGES, float>(GDR_RECUR_PASS);
}
extern "C" __global__ void __launch_bounds__(GDR_VB * 2, 1) gdr_recur_bf16(GDR_RECUR_ARGS(bf16)) { ggf_pdl_entry();
    gdr::recur_impl<GDR_DK, GDR_DV, GDR_VB, GDR_STAGES, bf16>(GDR_RECUR_PASS);
}
