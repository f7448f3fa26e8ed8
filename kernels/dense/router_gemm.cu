// C[M, N] = A[M, K] @ W[N, K]^T for the MoE router, on tensor cores at f32 accuracy.
//
// llama.cpp multiplies its f32 router weights in f32, and near-tied expert choices flip under
// bf16 rounding, so the plain bf16 GEMM will not do. Each f32 operand is split while it is
// staged into shared memory, x = hi + lo with hi = round16(x), lo = round16(x - hi) (x - hi is
// exact in f32), and
//     C = A_hi W_hi + A_hi W_lo + A_lo W_hi        (A_lo W_lo and the split residuals dropped)
// with three mma.sync.m16n8k16 per fragment, f32 accumulation. Two split formats:
//   f16  (default): 11-bit halves, residual <= 2^-22 |x|; about 4x MORE accurate than the
//        sequential f32 FMA chain of gemm_f32.cu. The f16 exponent range is the price: W is
//        pre-scaled by w_scale (a power of two, 256 by default: router weights are ~0.01-0.1,
//        and the lo halves of values below 2^-3 / w_scale become f16 subnormals, which only
//        costs an absolute 2^-25 / w_scale per element); |A| and |W| * w_scale must stay below
//        65504 (larger values give inf / NaN logits).
//   bf16: 8-bit halves ("bf16x3"), any f32 range, but residuals up to 2^-17 |x|: about 5x the
//        RMS error of gemm_f32 (max-abs about 2x). Kept for comparison.
// numpy model of both: split_model() in tests/test_gpu_router.py (the reference is float64 x @ w.T).
//
// Tensor cores are reported to truncate when they add into the accumulator (a chained
// accumulator would pick up one such error per mma, ~1e-6 relative over K = 2048 in a numpy
// model), so tiles 128x64 and 64x64k2 sum each k16's 3 mmas into a fresh fragment that starts
// at zero (lo products first, hi x hi last) and add only that partial sum into the f32
// accumulator, with a round-to-nearest FADD. Measured on the H100 (2026-11-22): a 128x128 tile
// that chains its accumulator through the mmas like a plain GEMM had 9x gemm_f32's RMS error and
// max-abs 1.2e-4, so the truncation is real and that tile was dropped (CHAIN = false only).
//
// Tiling: block tile BM x BN, WM x WN warps of MT x NT m16n8 fragments, BK = 32 per warp per
// step. KG > 1 splits each block step's k range among KG warp groups (KG * 32 k per step, group
// g takes sub-block g), which are summed through shared memory at the end: more warps per
// block for the small-M shapes where there are few blocks. Operands reach shared memory as
// 16-bit tiles [rows][32 k] (64 bytes a row, 16-byte chunks XOR-swizzled by (row >> 1) & 3, as
// gemm/gemm_core.cuh), hi and lo tiles for A and for W, double-buffered; the f32 global loads
// of step s + 2 are issued at the end of step s and split + stored during step s + 1, one
// __syncthreads per step. Rows of A past M and rows of W past N are zero; k is a multiple of 4
// (the launcher asks for K % 32 == 0). The loop body is branch-free (a tail tile computes its
// zero rows) so that ptxas schedules each step as one block.
#include "pdl.cuh"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "gemm/gemm_core.cuh"

