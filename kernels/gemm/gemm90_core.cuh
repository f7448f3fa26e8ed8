// Hopper (sm_90a) GEMM core shared by the dense GEMMs (gemm/gemm90.cu) and the MoE grouped GEMMs
// (moe/grouped_gemm90.cu):   C[M, N] = A[M, K] @ W[N, K]^T, with the same modes, operands and
// meaning as gemm_core.cuh (the mma.sync core used below sm_90 and as the fallback).
//
// Block: 3 or 4 warpgroups (Cfg: 384 threads for bf16 A and W, 512 otherwise), warp-specialised.
//   the first 1 or 2 warpgroups (producers, setmaxnreg 64 / 96): load A and W for step s into the
//     ring slot s % S, and signal full[slot]. bf16 operands go by cp.async (16 B, zero-filled
//     past the valid rows / K) straight into the 128-byte-swizzled tile, completing on the
//     mbarrier through cp.async.mbarrier.arrive.noinc. f32 A is read into registers, rounded to
//     bf16 and stored into the swizzled tile. GGML W: the raw blocks go by cp.async into a raw
//     ring (own full/empty mbarriers) and the producers dequantise each step's [BN x 64] slice
//     into the swizzled bf16 tile (st.shared + fence.proxy.async, then a plain arrive). Q4_K,
//     Q6_K and Q8_0 use the word-wise decoders of gemm/dequant90.cuh (two threads per W row,
//     16-byte shared loads, prmt int->float, scales decoded once per sub-block); the define
//     G90_GENERIC_DEQUANT (launch.py GGFUSE_DEQUANT=generic) falls back to ggml_quants' dequant8.
//   the last 2 warpgroups (consumers, setmaxnreg 216 / 160): consumer c owns tile rows
//     [64c, 64c + 64) and runs wgmma.mma_async m64nBNk16 (4 per 64-wide step) on the shared
//     tiles, f32 accumulators in registers; after step s's wgmma are issued it waits until at
//     most one group is pending (step s-1 done) and releases slot s-1 (empty[slot]).
//     A consumer whose 64 rows are all past the valid rows skips the main loop entirely
//     (the empty barriers then expect one warpgroup's arrivals only).
//
// Tiles: BM = 128 rows of A, BN rows of W (256 for bf16 W, 128 for GGML W: leaves shared memory
// for the raw ring and halves the dequantisation per step), BK = 64 (one 128-byte row).
// Shared tile layout (what wgmma's K-major 128B-swizzle descriptor reads): row r at r * 128,
// its 16-byte chunk c (k = 8c .. 8c+7) at chunk position c ^ (r & 7); tiles 1024-byte aligned;
// 8-row groups 1024 bytes apart (the descriptor's stride byte offset). The k16 slice kk of a
// step is addressed by advancing the descriptor start by 32 * kk bytes (the swizzle is applied
// by the hardware on the final address bits, which is why the tile base must be 1024-aligned).
//
// Pipeline: S ring slots. Producers run ahead by up to S - 1 steps; consumers keep one wgmma
// group in flight. Parities: slot i's n-th use (n = s / S) waits full[i] with parity n & 1 and,
// before refilling, empty[i] with parity (n & 1) ^ 1 (a fresh barrier passes parity 1).
#pragma once
#include <cuda_bf16.h>
#include "quant/ggml_quants.cuh"

