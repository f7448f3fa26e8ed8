// Hopper (sm_90a) GEMM core shared by the dense GEMMs (gemm/gemm90.cu) and the MoE grouped GEMMs
// (moe/grouped_gemm90.cu):   C[M, N] = A[M, K] @ W[N, K]^T, with the same modes, operands and
// meaning as gemm_core.cuh (the mma.sync core used below sm_90 and as the fallback).
//
// Block: 3 or 4 warpgroups (Cfg: 384 threads for bf16 A and W, 512 otherwise), warp-specialised.
//   the first 1 or 2 warpgroups (producers, setmaxnreg 96): load A and W for step s into the
//     ring slot s % S, and signal full[slot]. bf16 operands go by cp.async (16 B, zero-filled
//     past the valid rows / K) straight into the 128-byte-swizzled tile, completing on the
//     mbarrier through cp.async.mbarrier.arrive.noinc. f32 A is read into registers, rounded to
//     bf16 and stored into the swizzled tile. GGML W: the raw blocks go by cp.async into a raw
//     ring (own full/empty mbarriers) and the producers dequantise each step's [BN x 64] slice
//     into the swizzled bf16 tile (st.shared + fence.proxy.async, then a plain arrive). Q4_K,
//     Q6_K and Q8_0 use the word-wise decoders of gemm/dequant90.cuh (two threads per W row,
//     16-byte shared loads, prmt int->float, scales decoded once per sub-block); the define
//     G90_GENERIC_DEQUANT (launch.py GGFUSE_DEQUANT=generic) falls back to ggml_quants' dequant8.
//     Per step s the producers issue A (and raw W units ahead) and dequantise W as soon as the
//     ring slot is free, so the dequantisation also runs up to S - 1 steps ahead of the wgmma.
//   the last 2 warpgroups (consumers, setmaxnreg 200 / 160): consumer c owns tile rows
//     [64c, 64c + 64) and runs wgmma.mma_async m64nBNk16 (4 per 64-wide step) on the shared
//     tiles, f32 accumulators in registers; after step s's wgmma are issued it waits until at
//     most one group is pending (step s-1 done) and releases slot s-1 (empty[slot]); the last
//     step's slot is released before the epilogue. A consumer whose 64 rows are all past the
//     valid rows issues no wgmma but still waits and releases every step (empty[] always
//     counts the 8 consumer warps).
//   MoE down's epilogue pairs lanes (shuffle) so that each red.global.add.v4.f32 adds 4
//   consecutive columns of one output row.
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
#include "gemm/epilogue.cuh"
#include "common.cuh"