namespace router {

using gemm::u32;

template<bool F16> __device__ __forceinline__ void split2(float x0, float x1, u32& hi, u32& lo);

template<> __device__ __forceinline__ void split2<true>(float x0, float x1, u32& hi, u32& lo) {
    const __half2 h = __floats2half2_rn(x0, x1);           // .x = x0 at the lower address
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const u32*>(&h);
    lo = *reinterpret_cast<const u32*>(&l);
}

template<> __device__ __forceinline__ void split2<false>(float x0, float x1, u32& hi, u32& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const u32*>(&h);
    lo = *reinterpret_cast<const u32*>(&l);
}

// d = a b + c, m16n8k16, f32 accumulation; c may be d.
template<bool F16> __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[2], const float c[4]) {
    if (F16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                       "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                       "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

template<int BM, int BN, int WM, int WN, int KG>
struct Tile {
    static constexpr int kThreads = 32 * WM * WN * KG;
    static constexpr int MT = BM / (16 * WM), NT = BN / (8 * WN);
    static constexpr int KSTEP = 32 * KG;                      // k per block step
    static constexpr int A_TILE = BM * 64, W_TILE = BN * 64;   // bytes of one [rows][32] 16-bit tile
    // one stage: A hi [KG], A lo [KG], W hi [KG], W lo [KG]
    static constexpr int STAGE = 2 * KG * (A_TILE + W_TILE);
    static constexpr int SMEM = 2 * STAGE;
    static constexpr int A_ITERS = BM * 8 * KG / kThreads;     // float4 loads per thread per step
    static constexpr int W_ITERS = BN * 8 * KG / kThreads;
    static_assert(MT * 16 * WM == BM && NT * 8 * WN == BN, "warp grid must tile the block");
    static_assert(A_ITERS * kThreads == BM * 8 * KG && W_ITERS * kThreads == BN * 8 * KG,
                  "loads must divide evenly among the threads");
    static_assert((KG - 1) * BM * BN * 4 <= SMEM, "the k-group reduction reuses the tile memory");
    static_assert(kThreads % (8 * KG) == 0 && (kThreads / (8 * KG)) % 8 == 0, "staging rows: see load()");
    __device__ static int a_off(int part, int g) { return (part * KG + g) * A_TILE; }
    __device__ static int w_off(int part, int g) { return 2 * KG * A_TILE + (part * KG + g) * W_TILE; }
};

template<int BM, int BN, int WM, int WN, int KG, bool F16, bool AVEC, bool CHAIN>
__device__ __forceinline__ void router_gemm_block(
        const float* __restrict__ A, long long lda, const float* __restrict__ W,
        float* __restrict__ C, long long ldc, int M, int N, int K, float w_scale)
{
    typedef Tile<BM, BN, WM, WN, KG> T;
    constexpr int MT = T::MT, NT = T::NT;
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    const int kg = wid / (WM * WN), wi = wid % (WM * WN), wm = wi / WN, wn = wi % WN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int steps = (K + T::KSTEP - 1) / T::KSTEP;

    // ---- staging: f32 global -> registers -> (split) -> 16-bit hi / lo tiles -------------------
    // load q = tid + i * threads covers row q / (8 KG), float4 c4 = q % (8 KG) of the step's
    // KSTEP k: k-group c4 / 8, 16-byte half-chunk c4 % 8 of that group's 32 k. As threads is a
    // multiple of 8 KG, c4 is the thread's for every i and the rows are r0 + i R, R a multiple of
    // 8, so the swizzle is the same for every i too: one smem offset, one pointer per operand.
    constexpr int R = T::kThreads / (8 * KG);
    const int r0 = tid / (8 * KG), c4 = tid % (8 * KG), g4 = c4 / 8, j4 = c4 % 8;
    const int st_off = gemm::swz(r0, j4 >> 1) + (j4 & 1) * 8;
    const float* a_row = A + (long long)(m0 + r0) * lda + c4 * 4;
    const float* w_row = W + (long long)(n0 + r0) * K + c4 * 4;
    float4 ra[T::A_ITERS], rw[T::W_ITERS];
    auto load = [&](int s) {
        const int kb = s * T::KSTEP;
        const bool k_ok = kb + c4 * 4 < K;
        #pragma unroll
        for (int i = 0; i < T::A_ITERS; ++i) {
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (k_ok && m0 + r0 + i * R < M) {
                const float* p = a_row + (long long)i * R * lda + kb;
                if (AVEC) v = __ldg(reinterpret_cast<const float4*>(p));
                else v = make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
            }
            ra[i] = v;
        }
        #pragma unroll
        for (int i = 0; i < T::W_ITERS; ++i) {
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (k_ok && n0 + r0 + i * R < N) v = __ldg(reinterpret_cast<const float4*>(w_row + (long long)i * R * K + kb));
            rw[i] = v;
        }
    };
    auto store = [&](int buf) {
        unsigned char* st = smem + buf * T::STAGE + st_off;
        #pragma unroll
        for (int i = 0; i < T::A_ITERS; ++i) {
            u32 h0, h1, l0, l1;
            split2<F16>(ra[i].x, ra[i].y, h0, l0);
            split2<F16>(ra[i].z, ra[i].w, h1, l1);
            gemm::st_shared_v2(st + T::a_off(0, g4) + i * R * 64, h0, h1);
            gemm::st_shared_v2(st + T::a_off(1, g4) + i * R * 64, l0, l1);
        }
        #pragma unroll
        for (int i = 0; i < T::W_ITERS; ++i) {
            u32 h0, h1, l0, l1;
            split2<F16>(rw[i].x * w_scale, rw[i].y * w_scale, h0, l0);   // exact: a power of two
            split2<F16>(rw[i].z * w_scale, rw[i].w * w_scale, h1, l1);
            gemm::st_shared_v2(st + T::w_off(0, g4) + i * R * 64, h0, h1);
            gemm::st_shared_v2(st + T::w_off(1, g4) + i * R * 64, l0, l1);
        }
    };

    float acc[MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
    const int warp_m = m0 + wm * MT * 16;   // first row of this warp's fragments

    // ---- main loop: invariants --------------------------------------------------------------
    // At the top of iteration s, buffer s & 1 holds step s (complete: stored before the
    // __syncthreads that ended iteration s - 1, or the prologue's), no thread still reads
    // buffer (s + 1) & 1 (its last readers, in iteration s - 1, passed that same barrier), and
    // the staging registers hold step s + 1, loaded at the end of iteration s - 1: a whole
    // step of mmas covers their latency before they are split and stored (loads issued at the
    // top of the iteration would stall the first conversion that ptxas interleaves with the
    // mmas). Loads past K (the last two steps) are zeros and read nothing.
    load(0);
    store(0);
    load(1);
    __syncthreads();
    for (int s = 0; s < steps; ++s) {
        const unsigned char* st = smem + (s & 1) * T::STAGE;
        // B fragments of both k16 halves: ldmatrix x4 of 8 n rows x 4 chunks (k 0-7, 8-15, 16-23, 24-31)
        u32 bh[NT][4], bl[NT][4];
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int off = gemm::swz(wn * NT * 8 + nt * 8 + (lane & 7), lane >> 3);
            gemm::ldmatrix_x4(bh[nt][0], bh[nt][1], bh[nt][2], bh[nt][3], st + T::w_off(0, kg) + off);
            gemm::ldmatrix_x4(bl[nt][0], bl[nt][1], bl[nt][2], bl[nt][3], st + T::w_off(1, kg) + off);
        }
        #pragma unroll
        for (int kk = 0; kk < 2; ++kk)
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                u32 ah[4], al[4];
                const int off = gemm::swz(wm * MT * 16 + mt * 16 + (lane & 15), kk * 2 + (lane >> 4));
                gemm::ldmatrix_x4(ah[0], ah[1], ah[2], ah[3], st + T::a_off(0, kg) + off);
                gemm::ldmatrix_x4(al[0], al[1], al[2], al[3], st + T::a_off(1, kg) + off);
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (CHAIN) {
                        mma<F16>(acc[mt][nt], al, &bh[nt][2 * kk], acc[mt][nt]);
                        mma<F16>(acc[mt][nt], ah, &bl[nt][2 * kk], acc[mt][nt]);
                        mma<F16>(acc[mt][nt], ah, &bh[nt][2 * kk], acc[mt][nt]);
                    } else {
                        float t[4];
                        mma<F16>(t, al, &bh[nt][2 * kk], zero);
                        mma<F16>(t, ah, &bl[nt][2 * kk], t);
                        mma<F16>(t, ah, &bh[nt][2 * kk], t);
                        #pragma unroll
                        for (int i = 0; i < 4; ++i) acc[mt][nt][i] += t[i];
                    }
                }
            }
        store((s + 1) & 1);                                    // the last step stores zeros, unread
        load(s + 2);
        __syncthreads();
    }

    // ---- k-group reduction (the tile memory is free: the loop ended with a barrier) ----------
    if (KG > 1) {
        float* red = reinterpret_cast<float*>(smem);
        constexpr int F = MT * NT * 4;
        if (kg > 0) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    #pragma unroll
                    for (int i = 0; i < 4; ++i)
                        red[(((kg - 1) * WM * WN + wi) * F + (mt * NT + nt) * 4 + i) * 32 + lane] = acc[mt][nt][i];
        }
        __syncthreads();
        if (kg > 0) return;
        #pragma unroll
        for (int g = 1; g < KG; ++g)
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    #pragma unroll
                    for (int i = 0; i < 4; ++i)
                        acc[mt][nt][i] += red[(((g - 1) * WM * WN + wi) * F + (mt * NT + nt) * 4 + i) * 32 + lane];
    }

    // ---- store: fragment element i is row g + 8 (i >> 1), column 2 t + (i & 1) -------------------
    const float inv = __frcp_rn(w_scale);   // exact: a power of two
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = warp_m + mt * 16 + (lane >> 2) + 8 * (i >> 1);
                const int n = n0 + wn * NT * 8 + nt * 8 + (lane & 3) * 2 + (i & 1);
                if (m < M && n < N) C[(long long)m * ldc + n] = acc[mt][nt][i] * inv;
            }
}

}  // namespace router

