// Tensor-core GEMM core shared by the dense GEMMs (gemm/gemm.cu) and the MoE grouped GEMMs
// (moe/grouped_gemm.cu):   C[M, N] = A[M, K] @ W[N, K]^T
//
// A: activations, f32 or bf16, row-major with leading dimension lda (elements).
// W: a GGUF weight as stored: N rows of K elements, each row a run of GGML blocks (or bf16).
//
// Block tile 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
// 4 m16 x 4 n8 fragments of mma.sync.m16n8k16 bf16 -> f32. Both operands reach the tensor cores
// as bf16 tiles [128 rows][32 k] in shared memory, 64 bytes a row, 16-byte chunks XOR-swizzled
// by (row >> 1) & 3 so that every ldmatrix phase (8 rows, one chunk column) hits 8 different
// bank groups.
//
// Pipeline, one compute step s = 32 k per iteration, D = kStages - 1 steps of prefetch:
//   A (bf16):   cp.async 16 B straight into the A ring (kStages tiles).
//   A (f32):    ld.global float4 into registers at the top of the iteration, converted and
//               stored into the A ring at its end (after this step's MMAs were issued).
//   W (bf16):   cp.async into the B ring, like A.
//   W (GGML):   cp.async of the raw blocks into a raw ring (a raw block = QK elements: one
//               compute step for 32-element types, eight for K-quants), and dequantisation of
//               step s+1 into a double-buffered bf16 tile while step s's MMAs run, so the
//               integer work of the dequant overlaps the tensor cores. Raw rows keep their
//               global address modulo 16 (we copy the 16-byte aligned span), so dequant8 sees
//               the same alignment as in global memory (Q6_K blocks are 210 bytes).
// One __syncthreads per step; the invariants are spelled out at the main loop.
//
// Rows of A beyond the valid rows are zero-filled and whole m16 fragments past the last valid
// row skip their ldmatrix + mma (warp-uniform), which is what makes a mostly-empty MoE tile
// cheap. Rows of W beyond N are zero-filled; their columns are never stored.
#pragma once
#include <cuda_bf16.h>
#include "quant/ggml_quants.cuh"
#include "gemm/epilogue.cuh"
#include "common.cuh"

namespace gemm {

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int kThreads = 256;
constexpr int BM = 128, BN = 128, BK = 32;
constexpr int MT = 4, NT = 4;               // per warp: 4 m16 x 4 n8 fragments (64 x 32)
constexpr int TILE_BYTES = 128 * BK * 2;    // one bf16 tile [128][32]
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kStages = 3;                  // sm_89: 99 KB of shared memory per block at most
#else
constexpr int kStages = 4;
#endif
constexpr int kDist = kStages - 1;          // prefetch distance in steps
constexpr int kRowTables = 128 * 8 + 128 * 8 + 128 * 4;  // A row ptrs, W row ptrs, MoE slots

enum Mode { kGemm = 0, kSwiglu = 1, kMoeGateUp = 2, kMoeDown = 3 };

// Shared-memory budget per weight type (launch.py mirrors this; the kernel checks it).
template<int W> struct WTraits {
    static constexpr bool kRaw = true;
    static constexpr int QK = QBlock<W>::QK, BYTES = QBlock<W>::BYTES;
    static constexpr int R = QK / BK;                     // compute steps per raw block
    static constexpr int NR = R == 1 ? kStages : 2;       // raw ring depth
    static constexpr int ALIGN = (BYTES & 15) == 0 ? 16 : (BYTES & 7) == 0 ? 8 : (BYTES & 3) == 0 ? 4 : 2;
    static constexpr int SLOT = (BYTES + (16 - ALIGN) + 15) / 16 * 16;   // bytes per raw row
    static constexpr int CHUNKS = SLOT / 16;
    static constexpr int B_BYTES = NR * 128 * SLOT + 2 * TILE_BYTES;
    static_assert(R * BK == QK, "raw block must be a whole number of compute steps");
};
template<> struct WTraits<GGML_BF16> {
    static constexpr bool kRaw = false;
    static constexpr int R = 1;
    static constexpr int B_BYTES = kStages * TILE_BYTES;
};
template<int W> __host__ __device__ constexpr int smem_bytes() { return kStages * TILE_BYTES + WTraits<W>::B_BYTES + kRowTables; }

// ---- PTX wrappers --------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte async copy; bytes < 16 reads only that many and zero-fills the rest (0: zeros).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template<int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_addr(p)));
}

