// Routed experts for a few tokens (the decode step): matrix-vector products straight from the
// experts' GGUF rows, reading only the k experts each token picked, plus the shared expert as
// one more slot of each token in the same two launches. The grouped GEMMs (grouped_gemm*.cu)
// cut the same work into 128-row tensor-core tiles, which for one token read every tile of the
// padded layout and leave almost every MMA row empty.
//
//   moe_slot_experts(slots, offsets, E, n_slots, slot_expert)       (one block of 1024 threads)
//       slot_expert[j] = the expert e whose rows of the sorted layout hold slot j, or -1 for a
//       slot the layout does not hold (a padding token's)
//   moe_gemv_gate_up_<a>_<name>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h,
//                               slot_expert, wtab, act, sh_gate, sh_up, sh_row_bytes, Fs, hs)
//       routed slot j < T k (token t = j / k) of expert e = slot_expert[j]:
//           h[j, f] = act(x[t] . Wg_e[f]) * (x[t] . Wu_e[f])      f < F   (act 0 silu, 1 gelu)
//       a slot with e < 0 gets a zero row; slot_expert == nullptr: expert 0 for every slot.
//       with sh_gate != nullptr, shared slot T k + t of token t:
//           hs[t, f] = silu(x[t] . Wsg[f]) * (x[t] . Wsu[f])          f < Fs
//   moe_gemv_down_<name>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out,
//                        accumulate, wtab, sh_down, sh_row_bytes, Fs, hs, sh_scale)
//       out[t, d] (+)= sum_j weights[t, j] * (h[t k + j] . Wd_e[d])      e = slot_expert[t k + j]
//                      + sh_scale[t] * (hs[t] . Wsd[d])                  (with sh_down != nullptr)
//       (slot_expert == nullptr: e = 0 for every slot); slots with e < 0 add nothing.
//       accumulate: add to out, else write it. Deterministic: a fixed order, no atomics.
// <name> is the weight type (q4_k, ...: routed and shared experts of that type) or, in the
// module built with MOE_GEMV_PAIR_* defined (launch.py _gemv_module), <routed>_<shared> for a
// shared expert of another type: each slot's dot products are instantiated for its own type.
//
// Expert e's weights: w_gate + e * e_bytes and up_ptr + e * e_bytes (merged gate_up: up_ptr =
// w_gate + F * row_bytes, e_bytes = 2 F row_bytes), w_down + e * e_bytes; or, with an expert
// table wtab (kernels/moe/table.py; streamed layers), gate at wtab[e], up at wtab[E + e], down
// at wtab[e]. The shared expert's rows: sh_* + f * sh_row_bytes. x: f32 or bf16 rows, 16-byte
// aligned; h, hs: f32 [T k, F], [T, Fs]; out: f32 [T, D]. D, F, Fs multiples of 8 and of their
// weight type's block.
//
// Why this shape (the decode step is latency-bound: 8 experts of 35B-A3B plus its shared one
// are ~18 MB a layer, ~4 us of HBM time, so what counts is how many loads are in flight, how
// many round trips lie on the path, and how many launches):
// - The shared expert is one more slot per token in both launches, not two more launches
//   (whose gate_up grid was 64 blocks): 2 launches a layer instead of 4.
// - No shared-memory staging of x or h before the first weight load: every lane loads the
//   vector elements of its units (quant/dot_unit.cuh) through L1 alongside its weight loads,
//   and nothing branches on a slot's expert (a slot without one reads expert 0 and counts zero),
//   so those loads need not wait for slot_expert either.
// - Each vector unit loaded serves several rows: gate_up a warp computes the gate and up rows of
//   2 f values (4 rows), down a warp 8 output rows. A lane takes its units of all its rows in
//   one step (rows_dot: one basic block, every load in flight at once): for the 35B shapes one
//   step, 2 Q4_K units of a 2048-long row, 1 Q6_K unit of a 512-long one.
// - Type-specific units (quant/dot_unit.cuh) for Q4_K / Q6_K / Q8_0: a header decoded per 16-32
//   elements and quants made floats without I2F (16 per SM per clock), which in dq8's groups of 8
//   cost the old kernels ~8 us a layer of conversions alone.
// - gate_up: 128-thread blocks, a warp per 2 f, grid (ceil(max(F, Fs) / 8), T k (+ T)): 9 x 64
//   = 576 blocks for one 35B token; the launch bounds (5 blocks per SM, 96 registers) keep all
//   of them resident on 132 SMs. Each warp reduces its 4 rows with one transposing butterfly
//   (warp_sum_n: 7 shuffles instead of 20).
// - down: a block per 8 output rows of a token, a warp per slot (k + 1 = 9 warps for 35B), grid
//   (ceil(D / 8), T) = 256 blocks, two resident per SM by the launch bounds (96 registers); each
//   warp sums its slot's 8 rows in registers, one butterfly (9 shuffles) reduces them, and the
//   block adds the slots' partial rows in shared memory in slot order. (The old kernel walked a
//   token's k experts one after another with a warp reduction per expert per row.) One unit per
//   lane per step: two would spill under these bounds; rows longer than 32 units take more steps.
#include "pdl.cuh"
#include "common.cuh"
#include "quant/ggml_quants.cuh"
#include "quant/dq8.cuh"
#include "quant/dot_unit.cuh"

