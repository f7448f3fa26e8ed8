// Few-row products straight from a GGUF weight: the LM head of time-to-first-token (one row:
// the last valid token of the chunk), the decode step's matmuls and other M <= 8 matmuls, which
// are bound by reading W.
//
//   gemv_<a>_<w>(x, ldx, M, w, w_row_bytes, N, K, y, ldy, nvalid, wpr)
//       y[m, n] = sum_k x[r + m, k] * W[n, k]      m < M <= 8, n < N
//       r = nvalid ? max(nvalid[0] - 1, 0) : 0     (nvalid: device int32 [1], the chunk's valid
//       rows, read at run time so a captured graph follows the prompt length; then M must be 1)
//   x: f32 or bf16 rows (leading dimension ldx elements); W: N rows of K elements as GGML
//   blocks (or bf16 / f32 / f16); y: f32 [M, ldy]. K a multiple of 8 (of the block size for
//   quantised W). 256 threads = 8 warps; wpr (1, 2, 4 or 8) warps share one output row n, each
//   taking every wpr-th 256-element stretch of K, so a block works on 8 / wpr rows at a time
//   (the launcher raises wpr for small N, e.g. the [2048 -> 32] DeltaNet gates, so that enough
//   warps read at once). The M rows of x sit in shared memory as f32 (M * K * 4 bytes of dynamic
//   shared memory); the block asks L2 for its first rows while it stages them.
// Each lane dequantises 8 consecutive elements (dq8: dequant8's values by word loads) per step,
// 4 steps unrolled so their loads are in flight together; a warp reads 32 x 8 consecutive
// elements of its row per step: 512 contiguous bytes of bf16, one whole Q4_K/Q6_K block.
// One row (M = 1) of Q4_K or Q6_K runs gemv1_<a>_<w> instead (below), laid out for the type's
// blocks: dq8's per-group decode makes gemv_<a>_<w> bound by instructions per weight there, not
// by bytes (H200, [8192, 2048] Q4_K: 20 us -> 11 us).
#include "pdl.cuh"
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"
#include "quant/dot_unit.cuh"

// The one-row kernels read up to 4 matrices of one type and K in one launch (the decode step's
// projections of one input: qkv, z, beta, alpha): output rows [0, n1) are matrix 0 (w, y),
// [n1, n2) matrix 1, [n2, n3) matrix 2, [n3, N) matrix 3; one matrix has n1 = n2 = n3 = N.
struct Segs {      // scalar fields: an indexed array would live in local memory
    const unsigned char *w0, *w1, *w2, *w3;
    float *y0, *y1, *y2, *y3;
    int n1, n2, n3;
};

__device__ __forceinline__ Segs make_segs(const unsigned char* w0, float* y0, const unsigned char* w1, float* y1,
                                          int n1, const unsigned char* w2, float* y2, int n2,
                                          const unsigned char* w3, float* y3, int n3) {
    return Segs{w0, w1, w2, w3, y0, y1, y2, y3, n1, n2, n3};
}

// row n of the launch: its bytes, and where its sum goes
__device__ __forceinline__ const unsigned char* seg_row(const Segs& s, int n, long long row_bytes, float*& y) {
    const unsigned char* w = s.w0;
    float* yb = s.y0;
    int base = 0;
    if (n >= s.n1) { w = s.w1; yb = s.y1; base = s.n1; }
    if (n >= s.n2) { w = s.w2; yb = s.y2; base = s.n2; }
    if (n >= s.n3) { w = s.w3; yb = s.y3; base = s.n3; }
    y = yb + (n - base);
    return w + (long long)(n - base) * row_bytes;
}

// the one-row kernels' end of a block step: *y = the row's sum over its wpr warps (in warp
// order, through part[8]); y is null past the last row; every thread of the block calls it (it
// has barriers when wpr > 1)
__device__ __forceinline__ void store_row_sum(float acc, float* y, int wpr, int sub, int lane, int warp,
                                              float* part) {
    const float s = warp_sum(acc);
    if (wpr == 1) {
        if (lane == 0 && y != nullptr) *y = s;
        return;
    }
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (sub == 0 && lane == 0 && y != nullptr) {
        float r = 0.0f;
        for (int i = 0; i < wpr; ++i) r += part[warp + i];
        *y = r;
    }
    __syncthreads();
}
#include "dense/gemv1_q6k.cuh"

