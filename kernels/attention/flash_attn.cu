// Causal GQA flash attention of one prefill chunk over the bf16 KV cache (FA2 algorithm).
//
//   q       [T, Hq, D]        f32 or bf16, strides (q_stride_t, q_stride_h) in elements, unit along D
//   k_cache [max_ctx, Hkv, D]  bf16; rows 0..P-1 are earlier chunks, rows P..P+T-1 this chunk
//   v_cache [max_ctx, Hkv, DV] bf16
//   out     [T, Hq, DV]        f32 or bf16, contiguous
//   *past   = P, *n_valid = valid rows of the chunk (device scalars: they change between replays
//             of a captured graph, so they are never kernel arguments)
//
// Query t sits at position P + t and sees keys 0..P+t; query head h reads KV head h / (Hq / Hkv).
// Rows t >= n_valid are written as zeros.
//
// One block = BLOCK_M = 64 query rows of one head, 4 warps of 16 rows. The grid is
// (Hq, ceil(T / 64)) and does not depend on P: each block reads P and walks the key tiles
// 0..P+t itself. Key tiles are BLOCK_N = 64 rows. K and V each have ONE smem buffer and their
// loads alternate: V[j] streams in while S = Q K[j]^T is computed, K[j+1] while O += P V[j].
// Smem: Q 64xD + K 64xD + V 64xDV bf16 = 96 KB at D = DV = 256 (fits sm_89's 99 KB per block;
// two blocks per SM on sm_90). Registers per thread at D = 256: O accumulator 16 x 256 per warp
// = 128 f32, S tile 16 x 64 per warp = 32 f32; Q and K/V fragments come from smem via ldmatrix.
// Smem rows are 16-byte chunks XOR-swizzled by (row & 7) so ldmatrix of 8 rows is conflict-free.
// Masking only on tiles the diagonal crosses; a warp skips the math of a tile above all its rows.
// Heaviest query tiles are scheduled first (blockIdx.y reversed) for causal load balance.
// Resources (NVRTC 13, sm_89 and sm_90): 242-244 registers at D = 256, 192 at 128, 160 at 64;
// no local memory. Keep an eye on that margin when editing: the O accumulator alone is 128 regs.
// Throughput bound: every warp reads its Q slice and the whole K and V tile through ldmatrix,
// 72 KB of smem per 1 MFLOP of mma, so at 128 B/clk/SM this design tops out near 16 FLOP per
// smem byte (~420 TFLOP/s on an H100 SXM); wgmma (sm_90a) would be the next step past that.
#include "pdl.cuh"
#include <cuda_bf16.h>

namespace fa {

constexpr int BLOCK_M = 64;
constexpr int BLOCK_N = 64;
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr float LOG2E = 1.4426950408889634f;
#define FA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes = 0 fills the destination with zeros (rows past the end).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// c[4] += a[16x16 bf16, row] * b[16x8 bf16, col], f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile with `chunks` chunks per row.
template <int CHUNKS>
__device__ __forceinline__ unsigned swz(int row, int chunk) {
    return static_cast<unsigned>((row * CHUNKS + (chunk ^ (row & 7))) * 16);
}

// 8 consecutive q elements -> 8 bf16 packed in a uint4.
__device__ __forceinline__ uint4 load8_bf16(const float* p) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    return make_uint4(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w), pack_bf16x2(b.x, b.y), pack_bf16x2(b.z, b.w));
}
__device__ __forceinline__ uint4 load8_bf16(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint4*>(p);
}

