// MoE router on the device: softmax/sigmoid + top-k + renormalisation, then a stable counting
// sort of the T*k slots by expert into the tile-padded layout of kernels/moe/ref.py. Four small
// kernels, no host round trip, deterministic (counts are order-free; positions come from
// per-chunk prefix sums and in-chunk ranks, not from atomics).
//
//   moe_topk     grid ceil(T / 8), 256 threads (a warp per token); slot_expert (may be null):
//                also slot_expert[t k + j] = ids[t, j], -1 for a padding token's slots: all that
//                the decode step's matrix-vector experts (gemv.cu) need, so there the other
//                three kernels do not run
//   moe_hist     grid C = ceil(T*k / 256), 256 threads: hist[c, e] = slots of chunk c on expert e;
//                also fills sorted_slots with -1 (the padding)
//   moe_scan     1 block of 1024 threads: hist[c, e] -> exclusive prefix over chunks, offsets
//   moe_scatter  grid C, 256 threads: sorted_slots[off[e] + hist[c, e] + rank] = slot
//   moe_route1   the one-token step's router GEMV, shared gate and top-k in one launch (below)
// Tokens t >= n_valid[0] (the padded tail of a chunk) get ids 0..k-1 and weight 0 and take no
// part in the sort.
#include "pdl.cuh"
#include "common.cuh"

#define ROUTE_MAX_PER_LANE 16   // E <= 512
#define ROUTE_CHUNK 256

// one token's top-k over row[0, E) by one warp (every lane calls it): ids, weights and, where
// slot_expert is not null, each slot's expert, for slots [0, k)
__device__ __forceinline__ void topk_row(const float* row, int E, int k, int gating, int norm, float scale,
                                         int lane, int* __restrict__ ids, float* __restrict__ weights,
                                         int* __restrict__ slot_expert) {
    float v[ROUTE_MAX_PER_LANE];
    float mx = __int_as_float(0xff800000);
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        v[i] = e < E ? row[e] : __int_as_float(0xff800000);
        mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i)
        if (lane + 32 * i < E) sum += __expf(v[i] - mx);
    sum = warp_sum(sum);

    // k rounds of a warp arg-max over the logits (the probabilities are monotonic in them);
    // ties go to the lower expert index, as numpy's stable argsort of -p.
    unsigned taken = 0;
    float my_v = 0.f;
    int my_e = 0;
    for (int j = 0; j < k; ++j) {
        float bv = __int_as_float(0xff800000);
        int be = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) {
            const int e = lane + 32 * i;
            if (e < E && !((taken >> i) & 1) && (v[i] > bv || be == 0x7fffffff)) { bv = v[i]; be = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(GGF_FULL_MASK, bv, o);
            const int oe = __shfl_xor_sync(GGF_FULL_MASK, be, o);
            if (ov > bv || (ov == bv && oe < be) || be == 0x7fffffff) { bv = ov; be = oe; }
        }
        if ((be & 31) == lane) taken |= 1u << (be >> 5);
        if (lane == j) { my_v = bv; my_e = be; }
    }
    float p = gating == 0 ? __expf(my_v - mx) / sum : 1.f / (1.f + __expf(-my_v));
    if (norm) {
        const float s = warp_sum(lane < k ? p : 0.f);
        p = p / fmaxf(s, 6.103515625e-5f);
    }
    if (scale != 0.f && scale != 1.f) p *= scale;
    if (lane < k) {
        ids[lane] = my_e;
        weights[lane] = p;
        if (slot_expert) slot_expert[lane] = my_e;
    }
}

extern "C" __global__ void __launch_bounds__(256)
moe_topk(const float* __restrict__ logits, int T, int E, int k, int gating, int norm, float scale,
         const int* __restrict__ n_valid, int* __restrict__ ids, float* __restrict__ weights,
         int* __restrict__ slot_expert) { ggf_pdl_entry();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (t >= T) return;
    if (t >= n_valid[0]) {
        for (int j = lane; j < k; j += 32) {
            ids[(long long)t * k + j] = j;
            weights[(long long)t * k + j] = 0.f;
            if (slot_expert) slot_expert[(long long)t * k + j] = -1;
        }
        return;
    }
    topk_row(logits + (long long)t * E, E, k, gating, norm, scale, lane, ids + (long long)t * k,
             weights + (long long)t * k, slot_expert ? slot_expert + (long long)t * k : nullptr);
}