// The one-row kernels' x staging, into shared memory at xs[i + 4 (i >> SH)] (the kernel's
// padding). Plain (nrm.w null): x[r0] as f32. With a folded add_rms_norm (nrm.w set; the decode
// step's attn_norm before its projections: one launch instead of two), x is the norm's first
// operand a (f32) and the block computes the norm itself from a and b:
//   s = a + b, x = s / sqrt(mean(s^2) + eps) * w   (rounded to bf16 where the norm's output is
//   stored bf16, so the products see what the unfolded launch would have read),
// and block 0 also writes s to sum and, where other steps read it, x to out (f32 or bf16).
struct NormIn {
    const float* b;
    const float* w;
    float eps;
    float* sum;
    void* out;
    int out_bf16;
};

template<int SH, typename A>
__device__ __forceinline__ void stage_x(const A* __restrict__ x, long long r0, long long ldx, int K, float* xs,
                                        const NormIn& nrm, float* scratch) {
    if (nrm.w == nullptr) {
        for (int i = threadIdx.x; i < K; i += blockDim.x) xs[i + 4 * (i >> SH)] = load_f(x + r0 * ldx + i);
        return;
    }
    const float* a = reinterpret_cast<const float*>(x);
    float ss = 0.0f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const float v = a[i] + nrm.b[i];
        xs[i + 4 * (i >> SH)] = v;
        ss += v * v;
    }
    const float scale = 1.0f / sqrtf(block_sum(ss, scratch) / (float)K + nrm.eps);
    const bool first = blockIdx.x == 0;
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const float v = xs[i + 4 * (i >> SH)];
        float y = v * scale * nrm.w[i];
        if (nrm.out_bf16) y = __bfloat162float(__float2bfloat16_rn(y));
        if (first) {
            nrm.sum[i] = v;
            if (nrm.out != nullptr) {
                if (nrm.out_bf16) reinterpret_cast<__nv_bfloat16*>(nrm.out)[i] = __float2bfloat16_rn(y);
                else reinterpret_cast<float*>(nrm.out)[i] = y;
            }
        }
        xs[i + 4 * (i >> SH)] = y;
    }
}

template<int W, typename A>
__device__ __forceinline__ void gemv_impl(const A* __restrict__ x, long long ldx, int M,
                                          const unsigned char* __restrict__ w, long long row_bytes,
                                          int N, int K, float* __restrict__ y, long long ldy,
                                          const int* __restrict__ nvalid, int wpr) {
    extern __shared__ float xs[];
    __shared__ float part[8][8];                 // [warp][m]: the row's partial sums (wpr > 1)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rpb = 8 / wpr, sub = warp % wpr;   // rows per block step, this warp's share of K
    const int n0 = blockIdx.x * rpb + warp / wpr;
    ggf_pdl_launch();
    prefetch_row_l2(n0 < N ? w + (long long)n0 * row_bytes : nullptr, row_bytes, sub * 32 + lane, wpr);
    ggf_pdl_wait();                  // the weights need no earlier kernel; x and nvalid do
    const long long r0 = nvalid ? (long long)max(nvalid[0] - 1, 0) : 0;
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
        const int m = i / K, k = i - m * K;
        xs[i] = load_f(x + (r0 + m) * ldx + k);
    }
    __syncthreads();
    const int groups = K >> 3;
    // every thread walks the same block steps (the barriers below need all of them)
    for (int base = blockIdx.x * rpb; base < N; base += gridDim.x * rpb) {
        const int n = base + warp / wpr;
        float acc[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
        if (n < N) {
            const unsigned char* row = w + (long long)n * row_bytes;
#pragma unroll 4
            for (int g = sub * 32 + lane; g < groups; g += 32 * wpr) {
                float v[8];
                dq8<W>(row, 8 * g, v);          // dequant8's values, word loads (quant/dq8.cuh)
#pragma unroll
                for (int m = 0; m < 8; ++m) {
                    if (m < M) {
                        const float4 a = *reinterpret_cast<const float4*>(xs + m * K + g * 8);
                        const float4 b = *reinterpret_cast<const float4*>(xs + m * K + g * 8 + 4);
                        acc[m] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w
                                + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
                    }
                }
            }
        }
        if (wpr == 1) {
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                if (m < M) {
                    const float s = warp_sum(acc[m]);
                    if (lane == 0 && n < N) y[(long long)m * ldy + n] = s;
                }
            }
            continue;
        }
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            if (m < M) {
                const float s = warp_sum(acc[m]);
                if (lane == 0) part[warp][m] = s;
            }
        }
        __syncthreads();
        if (sub == 0 && lane < M && n < N) {     // the row's first warp adds its warps' sums in order
            float s = 0.0f;
            for (int i = 0; i < wpr; ++i) s += part[warp + i][lane];
            y[(long long)lane * ldy + n] = s;
        }
        __syncthreads();
    }
}