#define GU_WARPS 4              // warps per gate_up block
#define GU_F 2                  // f values per gate_up warp: rows gate f, up f, gate f + 1, up f + 1
#define DN_ROWS 8               // output rows per down block (and per warp)
#define DN_MAX_WARPS 9          // down: a warp per slot, up to k + 1 = 9; more slots loop over the warps

typedef unsigned char u8;

// The sums over the warp of N (a power of two <= 32) values per lane, in one butterfly that
// halves the values each step (N - 1 shuffles) and then sums the last 32 / N lanes: lane l ends
// with the total of value (l >> (5 - log2 N)) & (N - 1), e.g. N = 4: lanes 8i hold value i.
template<int N>
__device__ __forceinline__ float warp_sum_n(float (&a)[N], int lane) {
#pragma unroll
    for (int half = N / 2, dist = 16; half >= 1; half >>= 1, dist >>= 1) {
        const bool upper = lane & dist;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? a[i] : a[i + half];
            const float keep = upper ? a[i + half] : a[i];
            a[i] = keep + __shfl_xor_sync(GGF_FULL_MASK, send, dist);
        }
    }
    float v = a[0];
#pragma unroll
    for (int dist = 16 / N; dist >= 1; dist >>= 1) v += __shfl_xor_sync(GGF_FULL_MASK, v, dist);
    return v;
}

// slot_expert[j] = the expert holding slot j in the sorted layout (ref.route_layout), -1 for a
// slot it does not hold (a padding token's). One block: every sorted row r < offsets[E] looks
// its expert up in the offsets (binary search in shared memory) and writes it at its slot.
extern "C" __global__ void __launch_bounds__(1024)
moe_slot_experts(const int* __restrict__ slots, const int* __restrict__ offsets, int E, int n_slots,
                 int* __restrict__ slot_expert) { ggf_pdl_entry();
    extern __shared__ int offs[];        // E + 1
    for (int i = threadIdx.x; i <= E; i += blockDim.x) offs[i] = offsets[i];
    for (int j = threadIdx.x; j < n_slots; j += blockDim.x) slot_expert[j] = -1;
    __syncthreads();
    for (int r = threadIdx.x; r < offs[E]; r += blockDim.x) {
        const int j = slots[r];
        if (j < 0 || j >= n_slots) continue;
        int lo = 0, hi = E - 1;              // the last e with offs[e] <= r
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (offs[mid] <= r) lo = mid; else hi = mid - 1;
        }
        slot_expert[j] = lo;
    }
}