// The one-token step's whole router in one launch: block r < E computes logits[r] = x . W[r]
// (f32, in f32), block E (with a shared expert) shared_out[0] = sigmoid(x . w_shared); the last
// block to finish (counter: an atomicInc that wraps back to 0 for the next launch) reads the E
// logits back and runs moe_topk's top-k on them (ids, weights, slot_expert). Each block asks L2
// for its weight row before it waits for the kernel before it (kernels/pdl.cuh).
// With nw set (a folded add_rms_norm: the decode step's post-attention norm, one launch fewer per
// layer), x is the norm's first operand and each block computes the norm of x + nb itself,
//   s = x + nb, xn = s / sqrt(mean(s^2) + eps) * nw   (as dense/elementwise.cu row_norm),
// and takes its dot product with xn; block 0 also writes s to nsum and xn to nout for the experts.
//   moe_route1(x, w, w_shared, D, E, k, gating, norm, scale, n_valid, logits, counter, ids,
//              weights, slot_expert, shared_out, nb, nw, eps, nsum, nout)
//   grid E (+1), 256 threads; D % 4 == 0, E <= 512
extern "C" __global__ void __launch_bounds__(256)
moe_route1(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ w_shared, int D,
           int E, int k, int gating, int norm, float scale, const int* __restrict__ n_valid, float* logits,
           unsigned* counter, int* __restrict__ ids, float* __restrict__ weights, int* __restrict__ slot_expert,
           float* __restrict__ shared_out, const float* __restrict__ nb, const float* __restrict__ nw, float eps,
           float* __restrict__ nsum, float* __restrict__ nout) {
    __shared__ float red[32];
    __shared__ float row[32 * ROUTE_MAX_PER_LANE];
    __shared__ int last;
    const int r = blockIdx.x;
    const float* wr = r < E ? w + (long long)r * D : w_shared;
    ggf_pdl_launch();
    prefetch_row_l2(reinterpret_cast<const unsigned char*>(wr), 4LL * D, threadIdx.x, 8);   // 256 threads
    ggf_pdl_wait();
    float acc = 0.f;
    if (nw == nullptr) {
        for (int i = threadIdx.x * 4; i < D; i += blockDim.x * 4) {
            const float4 a = *reinterpret_cast<const float4*>(x + i);
            const float4 b = *reinterpret_cast<const float4*>(wr + i);
            acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        float ss = 0.f;
        for (int i = threadIdx.x * 4; i < D; i += blockDim.x * 4) {
            const float4 a = *reinterpret_cast<const float4*>(x + i);
            const float4 c = *reinterpret_cast<const float4*>(nb + i);
            const float s0 = a.x + c.x, s1 = a.y + c.y, s2 = a.z + c.z, s3 = a.w + c.w;
            ss += s0 * s0 + s1 * s1 + s2 * s2 + s3 * s3;
        }
        const float sc = 1.0f / sqrtf(block_sum(ss, red) / (float)D + eps);
        for (int i = threadIdx.x * 4; i < D; i += blockDim.x * 4) {
            const float4 a = *reinterpret_cast<const float4*>(x + i);
            const float4 c = *reinterpret_cast<const float4*>(nb + i);
            const float4 g = *reinterpret_cast<const float4*>(nw + i);
            const float4 b = *reinterpret_cast<const float4*>(wr + i);
            const float4 sv = make_float4(a.x + c.x, a.y + c.y, a.z + c.z, a.w + c.w);
            const float4 xn = make_float4(sv.x * sc * g.x, sv.y * sc * g.y, sv.z * sc * g.z, sv.w * sc * g.w);
            acc += xn.x * b.x + xn.y * b.y + xn.z * b.z + xn.w * b.w;
            if (r == 0) {
                *reinterpret_cast<float4*>(nsum + i) = sv;
                *reinterpret_cast<float4*>(nout + i) = xn;
            }
        }
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) {
        if (r < E) logits[r] = acc;
        else shared_out[0] = 1.f / (1.f + __expf(-acc));
        __threadfence();
        last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;
    __threadfence();
    const int lane = threadIdx.x;
    if (n_valid[0] < 1) {                 // a padding token (never in a decode step; as moe_topk)
        for (int j = lane; j < k; j += 32) {
            ids[j] = j;
            weights[j] = 0.f;
            if (slot_expert) slot_expert[j] = -1;
        }
        return;
    }
    for (int e = lane; e < E; e += 32) row[e] = __ldcg(logits + e);   // other blocks' writes, past L1
    __syncwarp();
    topk_row(row, E, k, gating, norm, scale, lane, ids, weights, slot_expert);
}

extern "C" __global__ void __launch_bounds__(ROUTE_CHUNK)
moe_hist(const int* __restrict__ ids, int T, int k, int E, const int* __restrict__ n_valid,
         int* __restrict__ hist, int* __restrict__ sorted_slots, long long n_sorted) { ggf_pdl_entry();
    extern __shared__ int s_count[];   // E ints
    for (int e = threadIdx.x; e < E; e += ROUTE_CHUNK) s_count[e] = 0;
    for (long long i = (long long)blockIdx.x * ROUTE_CHUNK + threadIdx.x; i < n_sorted;
         i += (long long)gridDim.x * ROUTE_CHUNK)
        sorted_slots[i] = -1;
    __syncthreads();
    const long long slot = (long long)blockIdx.x * ROUTE_CHUNK + threadIdx.x;
    if (slot < (long long)T * k && slot / k < n_valid[0]) atomicAdd(&s_count[ids[slot]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += ROUTE_CHUNK) hist[(long long)blockIdx.x * E + e] = s_count[e];
}

extern "C" __global__ void __launch_bounds__(1024)
moe_scan(int* __restrict__ hist, int n_chunks, int E, int tile, int* __restrict__ offsets) { ggf_pdl_entry();
    __shared__ int s_warp[32];
    const int e = threadIdx.x, lane = e & 31, w = e >> 5;
    int run = 0;
    if (e < E) {
        for (int c = 0; c < n_chunks; ++c) {
            const int v = hist[(long long)c * E + e];
            hist[(long long)c * E + e] = run;
            run += v;
        }
    }
    const int padded = (run + tile - 1) / tile * tile;
    int incl = padded;                       // inclusive scan over e
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(GGF_FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) s_warp[w] = incl;
    __syncthreads();
    if (w == 0) {
        int x = s_warp[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(GGF_FULL_MASK, x, o);
            if (lane >= o) x += y;
        }
        s_warp[lane] = x;                    // inclusive over warps
    }
    __syncthreads();
    incl += w > 0 ? s_warp[w - 1] : 0;
    if (e < E) offsets[e] = incl - padded;
    if (e == E - 1) offsets[E] = incl;
}

extern "C" __global__ void __launch_bounds__(ROUTE_CHUNK)
moe_scatter(const int* __restrict__ ids, int T, int k, int E, const int* __restrict__ n_valid,
            const int* __restrict__ hist, const int* __restrict__ offsets, int* __restrict__ sorted_slots) { ggf_pdl_entry();
    __shared__ int s_e[ROUTE_CHUNK];
    const long long slot = (long long)blockIdx.x * ROUTE_CHUNK + threadIdx.x;
    const bool valid = slot < (long long)T * k && slot / k < n_valid[0];
    const int e = valid ? ids[slot] : -1;
    s_e[threadIdx.x] = e;
    __syncthreads();
    if (!valid) return;
    int rank = 0;                            // earlier slots of this chunk on the same expert
    for (int j = 0; j < (int)threadIdx.x; ++j) rank += s_e[j] == e;
    sorted_slots[offsets[e] + hist[(long long)blockIdx.x * E + e] + rank] = (int)slot;
}