// One row times a Q4_K matrix (M = 1: the decode step, the LM head's last row), laid out for the
// 144-byte blocks instead of dq8's 8-element groups: 8 lanes per 256-element block, lane
// t = 2 j + h owns the 16 quant bytes qs[32 j + 16 h, +16) of sub-block pair j (quant/dot_unit.cuh
// Unit<GGML_Q4_K>'s unit t, its scales decoded by du::q4k_pair_scales), i.e. 16 elements
// of sub-block 2 j (low nibbles) and 16 of 2 j + 1 (high nibbles). Per lane and block: one
// 16-byte header load (d, dmin, the 12 scale bytes), one 16-byte quant load, the two sub-blocks'
// scale and min decoded once, 32 FMAs on the nibbles as floats (byte_f), and
//   sum = dl0 (q . x)_lo - ml0 sum(x)_lo + dl1 (q . x)_hi - ml1 sum(x)_hi,
// the x sums of every 16 elements staged once per block. A warp covers 4 blocks (1024
// elements) per step, two steps in flight. x sits in shared memory as f32 with 4 floats of
// padding per 64 (an 8-lane phase of 16-byte reads then hits 32 different banks).
//   gemv1_<a>_q4_k(x, ldx, w, row_bytes, N, K, y, nvalid, wpr, w1, y1, n1, w2, y2, n2, w3, y3, n3,
//                  nb, nw, eps, nsum, nout, nout_bf16):
//   y[0, n] = x[r] . W[n], r as in gemv_<a>_<w>, over the matrices of Segs (one: n1 = n2 = n3 =
//   N); K a multiple of 256; wpr warps share a row (taking every wpr-th step). With nw set, x is
//   add_rms_norm(x, nb) (NormIn: f32a only, r = 0).
template<typename A>
__device__ __forceinline__ void gemv1_q4k_impl(const A* __restrict__ x, long long ldx, const Segs& segs,
                                               long long row_bytes, int N, int K,
                                               const int* __restrict__ nvalid, int wpr, const NormIn& nrm) {
    extern __shared__ float smem[];
    __shared__ float part[8], scratch[32];
    float* xs = smem;                           // K + K / 16 floats: x, padded
    float* sx = smem + K + K / 16;              // K / 16: sums of 16 consecutive x
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rpb = 8 / wpr, sub = warp % wpr;
    const int nb = K >> 8;
    const int n0 = blockIdx.x * rpb + warp / wpr;
    float* y0;
    ggf_pdl_launch();
    prefetch_row_l2(n0 < N ? seg_row(segs, n0, row_bytes, y0) : nullptr, row_bytes, sub * 32 + lane, wpr);
    ggf_pdl_wait();
    const long long r0 = nvalid ? (long long)max(nvalid[0] - 1, 0) : 0;
    stage_x<6>(x, r0, ldx, K, xs, nrm, scratch);
    __syncthreads();
    for (int g = threadIdx.x; g < (K >> 4); g += blockDim.x) {
        const float* p = xs + 16 * g + 4 * (g >> 2);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) s += p[i];
        sx[g] = s;
    }
    __syncthreads();
    const int bl = lane >> 3, t = lane & 7, j = t >> 1, h = t & 1;
    for (int base = blockIdx.x * rpb; base < N; base += gridDim.x * rpb) {
        const int n = base + warp / wpr;
        float acc = 0.0f;
        float* yn = nullptr;
        if (n < N) {
            const unsigned char* row = seg_row(segs, n, row_bytes, yn);
#pragma unroll 2
            for (int it = sub; it * 4 < nb; it += wpr) {
                const int b = it * 4 + bl;
                if (b < nb) {
                    const unsigned char* blk = row + (long long)b * 144;
                    const uint4 hdr = *reinterpret_cast<const uint4*>(blk);
                    const uint4 q = *reinterpret_cast<const uint4*>(blk + 16 + 32 * j + 16 * h);
                    float dl0, ml0, dl1, ml1;
                    du::q4k_pair_scales(hdr, j, dl0, dl1, ml0, ml1);      // sub-blocks 2j, 2j + 1
                    const int e_lo = b * 256 + 64 * j + 16 * h;          // e_hi = e_lo + 32
                    const float* xl = xs + e_lo + 4 * (e_lo >> 6);
                    const unsigned qw[4] = {q.x, q.y, q.z, q.w};
                    float s_lo = 0.0f, s_hi = 0.0f;
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const float4 a = *reinterpret_cast<const float4*>(xl + 4 * k);
                        const float4 c = *reinterpret_cast<const float4*>(xl + 32 + 4 * k);
                        const unsigned lo = qw[k] & 0x0F0F0F0Fu, hi = (qw[k] >> 4) & 0x0F0F0F0Fu;
                        s_lo += dq::byte_f(lo, 0, 0.0f) * a.x + dq::byte_f(lo, 1, 0.0f) * a.y
                              + dq::byte_f(lo, 2, 0.0f) * a.z + dq::byte_f(lo, 3, 0.0f) * a.w;
                        s_hi += dq::byte_f(hi, 0, 0.0f) * c.x + dq::byte_f(hi, 1, 0.0f) * c.y
                              + dq::byte_f(hi, 2, 0.0f) * c.z + dq::byte_f(hi, 3, 0.0f) * c.w;
                    }
                    acc += dl0 * s_lo - ml0 * sx[e_lo >> 4] + dl1 * s_hi - ml1 * sx[(e_lo >> 4) + 2];
                }
            }
        }
        store_row_sum(acc, yn, wpr, sub, lane, warp, part);
    }
}