// acc[r] += wt * (this lane's units of rows[r] . xr), r < R (a K-element vector xr, K / UE units
// per row, lane l taking units l, l + 32, ...), N units per lane per step: a step's loads form
// one basic block, so all of them are in flight at once (a loop of single units would branch
// between them and serialise the round trips); a step's units past the row repeat its first unit
// and count zero.
template<int W, int R, int N, typename A>
__device__ __forceinline__ void rows_dot_n(const A* __restrict__ xr, const u8* const (&rows)[R], int K, int lane,
                                           float (&acc)[R], float wt) {
    typedef Unit<W> U;
    const int nu = K / U::UE;
    for (int u0 = lane; u0 < nu; u0 += 32 * N) {
        int u[N];
        float live[N];
        typename U::X xv[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const bool in = u0 + 32 * i < nu;
            u[i] = in ? u0 + 32 * i : u0;
            live[i] = in ? wt : 0.0f;
            xv[i] = U::load_x(xr, u[i]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int i = 0; i < N; ++i) acc[r] = fmaf(live[i], U::dot(rows[r], u[i], xv[i]), acc[r]);
        }
    }
}
// The step for a row of nu units: as many units per lane as the row has (one step), up to NMAX
// (gate_up 4: the 35B's 2048-long Q4_K rows are 2 units per lane; down 1: its 8 rows per warp
// are the loads in flight, and 2 units would spill under its launch bounds).
template<int W, int R, int NMAX, typename A>
__device__ __forceinline__ void rows_dot(const A* __restrict__ xr, const u8* const (&rows)[R], int K, int lane,
                                         float (&acc)[R], float wt = 1.0f) {
    const int nu = K / Unit<W>::UE;
    if constexpr (NMAX == 1) {
        rows_dot_n<W, R, 1, A>(xr, rows, K, lane, acc, wt);
    } else {
        if (nu <= 32) rows_dot_n<W, R, 1, A>(xr, rows, K, lane, acc, wt);
        else if (NMAX == 2 || nu <= 64) rows_dot_n<W, R, 2, A>(xr, rows, K, lane, acc, wt);
        else rows_dot_n<W, R, (NMAX > 2 ? 4 : 2), A>(xr, rows, K, lane, acc, wt);
    }
}

template<int WR, int WS, typename A>
__device__ __forceinline__ void gate_up_impl(const A* __restrict__ x, long long ldx, int T, int k, int E,
                                             const u8* __restrict__ w_gate, unsigned long long up_ptr,
                                             long long e_bytes, long long row_bytes, int F, int D,
                                             float* __restrict__ h, const int* __restrict__ slot_expert,
                                             const unsigned long long* __restrict__ wtab, int act,
                                             const u8* __restrict__ sh_gate, const u8* __restrict__ sh_up,
                                             long long sh_row_bytes, int Fs, float* __restrict__ hs) {
    const int j = blockIdx.y, lane = threadIdx.x & 31;
    const int f0 = (blockIdx.x * GU_WARPS + (threadIdx.x >> 5)) * GU_F;
    const bool shared = j >= T * k;              // only with sh_gate: the grid has T more slots then
    const int t = shared ? j - T * k : j / k;
    const int Fj = shared ? Fs : F;
    if (f0 >= Fj) return;
    float* hrow = shared ? hs + (long long)t * Fs : h + (long long)j * F;
    const int f1 = min(f0 + 1, Fj - 1);          // a lone last f reads its own rows twice, writes once
    // a slot without an expert (e < 0) reads expert 0 and writes zeros: no branch on e, so the
    // x loads need not wait for slot_expert
    const int e = shared || !slot_expert ? 0 : slot_expert[j];
    const int ee = max(e, 0);
    const u8* wg = shared ? sh_gate : wtab ? reinterpret_cast<const u8*>(wtab[ee]) : w_gate + ee * e_bytes;
    const u8* wu = shared ? sh_up : wtab ? reinterpret_cast<const u8*>(wtab[E + ee])
                                         : reinterpret_cast<const u8*>(up_ptr) + ee * e_bytes;
    const long long rb = shared ? sh_row_bytes : row_bytes;
    const u8* const rows[4] = {wg + f0 * rb, wu + f0 * rb, wg + f1 * rb, wu + f1 * rb};
    const A* xr = x + (long long)t * ldx;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (WR == WS) {
        rows_dot<WR, 4, 4, A>(xr, rows, D, lane, acc);
    } else {
        if (shared) rows_dot<WS, 4, 4, A>(xr, rows, D, lane, acc);
        else rows_dot<WR, 4, 4, A>(xr, rows, D, lane, acc);
    }
    const float v = warp_sum_n<4>(acc, lane);                    // lane 8i: row i
    const float up = __shfl_down_sync(GGF_FULL_MASK, v, 8);     // lane 0: up f0, lane 16: up f1
    const float hv = e < 0 ? 0.0f : glu_gate_by(v, shared ? 0 : act) * up;
    if (lane == 0) hrow[f0] = hv;
    if (lane == 16 && f0 + 1 < Fj) hrow[f0 + 1] = hv;
}