__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Issue the cp.async copies of key rows [n0, n0 + BLOCK_N) of one KV head into a swizzled tile;
// rows >= n_end are zero-filled (V must be finite there: 0 * NaN would poison O).
// Thread tid copies chunk c = tid % CHUNKS of rows r0 + i * RP (r0 = tid / CHUNKS, RP = rows per
// pass). Adding RP < 8 to a row flips fixed bits of (row & 7), so the swizzled destinations take
// only 8 / RP distinct per-thread bases plus immediates; the source is one pointer stepped by RP
// rows. Written this way the compiler keeps ~4 registers for the copy instead of hoisting 16
// 64-bit addresses out of the key loop (which spilled at D = 256).
template <int W>
struct TileCopy {
    static constexpr int CHUNKS = W / 8;
    static constexpr int RP = THREADS / CHUNKS;
    static constexpr int PER_THREAD = BLOCK_N / RP;
    static constexpr int VARIANTS = RP >= 8 ? 1 : 8 / RP;
    static_assert(THREADS % CHUNKS == 0 && BLOCK_N % RP == 0 && PER_THREAD % VARIANTS == 0, "tile copy must split evenly");
    unsigned dst[VARIANTS];
    int r0, c;
    __device__ __forceinline__ TileCopy(unsigned tile, int tid) {
        r0 = tid / CHUNKS;
        c = tid % CHUNKS;
#pragma unroll
        for (int v = 0; v < VARIANTS; ++v) dst[v] = tile + swz<CHUNKS>(r0 + v * RP, c);
    }
    __device__ __forceinline__ void issue(const __nv_bfloat16* cache, int row_stride, int n0, int n_end) const {
        const int lim = n_end - n0 - r0;          // row r0 + i * RP exists iff i * RP < lim
        const __nv_bfloat16* src = cache + static_cast<long long>(n0 + r0) * row_stride + c * 8;
        const long long step = static_cast<long long>(RP) * row_stride;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const bool ok = i * RP < lim;
            cp_async16(dst[i % VARIANTS] + (i / VARIANTS) * (VARIANTS * RP) * CHUNKS * 16, ok ? src : cache, ok ? 16 : 0);
            src += step;
        }
    }
};

template <int D, int DV, typename QT, typename OT>
__device__ __forceinline__ void flash_attn_prefill(
        const QT* __restrict__ q, long long q_stride_t, long long q_stride_h,
        const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
        OT* __restrict__ out, int T, int Hq, int Hkv, float scale,
        const int* __restrict__ past_dev, const int* __restrict__ n_valid_dev) {
    static_assert(D % 64 == 0 && DV % 64 == 0, "head dims must be multiples of 64 (swizzle spans 8 chunks)");
    constexpr int DC = D / 8, VC = DV / 8;        // 16-byte chunks per Q/K row and per V row
    constexpr int NT = BLOCK_N / 8;               // n8 tiles of S per warp
    constexpr int OT8 = DV / 8;                   // n8 tiles of O per warp
    extern __shared__ __align__(128) unsigned char smem[];
    const unsigned sQ = smem_addr(smem);
    const unsigned sK = sQ + BLOCK_M * D * 2;
    const unsigned sV = sK + BLOCK_N * D * 2;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c4 = lane % 4;        // mma fragment row group / column pair
    const int h = blockIdx.x;
    const int m0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * BLOCK_M;   // heaviest (latest) query tiles first
    const int hk = h / (Hq / Hkv);
    const int P = *past_dev;
    const int n_valid = min(max(*n_valid_dev, 0), T);
    const int rows = min(BLOCK_M, n_valid - m0);  // valid query rows of this block

    if (rows <= 0) {   // padding rows only: zeros
        const int m_end = min(m0 + BLOCK_M, T);
        for (int idx = tid; idx < (m_end - m0) * (DV / 2); idx += THREADS) {
            const int r = idx / (DV / 2), c = idx % (DV / 2);
            store2(out + (static_cast<long long>(m0 + r) * Hq + h) * DV + 2 * c, 0.f, 0.f);
        }
        return;
    }
    const int n_end = P + m0 + rows;              // keys [0, n_end) are visible to some valid row
    const int n_tiles = (n_end + BLOCK_N - 1) / BLOCK_N;
    const __nv_bfloat16* kh = k_cache + static_cast<long long>(hk) * D;
    const __nv_bfloat16* vh = v_cache + static_cast<long long>(hk) * DV;

    // Q tile -> smem as bf16 (rows past n_valid are zero).
    for (int idx = tid; idx < BLOCK_M * DC; idx += THREADS) {
        const int r = idx / DC, c = idx % DC;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows) v = load8_bf16(q + static_cast<long long>(m0 + r) * q_stride_t + static_cast<long long>(h) * q_stride_h + c * 8);
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" :: "r"(sQ + swz<DC>(r, c)), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
    }
    const TileCopy<D> k_copy(sK, tid);
    const TileCopy<DV> v_copy(sV, tid);
    k_copy.issue(kh, Hkv * D, 0, n_end);
    cp_async_commit();
    v_copy.issue(vh, Hkv * DV, 0, n_end);
    cp_async_commit();

    const float sl2 = scale * LOG2E;
    const int qpos0 = P + m0 + warp * 16 + g;     // absolute position of this thread's first row; second is +8
    const int warp_last = P + m0 + warp * 16 + 15;
    float o[OT8][4];