// the one-row kernels' entry points: gemv1_<a>_<w>, the Segs of their matrices built from the arguments
#define GEMV1(WNAME, IMPL, ATYPE, ANAME)                                                               \
extern "C" __global__ void __launch_bounds__(256)                                                     \
gemv1_##ANAME##_##WNAME(const ATYPE* x, long long ldx, const unsigned char* w, long long row_bytes,   \
                        int N, int K, float* y, const int* nvalid, int wpr, const unsigned char* w1,  \
                        float* y1, int n1, const unsigned char* w2, float* y2, int n2,                \
                        const unsigned char* w3, float* y3, int n3, const float* nb, const float* nw, \
                        float eps, float* nsum, void* nout, int nout_bf16) {                          \
    IMPL<ATYPE>(x, ldx, make_segs(w, y, w1, y1, n1, w2, y2, n2, w3, y3, n3), row_bytes, N, K, nvalid,  \
                wpr, NormIn{nb, nw, eps, nsum, nout, nout_bf16});                                     \
}
GEMV1(q4_k, gemv1_q4k_impl, float, f32a)
GEMV1(q4_k, gemv1_q4k_impl, __nv_bfloat16, bf16a)

// One row times a Q6_K matrix, laid out for the 210-byte blocks: 4 lanes per block, lane
// t = 2 h + u owning 64 elements of half h (dense/gemv1_q6k.cuh q6k_unit_dot: 15 aligned word
// loads and 5 two-byte loads per lane and block, 64 FMAs, 4 scale products). A warp covers 8
// blocks (2048 elements) per step, two steps in flight. No x sums: byte_f's offset takes the 32
// off each quant exactly, at the cost of the add it does anyway. x sits in shared memory as f32
// with 4 floats of padding per 128: a lane's 16-byte reads start at 264 b + 132 h + 16 u (+ 32 m
// + 4 k), i.e. bank 8 b + 4 h + 16 u (mod 32), so the 8 lanes of a phase (two blocks, both
// halves, both u) hit 32 different banks (Q4_K's 4 per 64 would put u = 0 and 1 on one bank).
//   gemv1_<a>_q6_k(x, ldx, w, row_bytes, N, K, y, nvalid, wpr): as gemv1_<a>_q4_k; w 4-byte aligned.
template<typename A>
__device__ __forceinline__ void gemv1_q6k_impl(const A* __restrict__ x, long long ldx, const Segs& segs,
                                               long long row_bytes, int N, int K,
                                               const int* __restrict__ nvalid, int wpr, const NormIn& nrm) {
    extern __shared__ float xs[];               // K + K / 32 floats: x, padded
    __shared__ float part[8], scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rpb = 8 / wpr, sub = warp % wpr;
    const int nb = K >> 8;
    const int n0 = blockIdx.x * rpb + warp / wpr;
    float* y0;
    ggf_pdl_launch();
    prefetch_row_l2(n0 < N ? seg_row(segs, n0, row_bytes, y0) : nullptr, row_bytes, sub * 32 + lane, wpr);
    ggf_pdl_wait();
    const long long r0 = nvalid ? (long long)max(nvalid[0] - 1, 0) : 0;
    stage_x<7>(x, r0, ldx, K, xs, nrm, scratch);
    __syncthreads();
    const int bl = lane >> 2, t = lane & 3;
    const float* xu0 = xs + 264 * bl + 132 * (t >> 1) + 16 * (t & 1);
    for (int base = blockIdx.x * rpb; base < N; base += gridDim.x * rpb) {
        const int n = base + warp / wpr;
        float acc = 0.0f;
        float* yn = nullptr;
        if (n < N) {
            const unsigned char* row = seg_row(segs, n, row_bytes, yn);
#pragma unroll 2
            for (int it = sub; it * 8 < nb; it += wpr) {
                const int b = it * 8 + bl;
                if (b < nb) acc += g1::q6k_unit_dot(row + (long long)b * 210, t, xu0 + 2112 * it);
            }
        }
        store_row_sum(acc, yn, wpr, sub, lane, warp, part);
    }
}