// mma_bf16: common.cuh

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);   // .x = lo at the lower address
    return *reinterpret_cast<const u32*>(&h);
}

__device__ __forceinline__ void st_shared_v4(void* p, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(smem_addr(p)), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void st_shared_v2(void* p, u32 a, u32 b) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" :: "r"(smem_addr(p)), "r"(a), "r"(b) : "memory");
}

// out[0] += a, out[1] += b as one vector reduction on sm_90, two scalar ones before.
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Byte offset of 16-byte chunk `ch` (0..3) of row `r` in a swizzled bf16 tile.
__device__ __forceinline__ int swz(int r, int ch) { return r * 64 + ((ch ^ ((r >> 1) & 3)) << 4); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }
// The GLU's gate activation (ACT template argument of gemm_block): kSilu (SwiGLU) or kGeluTanh
// (Gemma's GELU GLU: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), kernels/dense/ref.py gelu).
enum Act { kSilu = 0, kGeluTanh = 1 };
template<int ACT>
__device__ __forceinline__ float glu_act(float g) {
    if constexpr (ACT == kGeluTanh) return gelu_tanh(g);     // common.cuh
    else return silu(g);
}

// ---- the block program ---------------------------------------------------------------------
//
// MODE kGemm:      C[m, n] (+)= sum_k A[m, k] W[n, k]; grid (ceil(N/128), ceil(M/128)).
// MODE kSwiglu:    C[m, f] = silu(A Wg^T)[m, f] * (A Wu^T)[m, f], f < N (= F); a block computes
//                  64 output columns from 64 gate rows (w0) and 64 up rows (w1): B tile row rr
//                  belongs to warp column rr / 32, whose 32 rows are 16 gate then 16 up rows of
//                  the same 16 output columns, so n8 fragments nt and nt + 2 pair up in registers.
// MODE kMoeGateUp: kSwiglu over the expert-sorted layout (kernels/moe/ref.py): grid y = row tile
//                  of sorted_slots, A row = x[slot / topk], C = h [S, F] at the sorted row.
// MODE kMoeDown:   A = h rows of the tile, W = w_down of the tile's expert, and
//                  out[slot / topk, n] += route_w[slot] * y (slot -1 = padding: skipped).
// For the MoE modes w0 / w1 are the expert-0 bases and w_expert_bytes the stride between experts;
// or, with wtab (an expert table, kernels/moe/launch.py), expert e's bases are wtab[e] (w0) and
// wtab[n_expert + e] (w1): resident and streamed experts anywhere in device memory.
template<int W, bool A_F32, int MODE, int ACT = kSilu>
__device__ __forceinline__ void gemm_block(
    const void* __restrict__ a, long long lda,
    const u8* __restrict__ w0, const u8* __restrict__ w1, long long w_row_bytes, long long w_expert_bytes,
    int M, int N, int K,
    void* __restrict__ c, long long ldc, int c_bf16, int accumulate,
    const int* __restrict__ sorted_slots, const int* __restrict__ expert_offsets, int n_expert, int topk,
    const float* __restrict__ route_w, const unsigned long long* __restrict__ wtab = nullptr)
{
    typedef WTraits<W> WT;
    constexpr bool kSwi = MODE == kSwiglu || MODE == kMoeGateUp;
    constexpr bool kMoe = MODE == kMoeGateUp || MODE == kMoeDown;

    extern __shared__ __align__(128) u8 smem[];
    u8* sA = smem;
    u8* sB = smem + kStages * TILE_BYTES;
    const char** s_arow = reinterpret_cast<const char**>(sB + WT::B_BYTES);
    const u8** s_brow = reinterpret_cast<const u8**>(s_arow + 128);
    int* s_slot = reinterpret_cast<int*>(s_brow + 128);
    __shared__ int s_expert;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 2, warp_n = warp & 3;
    const int row0 = blockIdx.y * BM;

    if (tid == 0) {
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (u32)smem_bytes<W>()) __trap();   // launch.py and WTraits disagree
    }

    // ---- which rows: m_valid rows of A count, the rest are zero / skipped ----
    int m_valid;
    int expert = 0;
    if constexpr (kMoe) {
        if (row0 >= expert_offsets[n_expert]) return;       // past the padded layout: no work
        for (int e = tid; e < n_expert; e += kThreads)
            if (expert_offsets[e] <= row0 && row0 < expert_offsets[e + 1]) s_expert = e;
        int slot = -1;
        if (tid < BM) {
            slot = sorted_slots[row0 + tid];
            s_slot[tid] = slot;
        }
        // valid slots are a prefix of the tile: segments are padded at their ends, tiles aligned
        m_valid = __syncthreads_count(slot >= 0);
        if (m_valid == 0) return;
        expert = s_expert;
    } else {
        m_valid = min(BM, M - row0);
    }

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
    } else {
        const int rr = tid - BM;   // W row rr of the tile (BN == 128 == kThreads - BM)
        const u8* base0 = expert_weights(wtab, expert, w0, expert, w_expert_bytes);
        const u8* p = nullptr;
        if constexpr (kSwi) {
            const u8* base1 = expert_weights(wtab, n_expert + expert, w1, expert, w_expert_bytes);
            const int q = rr & 31;
            const int f = blockIdx.x * (BN / 2) + (rr >> 5) * 16 + (q & 15);
            if (f < N) p = ((q >> 4) ? base1 : base0) + (long long)f * w_row_bytes;
        } else {
            const int n = blockIdx.x * BN + rr;
            if (n < N) p = base0 + (long long)n * w_row_bytes;
        }
        s_brow[rr] = p;
    }
    __syncthreads();

    // ---- producers ----
    auto load_a_async = [&](int step) {          // bf16 A: 128 rows x 4 chunks, 2 per thread
        u8* t = sA + (step % kStages) * TILE_BYTES;
        const int k0 = step * BK;
#pragma unroll
        for (int i = tid; i < BM * 4; i += kThreads) {
            const int r = i >> 2, ch = i & 3;
            const char* p = s_arow[r];
            cp_async16(t + swz(r, ch), p ? p + (long long)(k0 + ch * 8) * 2 : static_cast<const char*>(a), p ? 16 : 0);
        }
    };
    // f32 A: 128 rows x 8 float4 = 4 per thread, staged through registers in two halves (one
    // around the MMAs, one around the dequant) so that only 8 of them are live at a time.
    float4 areg[2];
    auto load_a_regs = [&](int step, int half) {
        const int k0 = step * BK;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int i = tid + (2 * half + j) * kThreads, r = i >> 3, q = i & 7;
            const char* p = s_arow[r];
            areg[j] = p ? *reinterpret_cast<const float4*>(p + (long long)(k0 + q * 4) * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto store_a_regs = [&](int step, int half) {
        u8* t = sA + (step % kStages) * TILE_BYTES;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int i = tid + (2 * half + j) * kThreads, r = i >> 3, q = i & 7;
            st_shared_v2(t + swz(r, q >> 1) + (q & 1) * 8, pack_bf16(areg[j].x, areg[j].y), pack_bf16(areg[j].z, areg[j].w));
        }
    };
    auto load_a = [&](int step) {                // A for a prologue step (f32: synchronously)
        if constexpr (A_F32) { for (int h = 0; h < 2; ++h) { load_a_regs(step, h); store_a_regs(step, h); } }
        else load_a_async(step);
    };
    auto load_b_bf16 = [&](int step) {
        u8* t = sB + (step % kStages) * TILE_BYTES;
        const int k0 = step * BK;
#pragma unroll
        for (int i = tid; i < BN * 4; i += kThreads) {
            const int r = i >> 2, ch = i & 3;
            const u8* p = s_brow[r];
            cp_async16(t + swz(r, ch), p ? p + (long long)(k0 + ch * 8) * 2 : w0, p ? 16 : 0);
        }
    };
    auto load_raw = [&](int blk) {               // raw GGML block `blk` of every W row of the tile
        if constexpr (WT::kRaw) {
            u8* t = sB + (blk % WT::NR) * (128 * WT::SLOT);
            for (int i = tid; i < BN * WT::CHUNKS; i += kThreads) {
                const int r = i / WT::CHUNKS, ch = i - r * WT::CHUNKS;
                const u8* p = s_brow[r];
                int n = 0;
                const u8* src = w0;
                if (p) {
                    const u64 addr = reinterpret_cast<u64>(p) + (u64)blk * WT::BYTES;
                    const u64 s = (addr & ~(u64)15) + ch * 16;
                    const long long rem = (long long)(addr + WT::BYTES) - (long long)s;
                    n = rem >= 16 ? 16 : (rem > 0 ? (int)rem : 0);
                    if (n) src = reinterpret_cast<const u8*>(s);
                }
                cp_async16(t + r * WT::SLOT + ch * 16, src, n);
            }
        }
    };
    auto dequant = [&](int step) {               // raw -> bf16 tile for one compute step
        if constexpr (WT::kRaw) {
            const int blk = step / WT::R, sub = step - blk * WT::R;
            const u8* raw = sB + (blk % WT::NR) * (128 * WT::SLOT);
            u8* t = sB + WT::NR * 128 * WT::SLOT + (step & 1) * TILE_BYTES;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int q = tid + j * kThreads, r = q >> 2, jj = q & 3;
                const u8* p = s_brow[r];
                const int mis = p ? (int)((reinterpret_cast<u64>(p) + (u64)blk * WT::BYTES) & 15) : 0;
                float f[8];
                dequant8<W>(raw + r * WT::SLOT + mis, sub * 4 + jj, f);
                st_shared_v4(t + swz(r, jj), pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]),
                             pack_bf16(f[4], f[5]), pack_bf16(f[6], f[7]));
            }
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

    auto compute = [&](int step) {
        const u8* tA = sA + (step % kStages) * TILE_BYTES;
        const u8* tB;
        if constexpr (WT::kRaw) tB = sB + WT::NR * 128 * WT::SLOT + (step & 1) * TILE_BYTES;
        else tB = sB + (step % kStages) * TILE_BYTES;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            u32 bf[NT][2];
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                const int r = warp_n * 32 + np * 16 + ((lane >> 4) << 3) + (lane & 7);
                ldmatrix_x4(bf[2 * np][0], bf[2 * np][1], bf[2 * np + 1][0], bf[2 * np + 1][1],
                            tB + swz(r, kk * 2 + ((lane >> 3) & 1)));
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (warp_m * 64 + mt * 16 < m_valid) {
                    u32 af[4];
                    const int r = warp_m * 64 + mt * 16 + (lane & 15);
                    ldmatrix_x4(af[0], af[1], af[2], af[3], tA + swz(r, kk * 2 + (lane >> 4)));
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[mt][nt], af, bf[nt]);
                }
            }
        }
    };

    // ---- main loop ----
    // Group g (one cp.async commit group per prologue step / iteration) holds the loads of
    // step g: A(g), W(g) for bf16 weights, and for GGML weights the raw block that step g+1
    // starts (raw(0) rides with group 0). At the top of iteration s, after waiting until at most
    // kStages-2 groups are pending and the barrier:
    //   - A(s), W(s) / raw for step s+1 have landed and are visible to every thread;
    //   - every thread finished iteration s-1, so the ring slots of step s-1 (A, W, the bf16
    //     tile (s+1)&1) and the raw block of step s-1 (when it is not step s's) are free;
    //   - the bf16 tile s&1 holds W(s), dequantised during iteration s-1.
    const int nsteps = K / BK;
    if constexpr (WT::kRaw) load_raw(0);