// acc[r] += wt * (this lane's units of row d0 + r of w . hr), r < DN_ROWS (rows past D repeat D - 1)
template<int W>
__device__ __forceinline__ void down_rows(const float* __restrict__ hr, const u8* __restrict__ w, long long rb, int K,
                                          int d0, int D, float wt, int lane, float (&acc)[DN_ROWS]) {
    const u8* rows[DN_ROWS];
#pragma unroll
    for (int r = 0; r < DN_ROWS; ++r) rows[r] = w + (long long)min(d0 + r, D - 1) * rb;
    rows_dot<W, DN_ROWS, 1, float>(hr, rows, K, lane, acc, wt);
}

template<int WR, int WS>
__device__ __forceinline__ void down_impl(const float* __restrict__ h, int T, int k, const float* __restrict__ weights,
                                          const u8* __restrict__ w_down, long long e_bytes, long long row_bytes,
                                          int D, int F, const int* __restrict__ slot_expert, float* __restrict__ out,
                                          int accumulate, const unsigned long long* __restrict__ wtab,
                                          const u8* __restrict__ sh_down, long long sh_row_bytes, int Fs,
                                          const float* __restrict__ hs, const float* __restrict__ sh_scale) {
    __shared__ float part[DN_MAX_WARPS][DN_ROWS];
    const int t = blockIdx.y, d0 = blockIdx.x * DN_ROWS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int n_slots = k + (sh_down != nullptr ? 1 : 0);
    float acc[DN_ROWS];
#pragma unroll
    for (int r = 0; r < DN_ROWS; ++r) acc[r] = 0.0f;
    for (int jj = warp; jj < n_slots; jj += nw) {
        const bool shared = jj == k;
        const float* hr;
        const u8* w;
        long long rb;
        int K;
        float wt;
        if (shared) {
            hr = hs + (long long)t * Fs, w = sh_down, rb = sh_row_bytes, K = Fs, wt = sh_scale[t];
        } else {
            // a slot without an expert (e < 0) reads expert 0 with weight 0 (its h row is zeros):
            // no branch on e, so the h loads need not wait for slot_expert
            const int j = t * k + jj;
            const int e = slot_expert ? slot_expert[j] : 0;
            const int ee = max(e, 0);
            hr = h + (long long)j * F;
            w = wtab ? reinterpret_cast<const u8*>(wtab[ee]) : w_down + ee * e_bytes;
            rb = row_bytes, K = F, wt = e < 0 ? 0.0f : weights[j];
        }
        if constexpr (WR == WS) {
            down_rows<WR>(hr, w, rb, K, d0, D, wt, lane, acc);
        } else {
            if (shared) down_rows<WS>(hr, w, rb, K, d0, D, wt, lane, acc);
            else down_rows<WR>(hr, w, rb, K, d0, D, wt, lane, acc);
        }
    }
    const float v = warp_sum_n<DN_ROWS>(acc, lane);              // lane 4r: row r
    if ((lane & 3) == 0) part[warp][lane >> 2] = v;
    __syncthreads();
    const int r = threadIdx.x;
    if (r < DN_ROWS && d0 + r < D) {
        float s = 0.0f;
        for (int w = 0; w < nw; ++w) s += part[w][r];            // slot order: deterministic
        float* o = out + (long long)t * D + d0 + r;
        *o = accumulate ? *o + s : s;
    }
}