// Entry points: router_gemm_<tile>_<split>[_a4]; _a4: A rows at 4-byte alignment only (lda % 4
// or the base not 16-byte aligned: scalar loads). Tiles: 128x64 and 64x64k2 (two k-groups)
// sum each k16 in a fresh fragment. Dynamic shared memory Tile<...>::SMEM (48 KB, 64 KB;
// launch.py mirrors it).
// Grid (ceil(N / BN), ceil(M / BM)).
#define ROUTER_GEMM(NAME, BM, BN, WM, WN, KG, CHAIN)                                                  \
    ROUTER_GEMM1(NAME##_f16, BM, BN, WM, WN, KG, true, true, CHAIN)                                   \
    ROUTER_GEMM1(NAME##_bf16, BM, BN, WM, WN, KG, false, true, CHAIN)                                 \
    ROUTER_GEMM1(NAME##_f16_a4, BM, BN, WM, WN, KG, true, false, CHAIN)                               \
    ROUTER_GEMM1(NAME##_bf16_a4, BM, BN, WM, WN, KG, false, false, CHAIN)
#define ROUTER_GEMM1(NAME, BM, BN, WM, WN, KG, F16, AVEC, CHAIN)                                      \
    extern "C" __global__ void __launch_bounds__(32 * WM * WN * KG, 1) NAME(                          \
            const float* __restrict__ A, long long lda, const float* __restrict__ W,                  \
            float* __restrict__ C, long long ldc, int M, int N, int K, float w_scale) { ggf_pdl_entry(); \
        router::router_gemm_block<BM, BN, WM, WN, KG, F16, AVEC, CHAIN>(A, lda, W, C, ldc, M, N, K, w_scale); \
    }

ROUTER_GEMM(router_gemm_128x64, 128, 64, 4, 2, 1, false)
ROUTER_GEMM(router_gemm_64x64k2, 64, 64, 2, 2, 2, false)