namespace g90 {

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int BM = 128, BK = 64;
constexpr int A_TILE = BM * BK * 2;             // 16 KB
constexpr int kStages = 4;

enum Mode { kGemm = 0, kSwiglu = 1, kMoeGateUp = 2, kMoeDown = 3 };

template<int W, bool A_F32> struct Cfg {
    static constexpr bool kRaw = W != GGML_BF16;
    // bf16 A and W: 128 x 256 tiles, 1 producer warpgroup (cp.async only), 384 threads (the
    // entry register cap of 168 must hold a consumer's 128 accumulators). Otherwise 128 x 128
    // tiles and 2 producer warpgroups (dequantisation / f32 conversion), 512 threads.
    static constexpr int BN = (kRaw || A_F32) ? 128 : 256;
    static constexpr int PRODUCERS = BN == 256 ? 128 : 256;
    static constexpr int THREADS = PRODUCERS + 256;
    static constexpr int PREGS = BN == 256 ? 64 : 96;      // setmaxnreg: P * PREGS + 256 * CREGS <= 65536
    static constexpr int CREGS = BN == 256 ? 216 : 160;
    static constexpr int B_TILE = BN * BK * 2;
    static constexpr int S = kStages;
    // raw unit: the raw bytes of one W row that one step (or, for 256-element blocks, four
    // steps) needs; R = steps per unit; the producers' lead of S-1 steps bounds the ring depth
    static constexpr int QK = kRaw ? QBlock<W>::QK : BK;
    static constexpr int QBYTES = kRaw ? QBlock<W>::BYTES : 0;
    static constexpr int UNIT_ELEMS = QK > BK ? QK : BK;
    static constexpr int UNIT_BYTES = UNIT_ELEMS / QK * QBYTES;
    static constexpr int R = UNIT_ELEMS / BK;
    // 16-byte chunks copied per row and unit (the unit's bytes start at any offset mis < 16 of
    // the first); the slot of a row is an odd number of chunks, so the 16-byte reads of 8
    // consecutive rows (one phase) hit 8 different bank groups
    static constexpr int CHUNKS = kRaw ? (UNIT_BYTES + 15 + 15) / 16 : 0;
    static constexpr int SLOT = 16 * (CHUNKS | 1);
    static constexpr int NR = !kRaw ? 0 : R == 1 ? S : (S - 1 + R + R - 1) / R;
    // + 16: the last row's unaligned 48-byte window reads (dequant90.cuh window8) stay inside
    static constexpr int RAW_BYTES = kRaw ? NR * BN * SLOT + 16 : 0;
    // fast word-wise dequantisation (dequant90.cuh) for these types; G90_GENERIC_DEQUANT (a
    // define, launch.py GGFUSE_DEQUANT=generic) keeps the generic dequant8 for comparison
#if defined(G90_GENERIC_DEQUANT)
    static constexpr bool kFastDq = false;
#else
    static constexpr bool kFastDq = W == GGML_Q4_K || W == GGML_Q6_K || W == GGML_Q8_0;
#endif
    // layout (offsets from the 1024-aligned base)
    static constexpr int OFF_B = S * A_TILE;
    static constexpr int OFF_RAW = OFF_B + S * B_TILE;
    static constexpr int OFF_BAR = OFF_RAW + RAW_BYTES;                  // full[S] empty[S] rfull[NR] rempty[NR]
    static constexpr int OFF_AROW = OFF_BAR + (2 * S + 2 * NR) * 8;
    static constexpr int OFF_BROW = OFF_AROW + BM * 8;
    static constexpr int OFF_SLOT = OFF_BROW + BN * 8;
    static constexpr int END = OFF_SLOT + BM * 4 + 16;
    static constexpr int SMEM = END + 1024;                              // + alignment slack
    static_assert(!kRaw || R * BK == UNIT_ELEMS, "a raw unit is a whole number of steps");
    static_assert(!kRaw || (R == 1 ? NR >= S - 1 : NR * R >= S - 1 + R), "raw ring too shallow for the lead");
    static_assert(SMEM <= 227 * 1024, "shared memory");
};
template<int W, bool A_F32> __host__ __device__ constexpr int smem_bytes() { return Cfg<W, A_F32>::SMEM; }

}  // namespace g90

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "gemm/wgmma.cuh"
#include "gemm/dequant90.cuh"