#pragma unroll
    for (int i = 0; i < OT8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {FA_NEG_INF, FA_NEG_INF};    // in log2 units (score * scale * log2 e)
    float row_sum[2] = {0.f, 0.f};                // this thread's partial sums; quad-reduced at the end

    // ldmatrix lane addressing. A (Q, x4): matrices (rows 0-7,k 0-7) (rows 8-15,k 0-7) (rows 0-7,k 8-15)
    // (rows 8-15,k 8-15). B from K (x4): (n 0-7,k 0-7) (n 0-7,k 8-15) (n 8-15,k 0-7) (n 8-15,k 8-15).
    // B from V (x4.trans): (keys 0-7,dv 0-7) (keys 8-15,dv 0-7) (keys 0-7,dv 8-15) (keys 8-15,dv 8-15).
    // Chunk c of row r sits at chunk c ^ (r & 7); with c = 8 * hi + lo that is 8 * hi + (lo ^ (r & 7)),
    // and every row a lane addresses has the same r & 7 (= lane % 8). So each operand needs just four
    // per-lane base addresses (lo = 0, 2, 4, 6 plus the lane's x4 chunk bit) and the rest of the
    // offset is an immediate: no per-(kc, np) address registers for the compiler to hoist.
    const int lm = lane / 8, lr = lane % 8;
    const int a_row = warp * 16 + lr + (lm & 1) * 8, a_chunk = lm >> 1;
    const int k_row = lr + (lm >> 1) * 8, k_chunk = lm & 1;
    const int v_row = lr + (lm & 1) * 8, v_chunk = lm >> 1;
    unsigned q_base[4], k_base[4], v_base[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        q_base[i] = sQ + swz<DC>(a_row, 2 * i + a_chunk);
        k_base[i] = sK + swz<DC>(k_row, 2 * i + k_chunk);
        v_base[i] = sV + swz<VC>(v_row, 2 * i + v_chunk);
    }

    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = j * BLOCK_N;
        const bool active = n0 <= warp_last;      // some key of the tile is visible to some row of this warp
        cp_async_wait<1>();                       // K[j] landed (V[j] may still be in flight)
        __syncthreads();

        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        if (active) {
#pragma unroll
            for (int kq = 0; kq < D / 64; ++kq) {   // 64-wide slices of D: chunk offset kq * 8 is an immediate
#pragma unroll
            for (int kc = 0; kc < 4; ++kc) {
                unsigned a0, a1, a2, a3;
                ldmatrix_x4(q_base[kc] + kq * 128, a0, a1, a2, a3);
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4(k_base[kc] + np * 16 * D * 2 + kq * 128, b0, b1, b2, b3);
                    mma_bf16_16816(s[2 * np], a0, a1, a2, a3, b0, b1);
                    mma_bf16_16816(s[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
            }
        }
        __syncthreads();                          // every warp is done reading K[j]
        if (j + 1 < n_tiles) k_copy.issue(kh, Hkv * D, n0 + BLOCK_N, n_end);
        cp_async_commit();

        unsigned p[NT][2];                        // P = softmax numerators as bf16 A fragments
        if (active) {
            if (n0 + BLOCK_N - 1 > P + m0 + warp * 16) {   // the diagonal crosses this tile: causal mask
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    const int key = n0 + i * 8 + 2 * c4;
                    if (key > qpos0) s[i][0] = FA_NEG_INF;
                    if (key + 1 > qpos0) s[i][1] = FA_NEG_INF;
                    if (key > qpos0 + 8) s[i][2] = FA_NEG_INF;
                    if (key + 1 > qpos0 + 8) s[i][3] = FA_NEG_INF;
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = FA_NEG_INF;
#pragma unroll
                for (int i = 0; i < NT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[r], mx * sl2);
                const float base = m_new == FA_NEG_INF ? 0.f : m_new;   // a row that has seen no key yet
                const float alpha = exp2f(row_max[r] - base);
                row_max[r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    s[i][2 * r] = exp2f(fmaf(s[i][2 * r], sl2, -base));
                    s[i][2 * r + 1] = exp2f(fmaf(s[i][2 * r + 1], sl2, -base));
                    sum += s[i][2 * r] + s[i][2 * r + 1];
                }
                row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
                for (int i = 0; i < OT8; ++i) {
                    o[i][2 * r] *= alpha;
                    o[i][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                p[i][0] = pack_bf16x2(s[i][0], s[i][1]);
                p[i][1] = pack_bf16x2(s[i][2], s[i][3]);
            }
        }

        cp_async_wait<1>();                       // V[j] landed (K[j+1] may still be in flight)
        __syncthreads();
        if (active) {
#pragma unroll
            for (int kc = 0; kc < BLOCK_N / 16; ++kc) {
                const unsigned a0 = p[2 * kc][0], a1 = p[2 * kc][1], a2 = p[2 * kc + 1][0], a3 = p[2 * kc + 1][1];
#pragma unroll
                for (int dp = 0; dp < OT8 / 2; ++dp) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4_trans(v_base[dp % 4] + kc * 16 * DV * 2 + (dp / 4) * 128, b0, b1, b2, b3);
                    mma_bf16_16816(o[2 * dp], a0, a1, a2, a3, b0, b1);
                    mma_bf16_16816(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
                }
            }
        }
        __syncthreads();                          // every warp is done reading V[j]
        if (j + 1 < n_tiles) v_copy.issue(vh, Hkv * DV, n0 + BLOCK_N, n_end);
        cp_async_commit();
    }
    cp_async_wait<0>();

    // Normalise and write; rows past n_valid (still < T) get zeros.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int t = m0 + warp * 16 + g + 8 * r;
        if (t >= T) continue;
        const float inv = t < n_valid && l > 0.f ? 1.f / l : 0.f;
        OT* dst = out + (static_cast<long long>(t) * Hq + h) * DV + 2 * c4;
#pragma unroll
        for (int i = 0; i < OT8; ++i) store2(dst + i * 8, o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    }
}

}  // namespace fa

#define FA_PREFILL_KERNEL(NAME, D, DV, QT, OT)                                                        \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, 2) NAME(                                \
            const QT* q, long long q_stride_t, long long q_stride_h, const __nv_bfloat16* k_cache,   \
            const __nv_bfloat16* v_cache, OT* out, int T, int Hq, int Hkv, float scale,              \
            const int* past_dev, const int* n_valid_dev) { ggf_pdl_entry();                          \
        fa::flash_attn_prefill<D, DV, QT, OT>(q, q_stride_t, q_stride_h, k_cache, v_cache, out, T,   \
                                              Hq, Hkv, scale, past_dev, n_valid_dev);                \
    }

// Names: flash_attn_prefill_d<D>_q<q dtype>_o<out dtype> (D == DV).
FA_PREFILL_KERNEL(flash_attn_prefill_d256_qf32_of32, 256, 256, float, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d256_qf32_obf16, 256, 256, float, __nv_bfloat16)
FA_PREFILL_KERNEL(flash_attn_prefill_d256_qbf16_of32, 256, 256, __nv_bfloat16, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d256_qbf16_obf16, 256, 256, __nv_bfloat16, __nv_bfloat16)
FA_PREFILL_KERNEL(flash_attn_prefill_d128_qf32_of32, 128, 128, float, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d128_qf32_obf16, 128, 128, float, __nv_bfloat16)
FA_PREFILL_KERNEL(flash_attn_prefill_d128_qbf16_of32, 128, 128, __nv_bfloat16, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d128_qbf16_obf16, 128, 128, __nv_bfloat16, __nv_bfloat16)
FA_PREFILL_KERNEL(flash_attn_prefill_d64_qf32_of32, 64, 64, float, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d64_qf32_obf16, 64, 64, float, __nv_bfloat16)
FA_PREFILL_KERNEL(flash_attn_prefill_d64_qbf16_of32, 64, 64, __nv_bfloat16, float)
FA_PREFILL_KERNEL(flash_attn_prefill_d64_qbf16_obf16, 64, 64, __nv_bfloat16, __nv_bfloat16)