#define MOE_GEMV_GU(NAME, WR, WS, ATYPE, ANAME)                                                                  \
extern "C" __global__ void __launch_bounds__(GU_WARPS * 32, 5)                                                    \
moe_gemv_gate_up_##ANAME##_##NAME(const ATYPE* x, long long ldx, int T, int k, int E, const u8* w_gate,         \
                                  unsigned long long up_ptr, long long e_bytes, long long row_bytes, int F,      \
                                  int D, float* h, const int* slot_expert, const unsigned long long* wtab,       \
                                  int act, const u8* sh_gate, const u8* sh_up, long long sh_row_bytes, int Fs,   \
                                  float* hs) { ggf_pdl_entry();                                                  \
    gate_up_impl<WR, WS, ATYPE>(x, ldx, T, k, E, w_gate, up_ptr, e_bytes, row_bytes, F, D, h, slot_expert,       \
                                wtab, act, sh_gate, sh_up, sh_row_bytes, Fs, hs);                                \
}
#define MOE_GEMV_KERNELS_(NAME, WR, WS)                                                                          \
MOE_GEMV_GU(NAME, WR, WS, float, f32a) MOE_GEMV_GU(NAME, WR, WS, __nv_bfloat16, bf16a)                           \
extern "C" __global__ void __launch_bounds__(DN_MAX_WARPS * 32, 2)                                               \
moe_gemv_down_##NAME(const float* h, int T, int k, const float* weights, const u8* w_down, long long e_bytes,    \
                     long long row_bytes, int D, int F, const int* slot_expert, float* out, int accumulate,      \
                     const unsigned long long* wtab, const u8* sh_down, long long sh_row_bytes, int Fs,          \
                     const float* hs, const float* sh_scale) { ggf_pdl_entry();                                  \
    down_impl<WR, WS>(h, T, k, weights, w_down, e_bytes, row_bytes, D, F, slot_expert, out, accumulate, wtab,    \
                      sh_down, sh_row_bytes, Fs, hs, sh_scale);                                                  \
}
#define MOE_GEMV_KERNELS(NAME, WR, WS) MOE_GEMV_KERNELS_(NAME, WR, WS)    // (expands a NAME macro first)

#ifdef MOE_GEMV_PAIR_NAME
// a shared expert whose type differs from the routed experts': only that pair
MOE_GEMV_KERNELS(MOE_GEMV_PAIR_NAME, MOE_GEMV_PAIR_WR, MOE_GEMV_PAIR_WS)
#else
MOE_GEMV_KERNELS(f32, GGML_F32, GGML_F32)
MOE_GEMV_KERNELS(f16, GGML_F16, GGML_F16)
MOE_GEMV_KERNELS(bf16, GGML_BF16, GGML_BF16)
MOE_GEMV_KERNELS(q4_0, GGML_Q4_0, GGML_Q4_0)
MOE_GEMV_KERNELS(q4_1, GGML_Q4_1, GGML_Q4_1)
MOE_GEMV_KERNELS(q5_0, GGML_Q5_0, GGML_Q5_0)
MOE_GEMV_KERNELS(q5_1, GGML_Q5_1, GGML_Q5_1)
MOE_GEMV_KERNELS(q8_0, GGML_Q8_0, GGML_Q8_0)
MOE_GEMV_KERNELS(q2_k, GGML_Q2_K, GGML_Q2_K)
MOE_GEMV_KERNELS(q3_k, GGML_Q3_K, GGML_Q3_K)
MOE_GEMV_KERNELS(q4_k, GGML_Q4_K, GGML_Q4_K)
MOE_GEMV_KERNELS(q5_k, GGML_Q5_K, GGML_Q5_K)
MOE_GEMV_KERNELS(q6_k, GGML_Q6_K, GGML_Q6_K)
#endif