namespace g90 {

// ---- PTX wrappers --------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
// arrive on bar once every cp.async this thread issued so far has landed (counts as one arrival)
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
// generic-proxy writes to shared memory (st.shared, cp.async) before async-proxy reads (wgmma)
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void st_shared_v4(u32 a, u32 x, u32 y, u32 z, u32 w) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" :: "r"(a), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const u32*>(&h);
}
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// Shared-memory matrix descriptor, K-major, 128-byte swizzle: start address >> 4 (bits 0-13),
// leading byte offset unused for this layout (1), stride byte offset 1024 >> 4 (bits 32-45),
// base offset 0 (1024-aligned tiles), layout type 1 = SWIZZLE_128B (bits 62-63).
__device__ __forceinline__ u64 smem_desc(u32 addr) {
    return (u64)((addr >> 4) & 0x3FFF) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
// byte offset of 16-byte chunk c of row r in a swizzled tile
__device__ __forceinline__ u32 swz(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

template<int N> __device__ __forceinline__ void wgmma(float* d, u64 da, u64 db) {
    if constexpr (N == 256) wgmma_m64n256k16(d, da, db);
    else wgmma_m64n128k16(d, da, db);
}

// ---- the block program ---------------------------------------------------------------------
// Arguments and modes exactly as gemm::gemm_block (gemm_core.cuh). kSwiglu / kMoeGateUp: a
// block computes BN/2 output columns from BN/2 gate rows (B tile rows [0, BN/2)) and the same
// BN/2 up rows (rows [BN/2, BN)); accumulator n8-block j pairs with j + BN/16.
template<int W, bool A_F32, int MODE>
__device__ __forceinline__ void gemm_block(
    const void* __restrict__ a, long long lda,
    const u8* __restrict__ w0, const u8* __restrict__ w1, long long w_row_bytes, long long w_expert_bytes,
    int M, int N, int K,
    void* __restrict__ c, long long ldc, int c_bf16, int accumulate,
    const int* __restrict__ sorted_slots, const int* __restrict__ expert_offsets, int n_expert, int topk,
    const float* __restrict__ route_w)
{
    typedef Cfg<W, A_F32> CF;
    constexpr int BN = CF::BN, S = CF::S, kThreads = CF::THREADS, kProducers = CF::PRODUCERS;
    constexpr bool kSwi = MODE == kSwiglu || MODE == kMoeGateUp;
    constexpr bool kMoe = MODE == kMoeGateUp || MODE == kMoeDown;
    // arrivals on full[] per producer thread and step: one cp.async-tracked (bf16 A or bf16 W
    // by cp.async), one plain (f32 A stores or dequantised W stores)
    constexpr int kAsyncArrive = (!A_F32 || !CF::kRaw) ? 1 : 0;
    constexpr int kPlainArrive = (A_F32 || CF::kRaw) ? 1 : 0;

    extern __shared__ u8 smem_raw[];
    const u32 base_s = (smem_addr(smem_raw) + 1023u) & ~1023u;
    u8* base = smem_raw + (base_s - smem_addr(smem_raw));
    const u32 sA = base_s, sB = base_s + CF::OFF_B, sRaw = base_s + CF::OFF_RAW;
    const u32 bar_full = base_s + CF::OFF_BAR, bar_empty = bar_full + 8 * S;
    const u32 bar_rfull = bar_empty + 8 * S, bar_rempty = bar_rfull + 8 * CF::NR;
    const char** s_arow = reinterpret_cast<const char**>(base + CF::OFF_AROW);
    const u8** s_brow = reinterpret_cast<const u8**>(base + CF::OFF_BROW);
    int* s_slot = reinterpret_cast<int*>(base + CF::OFF_SLOT);
    int* s_expert = s_slot + BM;

    const int tid = threadIdx.x;
    const int row0 = blockIdx.y * BM;

    if (tid == 0) {
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (u32)CF::SMEM) __trap();   // launch.py and Cfg disagree
    }

    // ---- which rows: m_valid rows of A count, the rest are zero / skipped ----
    int m_valid;
    int expert = 0;
    if constexpr (kMoe) {
        if (row0 >= expert_offsets[n_expert]) return;       // past the padded layout: no work
        for (int e = tid; e < n_expert; e += kThreads)
            if (expert_offsets[e] <= row0 && row0 < expert_offsets[e + 1]) *s_expert = e;
        int slot = -1;
        if (tid < BM) {
            slot = sorted_slots[row0 + tid];
            s_slot[tid] = slot;
        }
        // valid slots are a prefix of the tile: segments are padded at their ends, tiles aligned
        m_valid = __syncthreads_count(slot >= 0);
        if (m_valid == 0) return;
        expert = *s_expert;
    } else {
        m_valid = min(BM, M - row0);
    }
    const int n_consumers = m_valid > 64 ? 2 : 1;

    const int esz = A_F32 ? 4 : 2;
    if (tid < BM) {
        const char* p = nullptr;
        if constexpr (MODE == kMoeGateUp) {
            const int slot = s_slot[tid];
            if (slot >= 0) p = static_cast<const char*>(a) + (long long)(slot / topk) * lda * esz;
        } else {
            if (tid < m_valid) p = static_cast<const char*>(a) + (long long)(row0 + tid) * lda * esz;
        }
        s_arow[tid] = p;
    } else if (tid < BM + BN) {
        const int rr = tid - BM;                 // W row rr of the tile
        const u8* base0 = w0 + (long long)expert * w_expert_bytes;
        const u8* p = nullptr;
        if constexpr (kSwi) {
            const u8* base1 = w1 + (long long)expert * w_expert_bytes;
            const int f = blockIdx.x * (BN / 2) + (rr % (BN / 2));
            if (f < N) p = (rr < BN / 2 ? base0 : base1) + (long long)f * w_row_bytes;
        } else {
            const int n = blockIdx.x * BN + rr;
            if (n < N) p = base0 + (long long)n * w_row_bytes;
        }
        s_brow[rr] = p;
    }
    if (tid == 0) {
        for (int i = 0; i < S; ++i) {
            bar_init(bar_full + 8 * i, kProducers * (kAsyncArrive + kPlainArrive));
            bar_init(bar_empty + 8 * i, 4 * n_consumers);
        }
        for (int i = 0; i < CF::NR; ++i) {
            bar_init(bar_rfull + 8 * i, kProducers);
            bar_init(bar_rempty + 8 * i, kProducers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int nsteps = K / BK;

    if (tid < kProducers) {
        // ======================= producers =======================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(CF::PREGS));
        const int p = tid;

        // A and (bf16) W of step s into slot s % S; waits for the slot to be released
        auto issue = [&](int s) {
            const int slot = s % S;
            bar_wait(bar_empty + 8 * slot, ((s / S) & 1) ^ 1);
            const u32 tA = sA + slot * A_TILE;
            const int k0 = s * BK;
            if constexpr (A_F32) {
                static_assert(!A_F32 || kProducers == 256, "f32 A: 4 chunks per producer thread");
                float4 v[8];
#pragma unroll
                for (int i = 0; i < 4; ++i) {    // 1024 chunks of 8 elements, 4 per thread
                    const int j = p + i * kProducers, r = j >> 3, ch = j & 7;
                    const char* src = s_arow[r];
                    if (src) {
                        const float4* q = reinterpret_cast<const float4*>(src + (long long)(k0 + ch * 8) * 4);
                        v[2 * i] = q[0];
                        v[2 * i + 1] = q[1];
                    } else {
                        v[2 * i] = v[2 * i + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = p + i * kProducers, r = j >> 3, ch = j & 7;
                    st_shared_v4(tA + swz(r, ch), pack_bf16(v[2 * i].x, v[2 * i].y), pack_bf16(v[2 * i].z, v[2 * i].w),
                                 pack_bf16(v[2 * i + 1].x, v[2 * i + 1].y), pack_bf16(v[2 * i + 1].z, v[2 * i + 1].w));
                }
            } else {
#pragma unroll
                for (int i = 0; i < BM * 8 / kProducers; ++i) {
                    const int j = p + i * kProducers, r = j >> 3, ch = j & 7;
                    const char* src = s_arow[r];
                    cp_async16(tA + swz(r, ch), src ? src + (long long)(k0 + ch * 8) * 2 : static_cast<const char*>(a),
                               src ? 16 : 0);
                }
            }
            if constexpr (!CF::kRaw) {
                const u32 tB = sB + slot * CF::B_TILE;
#pragma unroll
                for (int i = 0; i < BN * 8 / kProducers; ++i) {
                    const int j = p + i * kProducers, r = j >> 3, ch = j & 7;
                    const u8* src = s_brow[r];
                    cp_async16(tB + swz(r, ch), src ? src + (long long)(k0 + ch * 8) * 2 : w0, src ? 16 : 0);
                }
            }
            if constexpr (kAsyncArrive) cp_async_arrive(bar_full + 8 * slot);
            if constexpr (A_F32 && !CF::kRaw) {
                fence_proxy_async();
                bar_arrive(bar_full + 8 * slot);
            }
            // A_F32 && kRaw: the A stores are published with the dequantised W (one plain arrive)
        };
        // raw unit u (steps [u R, u R + R)) of every W row of the tile into raw slot u % NR
        auto issue_raw = [&](int u) {
            if constexpr (CF::kRaw) {
                const int rs = u % CF::NR;
                bar_wait(bar_rempty + 8 * rs, ((u / CF::NR) & 1) ^ 1);
                const u32 t = sRaw + rs * (BN * CF::SLOT);
                for (int i = p; i < BN * CF::CHUNKS; i += kProducers) {
                    const int r = i / CF::CHUNKS, ch = i - r * CF::CHUNKS;
                    const u8* row = s_brow[r];
                    int n = 0;
                    const u8* src = w0;
                    if (row) {
                        const u64 addr = reinterpret_cast<u64>(row) + (u64)u * CF::UNIT_BYTES;
                        const u64 s16 = (addr & ~(u64)15) + ch * 16;
                        const long long rem = (long long)(addr + CF::UNIT_BYTES) - (long long)s16;
                        n = rem >= 16 ? 16 : (rem > 0 ? (int)rem : 0);
                        if (n) src = reinterpret_cast<const u8*>(s16);
                    }
                    cp_async16(t + r * CF::SLOT + ch * 16, src, n);
                }
                cp_async_arrive(bar_rfull + 8 * rs);
            }
        };
        // dequantise step s's [BN x 64] slice of W into the bf16 tile of slot s % S (free: issue(s)
        // waited for it) and publish it (with the f32 A stores of issue(s), if any)
        auto dequant = [&](int s) {
            if constexpr (CF::kRaw) {
                const int u = s / CF::R, sub = s - u * CF::R, rs = u % CF::NR;
                bar_wait(bar_rfull + 8 * rs, (u / CF::NR) & 1);
                const u8* raw = base + CF::OFF_RAW + rs * (BN * CF::SLOT);
                const u32 tB = sB + (s % S) * CF::B_TILE;
                if constexpr (CF::kFastDq) {
                    // thread p: W row r = p % BN (8 consecutive threads = 8 rows: conflict-free
                    // 16-byte reads of the odd-chunk raw slots and swizzled stores), half hh
                    static_assert(kProducers == 2 * BN, "fast dequant: two producer threads per W row");
                    const int r = p % BN, hh = p / BN;
                    const u8* row = s_brow[r];
                    const int mis = row ? (int)((reinterpret_cast<u64>(row) + (u64)u * CF::UNIT_BYTES) & 15) : 0;
                    const u32 b = sRaw + rs * (BN * CF::SLOT) + r * CF::SLOT + mis;
                    u32 o[16];
                    int ch[4];
                    if constexpr (W == GGML_Q4_K) {
                        dq90::q4_k(b, sub, hh, o);
                        ch[0] = 2 * hh; ch[1] = 2 * hh + 1; ch[2] = 4 + 2 * hh; ch[3] = 5 + 2 * hh;
                    } else {
                        if constexpr (W == GGML_Q6_K) dq90::q6_k(b, sub, hh, o);
                        else dq90::q8_0(b, hh, o);
#pragma unroll
                        for (int i = 0; i < 4; ++i) ch[i] = 4 * hh + i;
                    }
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        st_shared_v4(tB + swz(r, ch[i]), o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
                } else {   // generic: dequant8 per 8-element chunk, byte-wise
#pragma unroll
                    for (int i = 0; i < BN * 8 / kProducers; ++i) {
                        const int j = p + i * kProducers, r = j >> 3, ch = j & 7;
                        const u8* row = s_brow[r];
                        const int mis = row ? (int)((reinterpret_cast<u64>(row) + (u64)u * CF::UNIT_BYTES) & 15) : 0;
                        const int e = sub * BK + ch * 8;     // element within the unit
                        float f[8];
                        dequant8<W>(raw + r * CF::SLOT + mis + (e / CF::QK) * CF::QBYTES, (e % CF::QK) >> 3, f);
                        st_shared_v4(tB + swz(r, ch), pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]),
                                     pack_bf16(f[4], f[5]), pack_bf16(f[6], f[7]));
                    }
                }
                fence_proxy_async();
                bar_arrive(bar_full + 8 * (s % S));
                if (sub == CF::R - 1 || s == nsteps - 1) bar_arrive(bar_rempty + 8 * rs);
            }
        };

        if constexpr (!CF::kRaw) {
            for (int s = 0; s < nsteps; ++s) issue(s);
        } else {
            // lead of S-1 steps: issue(s + S - 1) waits for the release of step s - 1, which the
            // consumers give after step s's wgmma were issued, i.e. after dequant(s) below.
            int next_a = 0, next_u = 0;
            auto ahead = [&](int upto) {         // issue every step < upto and the raw units they need
                upto = min(upto, nsteps);
                while (next_u * CF::R < upto) issue_raw(next_u++);
                while (next_a < upto) issue(next_a++);
            };
            ahead(S - 1);
            for (int s = 0; s < nsteps; ++s) {
                dequant(s);
                ahead(s + S);
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        // ======================= consumers =======================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(CF::CREGS));
        const int cw = (tid - kProducers) >> 7;          // 0, 1: tile rows [64 cw, 64 cw + 64)
        const bool active = cw < n_consumers;
        if (!active && MODE != kMoeGateUp) return;   // its rows are past M / padding slots
        const int t = tid & 127, warp = t >> 5, lane = t & 31;

        float acc[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

        // (an inactive kMoeGateUp consumer skips the loop and writes its padding rows of h as 0)
        for (int s = 0; active && s < nsteps; ++s) {
            const int slot = s % S;
            bar_wait(bar_full + 8 * slot, (s / S) & 1);
            fence_proxy_async();
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
            const u64 da = smem_desc(sA + slot * A_TILE + cw * 64 * 128);
            const u64 db = smem_desc(sB + slot * CF::B_TILE);
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wgmma<BN>(acc, da + 2 * kk, db + 2 * kk);   // +32 bytes
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            if (s > 0 && lane == 0) bar_arrive(bar_empty + 8 * ((s - 1) % S));
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");

        // ---- epilogue: acc[4j + v] = row 16 warp + lane/4 + 8 (v >> 1), column 8j + 2 (lane & 3) + (v & 1)
        const int rbase = cw * 64 + warp * 16 + (lane >> 2), c2 = (lane & 3) * 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rbase + 8 * h;
            if constexpr (MODE == kGemm) {
                const int m = row0 + r;
                if (m >= M) continue;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    const int n = blockIdx.x * BN + 8 * j + c2;
                    float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
                    if (c_bf16) {
                        __nv_bfloat16* o = static_cast<__nv_bfloat16*>(c) + (long long)m * ldc + n;
                        if (n + 1 < N) {
                            if (accumulate) {
                                const __nv_bfloat162 old = *reinterpret_cast<const __nv_bfloat162*>(o);
                                v0 += __low2float(old);
                                v1 += __high2float(old);
                            }
                            *reinterpret_cast<u32*>(o) = pack_bf16(v0, v1);
                        } else if (n < N) {
                            if (accumulate) v0 += __bfloat162float(o[0]);
                            o[0] = __float2bfloat16_rn(v0);
                        }
                    } else {
                        float* o = static_cast<float*>(c) + (long long)m * ldc + n;
                        if (n + 1 < N) {
                            if (accumulate) {
                                const float2 old = *reinterpret_cast<const float2*>(o);
                                v0 += old.x;
                                v1 += old.y;
                            }
                            *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
                        } else if (n < N) {
                            o[0] = accumulate ? o[0] + v0 : v0;
                        }
                    }
                }
            } else if constexpr (kSwi) {
                const int m = row0 + r;     // kMoeGateUp: every row of the tile is inside h
                if (MODE == kSwiglu && m >= M) continue;
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) {
                    const int f = blockIdx.x * (BN / 2) + 8 * j + c2;
                    const float v0 = silu(acc[4 * j + 2 * h]) * acc[4 * (j + BN / 16) + 2 * h];
                    const float v1 = silu(acc[4 * j + 2 * h + 1]) * acc[4 * (j + BN / 16) + 2 * h + 1];
                    if (c_bf16) {
                        __nv_bfloat16* o = static_cast<__nv_bfloat16*>(c) + (long long)m * ldc + f;
                        if (f + 1 < N) *reinterpret_cast<u32*>(o) = pack_bf16(v0, v1);
                        else if (f < N) o[0] = __float2bfloat16_rn(v0);
                    } else {
                        float* o = static_cast<float*>(c) + (long long)m * ldc + f;
                        if (f + 1 < N) *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
                        else if (f < N) o[0] = v0;
                    }
                }
            } else {   // kMoeDown
                const int slot = s_slot[r];
                if (slot < 0) continue;
                const float wgt = route_w[slot];
                float* orow = static_cast<float*>(c) + (long long)(slot / topk) * ldc;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    const int n = blockIdx.x * BN + 8 * j + c2;
                    const float v0 = acc[4 * j + 2 * h] * wgt, v1 = acc[4 * j + 2 * h + 1] * wgt;
                    if (n + 1 < N) red_add2(orow + n, v0, v1);
                    else if (n < N) atomicAdd(orow + n, v0);
                }
            }
        }
    }
}

}  // namespace g90
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