GEMV1(q6_k, gemv1_q6k_impl, float, f32a)
GEMV1(q6_k, gemv1_q6k_impl, __nv_bfloat16, bf16a)

#define GEMV(WNAME, WTYPE, ATYPE, ANAME)                                                              \
extern "C" __global__ void __launch_bounds__(256)                                                     \
gemv_##ANAME##_##WNAME(const ATYPE* x, long long ldx, int M, const unsigned char* w,                  \
                       long long row_bytes, int N, int K, float* y, long long ldy, const int* nvalid,  \
                       int wpr) {                                                                     \
    gemv_impl<WTYPE, ATYPE>(x, ldx, M, w, row_bytes, N, K, y, ldy, nvalid, wpr);                      \
}
#define GEMV_BOTH(WNAME, WTYPE) GEMV(WNAME, WTYPE, float, f32a) GEMV(WNAME, WTYPE, __nv_bfloat16, bf16a)

GEMV_BOTH(f32, GGML_F32)
GEMV_BOTH(f16, GGML_F16)
GEMV_BOTH(bf16, GGML_BF16)
GEMV_BOTH(q4_0, GGML_Q4_0)
GEMV_BOTH(q4_1, GGML_Q4_1)
GEMV_BOTH(q5_0, GGML_Q5_0)
GEMV_BOTH(q5_1, GGML_Q5_1)
GEMV_BOTH(q8_0, GGML_Q8_0)
GEMV_BOTH(q2_k, GGML_Q2_K)
GEMV_BOTH(q3_k, GGML_Q3_K)
GEMV_BOTH(q4_k, GGML_Q4_K)
GEMV_BOTH(q5_k, GGML_Q5_K)
GEMV_BOTH(q6_k, GGML_Q6_K)