namespace g90 {

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int BK = 64;
constexpr int kStages = 4;
constexpr int kMaxExperts = 512;                // wide MoE tiles: per-expert tile prefix in shared memory

enum Mode { kGemm = 0, kSwiglu = 1, kMoeGateUp = 2, kMoeDown = 3 };

template<int W, bool A_F32, bool WIDE = false> struct Cfg {
    static constexpr bool kRaw = W != GGML_BF16;
    // WIDE (MoE modes, GGML W, bf16 A, persistent): 256-row tiles, each consumer warpgroup owns
    // 128 rows as two m64 halves (128 accumulators in 160 registers); 3 stages (the A ring doubles)
    static constexpr int BM = WIDE ? 256 : 128;
    static constexpr int A_TILE = BM * BK * 2;
    // bf16 A and W: 128 x 256 tiles, 1 producer warpgroup (cp.async only), 384 threads (the
    // entry register cap of 168 must hold a consumer's 128 accumulators). Otherwise 128 x 128
    // tiles and 2 producer warpgroups (dequantisation / f32 conversion), 512 threads.
    static constexpr int BN = (kRaw || A_F32) ? 128 : 256;
    static constexpr int PRODUCERS = BN == 256 ? 128 : 256;
    static constexpr int THREADS = PRODUCERS + 256;
    static constexpr int PREGS = 96;            // setmaxnreg: P * PREGS + 256 * CREGS <= 65536
    static constexpr int CREGS = BN == 256 ? 200 : 160;   // (bf16 / bf16: producers spill at 72)
    static constexpr int B_TILE = BN * BK * 2;
    static constexpr int S = WIDE ? 3 : kStages;
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
    // full[S] empty[S] rfull[NR] rempty[NR] tbl_full[2] tbl_empty[2]
    static constexpr int OFF_BAR = OFF_RAW + RAW_BYTES;
    // per-item tables, double-buffered: A row pointers [2][BM], W row pointers [2][BN], slots
    // [2][BM], then info [2][4] ints (valid rows, expert)
    static constexpr int OFF_AROW = OFF_BAR + (2 * S + 2 * NR + 4) * 8;
    static constexpr int OFF_BROW = OFF_AROW + 2 * BM * 8;
    static constexpr int OFF_SLOT = OFF_BROW + 2 * BN * 8;
    // WIDE: tile prefix over experts [kMaxExperts + 1] ints
    static constexpr int OFF_TPRE = OFF_SLOT + 2 * BM * 4 + 32;
    static constexpr int END = OFF_TPRE + (WIDE ? (kMaxExperts + 1) * 4 + 12 : 0);
    static constexpr int SMEM = END + 1024;                              // + alignment slack
    static_assert(!kRaw || R * BK == UNIT_ELEMS, "a raw unit is a whole number of steps");
    static_assert(!kRaw || (R == 1 ? NR >= S - 1 : NR * R >= S - 1 + R), "raw ring too shallow for the lead");
    static_assert(SMEM <= 227 * 1024, "shared memory");
    static_assert(!WIDE || BN == 128, "wide tiles: 128-column W tiles");
};
template<int W, bool A_F32, bool WIDE = false> __host__ __device__ constexpr int smem_bytes() {
    return Cfg<W, A_F32, WIDE>::SMEM;
}
template<int N> struct IC { static constexpr int value = N; };

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
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" :: "l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }
// The GLU's gate activation (ACT template argument of gemm_block): kSilu (SwiGLU) or kGeluTanh
// (Gemma's GELU GLU: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), kernels/dense/ref.py gelu).
enum Act { kSilu = 0, kGeluTanh = 1 };
template<int ACT>
__device__ __forceinline__ float glu_act(float g) {
    if constexpr (ACT == kGeluTanh) return gelu_tanh(g);     // common.cuh
    else return silu(g);
}

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
//
// Work items: item = (row tile rt, column tile nt), numbered rt * ntn + nt. PERSIST = false: one
// item per block, (blockIdx.y, blockIdx.x). PERSIST = true: a grid of about one block per SM
// walks items blockIdx.x, + gridDim.x, ... over the row tiles that exist (dense: ceil(M / BM);
// MoE: expert_offsets[E] / BM of them, or the wide tiles, read on the device), so a block's
// next item is loaded while its consumers finish the current one (no per-tile launch, prologue
// or pipeline fill; the epilogue overlaps the next item's loads).
// The ring continues across items: global step g = j * nsteps + s for the block's j-th item.
// Per-item tables (A / W row pointers, slots, valid rows, expert) are double-buffered (buffer
// j & 1) and handed over by two more mbarriers: tbl_full[b] (producers -> consumers: the tables
// of item j are written) and tbl_empty[b] (consumers -> producers: item j's epilogue is done,
// buffer b may take item j + 2).
template<int W, bool A_F32, int MODE, bool PERSIST = false, bool WIDE = false, int ACT = kSilu>
__device__ __forceinline__ void gemm_block(
    const void* __restrict__ a, long long lda,
    const u8* __restrict__ w0, const u8* __restrict__ w1, long long w_row_bytes, long long w_expert_bytes,
    int M, int N, int K,
    void* __restrict__ c, long long ldc, int c_bf16, int accumulate,
    const int* __restrict__ sorted_slots, const int* __restrict__ expert_offsets, int n_expert, int topk,
    const float* __restrict__ route_w, const unsigned long long* __restrict__ wtab = nullptr)
{
    typedef Cfg<W, A_F32, WIDE> CF;
    constexpr int BN = CF::BN, S = CF::S, kProducers = CF::PRODUCERS, BM = CF::BM, A_TILE = CF::A_TILE;
    constexpr int MH = BM / 128;          // m64 halves per consumer warpgroup
    constexpr bool kSwi = MODE == kSwiglu || MODE == kMoeGateUp;
    constexpr bool kMoe = MODE == kMoeGateUp || MODE == kMoeDown;
    static_assert(!WIDE || (PERSIST && kMoe && CF::kRaw && !A_F32), "wide tiles: persistent MoE, GGML W, bf16 A");
    static_assert(kProducers >= BM, "a producer thread per tile row (slot table, valid-row count)");
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
    const u32 bar_tfull = bar_rempty + 8 * CF::NR, bar_tempty = bar_tfull + 16;
    const char** s_arow = reinterpret_cast<const char**>(base + CF::OFF_AROW);     // [2][BM]
    const u8** s_brow = reinterpret_cast<const u8**>(base + CF::OFF_BROW);         // [2][BN]
    int* s_slot = reinterpret_cast<int*>(base + CF::OFF_SLOT);                      // [2][BM]
    int* s_info = s_slot + 2 * BM;                                                  // [2][4]: m_valid, expert

    const int tid = threadIdx.x;

    if (tid == 0) {
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (u32)CF::SMEM) __trap();   // launch.py and Cfg disagree
    }

    // ---- the items of this block (the same decision in every thread: early exits are whole-block)
    const int ntn = PERSIST ? (kSwi ? (N + BN / 2 - 1) / (BN / 2) : (N + BN - 1) / BN) : (int)gridDim.x;
    int n_rt;
    int* s_tpre = reinterpret_cast<int*>(base + CF::OFF_TPRE);                      // WIDE: [E + 1]
    if constexpr (WIDE) {
        // wide tiles never cross an expert: expert e's segment [off[e], off[e+1]) (a multiple of
        // 128 rows) is cut into ceil(len / 256) tiles; s_tpre = exclusive prefix of those counts
        if (n_expert > kMaxExperts) __trap();
        if (tid < 32) {
            int run = 0;
            for (int e0 = 0; e0 < n_expert; e0 += 32) {
                const int e = e0 + tid;
                const int cnt = e < n_expert ? (expert_offsets[e + 1] - expert_offsets[e] + BM - 1) / BM : 0;
                int v = cnt;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int y = __shfl_up_sync(0xffffffffu, v, o);
                    if (tid >= o) v += y;
                }
                if (e < n_expert) s_tpre[e] = run + v - cnt;
                run += __shfl_sync(0xffffffffu, v, 31);
            }
            if (tid == 0) s_tpre[n_expert] = run;
        }
        __syncthreads();
        n_rt = s_tpre[n_expert];
    } else if constexpr (kMoe) {
        n_rt = expert_offsets[n_expert] / BM;   // row tiles inside the padded layout
    } else {
        n_rt = (M + BM - 1) / BM;
    }
    const int n_items = n_rt * ntn;
    const int first = PERSIST ? (int)blockIdx.x : (int)(blockIdx.y * gridDim.x + blockIdx.x);
    const int stride = PERSIST ? (int)gridDim.x : n_items;
    if (first >= n_items) return;

    if (tid == 0) {
        for (int i = 0; i < S; ++i) {
            bar_init(bar_full + 8 * i, kProducers * (kAsyncArrive + kPlainArrive));
            bar_init(bar_empty + 8 * i, 8);                  // every consumer warp, every step
        }
        for (int i = 0; i < CF::NR; ++i) {
            bar_init(bar_rfull + 8 * i, kProducers);
            bar_init(bar_rempty + 8 * i, kProducers);
        }
        for (int i = 0; i < 2; ++i) {
            bar_init(bar_tfull + 8 * i, kProducers);
            bar_init(bar_tempty + 8 * i, 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int nsteps = K / BK;
    const int upi = (nsteps + CF::R - 1) / CF::R;          // raw units per item

    if (tid < kProducers) {
        // ======================= producers =======================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(CF::PREGS));
        const int p = tid;
        int j = 0;                            // the block's item counter

        // A and (bf16) W of global step g (item step s) into slot g % S; waits for the slot.
        // (arow / brow: the item's tables; passed, not captured, so that they stay in registers)
        auto issue = [&](int g, int s, const char* const* arow, const u8* const* brow) {
            const int slot = g % S;
            bar_wait(bar_empty + 8 * slot, ((g / S) & 1) ^ 1);
            const u32 tA = sA + slot * A_TILE;
            const int k0 = s * BK;
            if constexpr (A_F32) {
                static_assert(!A_F32 || kProducers == 256, "f32 A: 4 chunks per producer thread and pass");
#pragma unroll
                for (int i0 = 0; i0 < BM * 8 / kProducers; i0 += 4) {   // BM * 8 chunks of 8 elements
                float4 v[8];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int q = p + (i0 + i) * kProducers, r = q >> 3, ch = q & 7;
                    const char* src = arow[r];
                    if (src) {
                        const float4* qq = reinterpret_cast<const float4*>(src + (long long)(k0 + ch * 8) * 4);
                        v[2 * i] = qq[0];
                        v[2 * i + 1] = qq[1];
                    } else {
                        v[2 * i] = v[2 * i + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int q = p + (i0 + i) * kProducers, r = q >> 3, ch = q & 7;
                    st_shared_v4(tA + swz(r, ch), pack_bf16(v[2 * i].x, v[2 * i].y), pack_bf16(v[2 * i].z, v[2 * i].w),
                                 pack_bf16(v[2 * i + 1].x, v[2 * i + 1].y), pack_bf16(v[2 * i + 1].z, v[2 * i + 1].w));
                }
                }
            } else {
                // (WIDE: two rounds of 4, not unrolled: the producers' 96 registers)
                constexpr int NA = BM * 8 / kProducers, NU = WIDE ? 4 : NA;
#pragma unroll 1
                for (int i0 = 0; i0 < NA; i0 += NU) {
#pragma unroll
                for (int i = i0; i < i0 + NU; ++i) {
                    const int q = p + i * kProducers, r = q >> 3, ch = q & 7;
                    const char* src = arow[r];
                    cp_async16(tA + swz(r, ch), src ? src + (long long)(k0 + ch * 8) * 2 : static_cast<const char*>(a),
                               src ? 16 : 0);
                }
                }
            }
            if constexpr (!CF::kRaw) {
                const u32 tB = sB + slot * CF::B_TILE;
#pragma unroll
                for (int i = 0; i < BN * 8 / kProducers; ++i) {
                    const int q = p + i * kProducers, r = q >> 3, ch = q & 7;
                    const u8* src = brow[r];
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
        // raw unit u of the item (its steps [u R, u R + R)) = global unit gu of the block, for
        // every W row of the tile, into raw slot gu % NR
        auto issue_raw = [&](int gu, int u, const u8* const* brow) {
            if constexpr (CF::kRaw) {
                const int rs = gu % CF::NR;
                bar_wait(bar_rempty + 8 * rs, ((gu / CF::NR) & 1) ^ 1);
                const u32 t = sRaw + rs * (BN * CF::SLOT);
                for (int i = p; i < BN * CF::CHUNKS; i += kProducers) {
                    const int r = i / CF::CHUNKS, ch = i - r * CF::CHUNKS;
                    const u8* row = brow[r];
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
        // dequantise global step g (item step s)'s [BN x 64] slice of W into the bf16 tile of
        // slot g % S (free: issue(g, s) waited for it) and publish it (with the f32 A stores of
        // issue(g, s), if any)
        auto dequant = [&](int g, int s, int gu0, const u8* const* brow) {
            if constexpr (CF::kRaw) {
                const int u = s / CF::R, sub = s - u * CF::R, gu = gu0 + u, rs = gu % CF::NR;
                bar_wait(bar_rfull + 8 * rs, (gu / CF::NR) & 1);
                const u8* raw = base + CF::OFF_RAW + rs * (BN * CF::SLOT);
                const u32 tB = sB + (g % S) * CF::B_TILE;
                if constexpr (CF::kFastDq) {
                    // thread p: W row r = p % BN (8 consecutive threads = 8 rows: conflict-free
                    // 16-byte reads of the odd-chunk raw slots and swizzled stores), half hh
                    static_assert(kProducers == 2 * BN, "fast dequant: two producer threads per W row");
                    const int r = p % BN, hh = p / BN;
                    const u8* row = brow[r];
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
                        const int q = p + i * kProducers, r = q >> 3, ch = q & 7;
                        const u8* row = brow[r];
                        const int mis = row ? (int)((reinterpret_cast<u64>(row) + (u64)u * CF::UNIT_BYTES) & 15) : 0;
                        const int e = sub * BK + ch * 8;     // element within the unit
                        float f[8];
                        dequant8<W>(raw + r * CF::SLOT + mis + (e / CF::QK) * CF::QBYTES, (e % CF::QK) >> 3, f);
                        st_shared_v4(tB + swz(r, ch), pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]),
                                     pack_bf16(f[4], f[5]), pack_bf16(f[6], f[7]));
                    }
                }
                fence_proxy_async();
                bar_arrive(bar_full + 8 * (g % S));
                if (sub == CF::R - 1 || s == nsteps - 1) bar_arrive(bar_rempty + 8 * rs);
            }
        };

        for (int it = first; it < n_items; it += stride, ++j) {
            const int b = j & 1, rt = it / ntn, nt = it - rt * ntn;
            int row0 = rt * BM;
            const char** ar = s_arow + b * BM;
            const u8** br = s_brow + b * BN;
            int* sl = s_slot + b * BM;
            // ---- the item's tables into buffer b (free once item j - 2's epilogue is done)
            bar_wait(bar_tempty + 8 * b, ((j >> 1) & 1) ^ 1);
            int m_valid;
            if constexpr (WIDE) {
                // the wide tile rt: expert e with s_tpre[e] <= rt < s_tpre[e + 1], its first row
                // and the end of the expert's segment (rows past it belong to the next expert)
                for (int e = p; e < n_expert; e += kProducers)
                    if (s_tpre[e] <= rt && rt < s_tpre[e + 1]) {
                        s_info[4 * b + 1] = e;
                        s_info[4 * b + 2] = expert_offsets[e] + (rt - s_tpre[e]) * BM;
                        s_info[4 * b + 3] = expert_offsets[e + 1];
                    }
                asm volatile("bar.sync 1, %0;\n" :: "n"(kProducers) : "memory");
                row0 = s_info[4 * b + 2];
            }
            if constexpr (kMoe) {
                if constexpr (!WIDE) {
                    for (int e = p; e < n_expert; e += kProducers)
                        if (expert_offsets[e] <= row0 && row0 < expert_offsets[e + 1]) s_info[4 * b + 1] = e;
                }
                int slot = -1;
                if (p < BM) {
                    if (!WIDE || row0 + p < s_info[4 * b + 3]) slot = sorted_slots[row0 + p];
                    sl[p] = slot;
                }
                // valid slots are a prefix of the tile: segments are padded at their ends, tiles
                // aligned. The count is also a producer barrier: s_info[.. + 1] is visible below.
                u32 cnt;
                asm volatile("{\n .reg .pred q;\n setp.ne.u32 q, %1, 0;\n bar.red.popc.u32 %0, 1, %2, q;\n}\n"
                             : "=r"(cnt) : "r"((u32)(slot >= 0)), "n"(kProducers) : "memory");
                m_valid = (int)cnt;
            } else {
                m_valid = min(BM, M - row0);
            }
            const int expert = kMoe ? s_info[4 * b + 1] : 0;
            if (p < BM) {
                const char* q = nullptr;
                if constexpr (MODE == kMoeGateUp) {
                    const int slot = sl[p];
                    if (slot >= 0) q = static_cast<const char*>(a) + (long long)(slot / topk) * lda * (A_F32 ? 4 : 2);
                } else {
                    if (p < m_valid) q = static_cast<const char*>(a) + (long long)(row0 + p) * lda * (A_F32 ? 4 : 2);
                }
                ar[p] = q;
            }
            for (int rr = p; rr < BN; rr += kProducers) {     // W row rr of the tile
                const u8* base0 = expert_weights(wtab, expert, w0, expert, w_expert_bytes);
                const u8* q = nullptr;
                if constexpr (kSwi) {
                    const u8* base1 = expert_weights(wtab, n_expert + expert, w1, expert, w_expert_bytes);
                    const int f = nt * (BN / 2) + (rr % (BN / 2));
                    if (f < N) q = (rr < BN / 2 ? base0 : base1) + (long long)f * w_row_bytes;
                } else {
                    const int n = nt * BN + rr;
                    if (n < N) q = base0 + (long long)n * w_row_bytes;
                }
                br[rr] = q;
            }
            if (p == 0) s_info[4 * b] = m_valid;
            asm volatile("bar.sync 1, %0;\n" :: "n"(kProducers) : "memory");
            bar_arrive(bar_tfull + 8 * b);   // consumers may read s_slot / s_info of buffer b

            // ---- the item's steps. Raw units go a unit (NR - 1 units) ahead of the dequant:
            // issue_raw(u) waits for the release of unit u - NR, i.e. for every producer to have
            // dequantised steps < (u - NR + 1) R <= s, which they all reach without waiting on
            // this thread. The dequant of step s runs as soon as its ring slot is free (released
            // by the consumers after step s - S), up to S - 1 steps ahead of the wgmma.
            const int g0 = j * nsteps;
            int next_u = 0;
            for (int s = 0; s < nsteps; ++s) {
                if constexpr (CF::kRaw) {
                    while (next_u < upi && next_u * CF::R <= s + (CF::NR - 1) * CF::R) {
                        issue_raw(j * upi + next_u, next_u, br);
                        ++next_u;
                    }
                }
                issue(g0 + s, s, ar, br);
                dequant(g0 + s, s, j * upi, br);
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        // ======================= consumers =======================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(CF::CREGS));
        // consumer cw owns tile rows [64 MH cw, 64 MH (cw + 1)): MH m64 halves (2 for WIDE tiles)
        const int cw = (tid - kProducers) >> 7;
        const int t = tid & 127, warp = t >> 5, lane = t & 31;
        int j = 0;
        for (int it = first; it < n_items; it += stride, ++j) {
            const int b = j & 1, rt = it / ntn, nt = it - rt * ntn, g0 = j * nsteps;
            bar_wait(bar_tfull + 8 * b, (j >> 1) & 1);
            const int m_valid = s_info[4 * b];
            const int row0 = WIDE ? s_info[4 * b + 2] : rt * BM;
            const int seg_rows = WIDE ? s_info[4 * b + 3] - row0 : BM;    // rows of the tile inside h
            const int* sl = s_slot + b * BM;
            // a half whose 64 rows are all past the valid rows (M, padding slots) issues no
            // wgmma; a consumer with no active half still takes part in the ring (its warps
            // release every step)
            const int nh = min(MH, max(0, (m_valid - 64 * MH * cw + 63) / 64));

            float acc[MH][BN / 2];
#pragma unroll
            for (int hf = 0; hf < MH; ++hf)
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) acc[hf][i] = 0.f;

            auto steps = [&](auto nh_c) {
                constexpr int NH = decltype(nh_c)::value;
                for (int s = 0; s < nsteps; ++s) {
                    const int g = g0 + s, slot = g % S;
                    bar_wait(bar_full + 8 * slot, (g / S) & 1);
                    fence_proxy_async();
                    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
                    const u64 db = smem_desc(sB + slot * CF::B_TILE);
#pragma unroll
                    for (int hf = 0; hf < NH; ++hf) {
                        const u64 da = smem_desc(sA + slot * A_TILE + (cw * MH + hf) * 64 * 128);
#pragma unroll
                        for (int kk = 0; kk < BK / 16; ++kk) wgmma<BN>(acc[hf], da + 2 * kk, db + 2 * kk);   // +32 bytes
                    }
                    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                    if (s > 0 && lane == 0) bar_arrive(bar_empty + 8 * ((g - 1) % S));
                }
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                if (lane == 0) bar_arrive(bar_empty + 8 * ((g0 + nsteps - 1) % S));
            };
            if (nh == MH) {
                steps(IC<MH>());
            } else if (MH > 1 && nh == 1) {
                steps(IC<1>());
            } else {
                for (int s = 0; s < nsteps; ++s) {
                    const int g = g0 + s, slot = g % S;
                    bar_wait(bar_full + 8 * slot, (g / S) & 1);
                    __syncwarp();
                    if (lane == 0) bar_arrive(bar_empty + 8 * slot);
                }
            }
#pragma unroll
            for (int hf = 0; hf < MH; ++hf)
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) asm volatile("" : "+f"(acc[hf][i]) :: "memory");

            // ---- epilogue: acc[hf][4j + v] = row 64 (MH cw + hf) + 16 warp + lane/4 + 8 (v >> 1),
            // column 8j + 2 (lane & 3) + (v & 1)
#pragma unroll
            for (int hf = 0; hf < MH; ++hf) {
            const int rbase = (cw * MH + hf) * 64 + warp * 16 + (lane >> 2), c2 = (lane & 3) * 2;
            const bool hactive = hf < nh;
            if constexpr (MODE == kMoeDown) {
                // lanes 2i and 2i+1 swap halves so that each adds 4 consecutive columns of one row
                // with one red.v4: the even lane row rbase (columns c2 .. c2+3), the odd lane row
                // rbase + 8 (columns c2-2 .. c2+1)
                const bool odd = lane & 1;
                const int r = rbase + (odd ? 8 : 0);
                const int slot = hactive ? sl[r] : -1;
                const float wgt = slot >= 0 ? route_w[slot] : 0.f;
                float* orow = static_cast<float*>(c) + (long long)(slot >= 0 ? slot / topk : 0) * ldc;
                const bool v4ok = ((ldc & 3) == 0) && ((reinterpret_cast<u64>(c) & 15) == 0);
#pragma unroll
                for (int jj = 0; jj < BN / 8; ++jj) {
                    const float s0 = odd ? acc[hf][4 * jj] : acc[hf][4 * jj + 2], s1 = odd ? acc[hf][4 * jj + 1] : acc[hf][4 * jj + 3];
                    const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
                    float v[4];
                    if (odd) { v[0] = r0; v[1] = r1; v[2] = acc[hf][4 * jj + 2]; v[3] = acc[hf][4 * jj + 3]; }
                    else { v[0] = acc[hf][4 * jj]; v[1] = acc[hf][4 * jj + 1]; v[2] = r0; v[3] = r1; }
                    const int n = nt * BN + 8 * jj + (odd ? c2 - 2 : c2);
                    if (slot < 0) continue;
                    if (v4ok && n + 3 < N) {
                        red_add4(orow + n, v[0] * wgt, v[1] * wgt, v[2] * wgt, v[3] * wgt);
                    } else {
#pragma unroll
                        for (int i = 0; i < 4; ++i)
                            if (n + i < N) atomicAdd(orow + n + i, v[i] * wgt);
                    }
                }
            } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = rbase + 8 * h;
                if constexpr (MODE == kGemm) {
                    const int m = row0 + r;
                    if (m >= M) continue;
#pragma unroll
                    for (int jj = 0; jj < BN / 8; ++jj) {
                        const int n = nt * BN + 8 * jj + c2;
                        gepi::store_pair(c, (long long)m * ldc, n, N, acc[hf][4 * jj + 2 * h],
                                         acc[hf][4 * jj + 2 * h + 1], c_bf16, accumulate);
                    }
                } else {   // kSwiglu, kMoeGateUp
                    const int m = row0 + r;     // kMoeGateUp: every row of the segment is inside h
                    if (MODE == kSwiglu && m >= M) continue;
                    if (MODE == kMoeGateUp && r >= seg_rows) continue;   // WIDE: the next expert's rows
#pragma unroll
                    for (int jj = 0; jj < BN / 16; ++jj) {
                        const int f = nt * (BN / 2) + 8 * jj + c2;
                        const float v0 = glu_act<ACT>(acc[hf][4 * jj + 2 * h]) * acc[hf][4 * (jj + BN / 16) + 2 * h];
                        const float v1 = glu_act<ACT>(acc[hf][4 * jj + 2 * h + 1]) * acc[hf][4 * (jj + BN / 16) + 2 * h + 1];
                        gepi::store_pair(c, (long long)m * ldc, f, N, v0, v1, c_bf16, 0);
                    }
                }
            }
            }
            }   // hf
            bar_arrive(bar_tempty + 8 * b);   // this thread is done with buffer b's tables
        }
    }
}

}  // namespace g90
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