#pragma unroll
    for (int s = 0; s < kDist; ++s) {
        if (s < nsteps) {
            load_a(s);
            if constexpr (!WT::kRaw) load_b_bf16(s);
            if constexpr (WT::kRaw) if (s + 1 < nsteps && (s + 1) % WT::R == 0) load_raw((s + 1) / WT::R);
        }
        cp_async_commit();
    }
    if constexpr (WT::kRaw) {
        cp_async_wait<kDist - 1>();
        __syncthreads();
        if (nsteps > 0) dequant(0);
    }

    for (int s = 0; s < nsteps; ++s) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        const int sl = s + kDist;
        if (sl < nsteps) {
            if constexpr (A_F32) load_a_regs(sl, 0);
            else load_a_async(sl);
            if constexpr (!WT::kRaw) load_b_bf16(sl);
        }
        if constexpr (WT::kRaw) if (sl + 1 < nsteps && (sl + 1) % WT::R == 0) load_raw((sl + 1) / WT::R);
        cp_async_commit();
        if constexpr (WT::kRaw) {
            compute(s);
            if constexpr (A_F32) if (sl < nsteps) { store_a_regs(sl, 0); load_a_regs(sl, 1); }
            if (s + 1 < nsteps) dequant(s + 1);
            if constexpr (A_F32) if (sl < nsteps) store_a_regs(sl, 1);
        } else if constexpr (A_F32) {
            // no dequant to hide the second half behind: both halves are in flight over the MMAs
            const float4 first0 = areg[0], first1 = areg[1];
            if (sl < nsteps) load_a_regs(sl, 1);
            compute(s);
            if (sl < nsteps) {
                store_a_regs(sl, 1);
                areg[0] = first0;
                areg[1] = first1;
                store_a_regs(sl, 0);
            }
        } else {
            compute(s);
        }
    }
    cp_async_wait<0>();

    // ---- epilogue: fragment (mt, nt) holds rows g, g+8 and columns 2t, 2t+1 of its 16 x 8 ----
    const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * 64 + mt * 16 + g + 8 * h;
            if constexpr (MODE == kGemm) {
                const int m = row0 + r;
                if (m >= M) continue;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int n = blockIdx.x * BN + warp_n * 32 + nt * 8 + t2;
                    gepi::store_pair(c, (long long)m * ldc, n, N, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1],
                                     c_bf16, accumulate);
                }
            } else if constexpr (kSwi) {
                const int m = row0 + r;     // kMoeGateUp: every row of the tile is inside h
                if (MODE == kSwiglu && m >= M) continue;
#pragma unroll
                for (int nt = 0; nt < NT / 2; ++nt) {
                    const int f = blockIdx.x * (BN / 2) + warp_n * 16 + nt * 8 + t2;
                    const float v0 = glu_act<ACT>(acc[mt][nt][2 * h]) * acc[mt][nt + NT / 2][2 * h];
                    const float v1 = glu_act<ACT>(acc[mt][nt][2 * h + 1]) * acc[mt][nt + NT / 2][2 * h + 1];
                    gepi::store_pair(c, (long long)m * ldc, f, N, v0, v1, c_bf16, 0);
                }
            } else {   // kMoeDown
                const int slot = s_slot[r];
                if (slot < 0) continue;
                const float wgt = route_w[slot];
                float* orow = static_cast<float*>(c) + (long long)(slot / topk) * ldc;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int n = blockIdx.x * BN + warp_n * 32 + nt * 8 + t2;
                    const float v0 = acc[mt][nt][2 * h] * wgt, v1 = acc[mt][nt][2 * h + 1] * wgt;
                    if (n + 1 < N) red_add2(orow + n, v0, v1);
                    else if (n < N) atomicAdd(orow + n, v0);
                }
            }
        }
    }
}

}  // namespace gemm
