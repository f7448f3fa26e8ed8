// Routed experts of precision="f32" (runtime/cuda/ops.py) over the expert-sorted, tile-padded
// layout of moe/route.cu (kernels/moe/ref.py): f32 activations, expert weights read as the GGUF
// stores them and dequantised in f32, f32 products on CUDA cores (core: dense/qf32_tile.cuh).
// One launch covers every expert: a 64-row block tile lies inside one expert segment because the
// layout's tile is a multiple of 64; tiles from expert_offsets[E] on exit at once, so the grid is
// sized for the static worst case S and nothing depends on the host.
//
//   moe_gate_up_qf32_<w>(x, ldx, wg, wu, row_bytes, expert_bytes, F, D, h, ldh, slots, offs, E, topk, wtab)
//       h[r, f] = silu(x[tok] . Wg_e[f]) * (x[tok] . Wu_e[f]) (GLU_ACT=1: gelu), r a sorted row of expert e,
//       tok = slots[r] / topk; padding rows (slot -1) get 0.   grid (ceil(F/64), S/64), h f32
//   moe_down_qf32_<w>(h, ldh, wd, row_bytes, expert_bytes, D, F, slots, offs, E, route_w, y, ldy, wtab)
//       y[slot, d] = route_w[slot] * (h[r] . Wd_e[d]) for slot = slots[r] >= 0.
//       grid (ceil(D/64), S/64); y f32 [T*k, ldy] indexed by slot (rows of unrouted slots are
//       not written: the launcher clears y first)
//   moe_sum_slots_f32(y, ldy, T, k, D, out, ldo)
//       out[t, d] = sum_{j < k} y[t*k + j, d], j in order (deterministic; no atomics)
// Weight e of a stack starts expert_bytes after weight e-1; rows are row_bytes apart. With an
// expert table wtab (may be null) expert e is at wtab[e] (gate, down) and wtab[E + e] (up) instead.
#include "pdl.cuh"
#include "dense/qf32_tile.cuh"

// The expert owning sorted row m0 (offs[e] <= m0 < offs[e+1]), or -1 past offs[E].
__device__ __forceinline__ int expert_of(const int* __restrict__ offs, int E, int m0) {
    if (m0 >= offs[E]) return -1;
    int lo = 0, hi = E;            // offs[lo] <= m0 < offs[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offs[mid] <= m0) lo = mid; else hi = mid;
    }
    return lo;
}

template<int W>
__device__ __forceinline__ void gate_up_impl(const float* __restrict__ x, long long ldx,
                                             const unsigned char* __restrict__ wg,
                                             const unsigned char* __restrict__ wu, long long row_bytes,
                                             long long expert_bytes, int F, int D, float* __restrict__ h,
                                             long long ldh, const int* __restrict__ slots,
                                             const int* __restrict__ offs, int E, int topk,
                                             const unsigned long long* __restrict__ wtab) {
    __shared__ long long a_off[qf32::BM];
    __shared__ int s_e;
    const int m0 = blockIdx.y * qf32::BM, n0 = blockIdx.x * qf32::BN;
    if (threadIdx.x == 0) s_e = expert_of(offs, E, m0);
    if (threadIdx.x < qf32::BM) {
        const int slot = slots[m0 + threadIdx.x];
        a_off[threadIdx.x] = slot >= 0 ? (long long)(slot / topk) * ldx : -1;
    }
    __syncthreads();
    const int e = s_e;
    if (e < 0) return;
    float acc0[4][4] = {}, acc1[4][4] = {};
    qf32::tile<W, true>(a_off, x, expert_weights(wtab, e, wg, e, expert_bytes),
                        expert_weights(wtab, E + e, wu, e, expert_bytes), row_bytes, n0, F, D, acc0, acc1);
    for_tile4x4(n0, F, [&](int i, int j, int r, int n) {
        h[(long long)(m0 + r) * ldh + n] = a_off[r] < 0 ? 0.f : qf32::glu_gate(acc0[i][j]) * acc1[i][j];
    });
}

template<int W>
__device__ __forceinline__ void down_impl(const float* __restrict__ h, long long ldh,
                                          const unsigned char* __restrict__ wd, long long row_bytes,
                                          long long expert_bytes, int D, int F,
                                          const int* __restrict__ slots, const int* __restrict__ offs, int E,
                                          const float* __restrict__ route_w, float* __restrict__ y,
                                          long long ldy, const unsigned long long* __restrict__ wtab) {
    __shared__ long long a_off[qf32::BM];
    __shared__ int s_slot[qf32::BM];
    __shared__ int s_e;
    const int m0 = blockIdx.y * qf32::BM, n0 = blockIdx.x * qf32::BN;
    if (threadIdx.x == 0) s_e = expert_of(offs, E, m0);
    if (threadIdx.x < qf32::BM) {
        const int slot = slots[m0 + threadIdx.x];
        s_slot[threadIdx.x] = slot;
        a_off[threadIdx.x] = slot >= 0 ? (long long)(m0 + threadIdx.x) * ldh : -1;
    }
    __syncthreads();
    const int e = s_e;
    if (e < 0) return;
    float acc0[4][4] = {}, acc1[4][4];
    qf32::tile<W, false>(a_off, h, expert_weights(wtab, e, wd, e, expert_bytes), nullptr, row_bytes, n0, D, F,
                         acc0, acc1);
    for_tile4x4(n0, D, [&](int i, int j, int r, int n) {
        const int slot = s_slot[r];
        if (slot >= 0) y[(long long)slot * ldy + n] = acc0[i][j] * route_w[slot];
    });
}

#define MOE_QF32(WNAME, WTYPE)                                                                      \
extern "C" __global__ void __launch_bounds__(qf32::THREADS)                                         \
moe_gate_up_qf32_##WNAME(const float* x, long long ldx, const unsigned char* wg,                    \
                         const unsigned char* wu, long long row_bytes, long long expert_bytes,      \
                         int F, int D, float* h, long long ldh, const int* slots, const int* offs,  \
                         int E, int topk, const unsigned long long* wtab) { ggf_pdl_entry();        \
    gate_up_impl<WTYPE>(x, ldx, wg, wu, row_bytes, expert_bytes, F, D, h, ldh, slots, offs, E, topk, wtab); \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__(qf32::THREADS)                                         \
moe_down_qf32_##WNAME(const float* h, long long ldh, const unsigned char* wd, long long row_bytes,  \
                      long long expert_bytes, int D, int F, const int* slots, const int* offs,      \
                      int E, const float* route_w, float* y, long long ldy,                         \
                      const unsigned long long* wtab) { ggf_pdl_entry();                            \
    down_impl<WTYPE>(h, ldh, wd, row_bytes, expert_bytes, D, F, slots, offs, E, route_w, y, ldy, wtab); \
}

QF32_ALL_TYPES(MOE_QF32)

extern "C" __global__ void __launch_bounds__(256)
moe_sum_slots_f32(const float* __restrict__ y, long long ldy, int T, int k, int D, float* __restrict__ out,
                  long long ldo) { ggf_pdl_entry();
    const long long n = (long long)T * D;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / D, d = i - t * D;
        float s = 0.f;
        for (int j = 0; j < k; ++j) s += y[(t * k + j) * ldy + d];
        out[t * ldo + d] = s;
    }
}
