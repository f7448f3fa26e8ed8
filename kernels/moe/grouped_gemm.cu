// MoE grouped GEMMs over the expert-sorted layout of moe_route (kernels/moe/ref.py): one launch
// covers every expert. Grid y walks row tiles of 128 sorted slots; a tile belongs to exactly one
// expert because every expert segment is padded to a multiple of the tile (tile % 128 == 0),
// and tiles from expert_offsets[E] on exit at once, so the grid is sized for the worst case.
// Design of the tensor-core main loop: kernels/gemm/gemm_core.cuh.
//
//   moe_gate_up_<a>_<w>: h[r, f] = silu(x[tok] Wg_e[f]) * (x[tok] Wu_e[f]), r a sorted row of
//                        expert e, tok = sorted_slots[r] / topk; padding rows get 0.
//                        grid (ceil(F / 64), S / 128), h bf16 [S, F].
//   moe_down_<w>:        out[tok] += route_w[slot] * (h[r] Wd_e^T), slot = sorted_slots[r] >= 0,
//                        by f32 vector atomics. grid (ceil(D / 128), S / 128), out f32 [T, D].
// wtab (last argument, may be null): an expert table, expert e's weights at wtab[e] (gate or down)
// and wtab[n_expert + e] (up) instead of w + e * w_expert_bytes (kernels/moe/launch.py).
#include "pdl.cuh"
#include "gemm/gemm_core.cuh"
#ifndef GLU_ACT
#define GLU_ACT 0   // the GLU's gate: 0 SiLU (SwiGLU), 1 GELU-tanh (Gemma 4; launch.py builds a module with -DGLU_ACT=1)
#endif

#define MOE_GATE_UP(WNAME, WTYPE, AF32, ANAME)                                                      \
extern "C" __global__ void __launch_bounds__(gemm::kThreads, 2)                                     \
moe_gate_up_##ANAME##_##WNAME(const void* x, long long ldx, const unsigned char* wg,                  \
                              const unsigned char* wu, long long w_row_bytes, long long w_expert_bytes,\
                              int F, int K, void* h, long long ldh, const int* sorted_slots,          \
                              const int* expert_offsets, int n_expert, int topk,                      \
                              const unsigned long long* wtab) { ggf_pdl_entry();                      \
    gemm::gemm_block<WTYPE, AF32, gemm::kMoeGateUp, GLU_ACT>(x, ldx, wg, wu, w_row_bytes, w_expert_bytes, 0,   \
        F, K, h, ldh, 1, 0, sorted_slots, expert_offsets, n_expert, topk, nullptr, wtab);             \
}

#define MOE_KERNELS(WNAME, WTYPE)                                                                   \
MOE_GATE_UP(WNAME, WTYPE, true, f32a)                                                               \
MOE_GATE_UP(WNAME, WTYPE, false, bf16a)                                                             \
extern "C" __global__ void __launch_bounds__(gemm::kThreads, 2)                                     \
moe_down_##WNAME(const void* h, long long ldh, const unsigned char* wd, long long w_row_bytes,        \
                 long long w_expert_bytes, int D, int F, float* out, long long ldo,                   \
                 const int* sorted_slots, const int* expert_offsets, int n_expert, int topk,          \
                 const float* route_w, const unsigned long long* wtab) { ggf_pdl_entry();             \
    gemm::gemm_block<WTYPE, false, gemm::kMoeDown>(h, ldh, wd, wd, w_row_bytes, w_expert_bytes, 0,    \
        D, F, out, ldo, 0, 0, sorted_slots, expert_offsets, n_expert, topk, route_w, wtab);           \
}

MOE_KERNELS(bf16, GGML_BF16)
MOE_KERNELS(q4_0, GGML_Q4_0)
MOE_KERNELS(q4_1, GGML_Q4_1)
MOE_KERNELS(q5_0, GGML_Q5_0)
MOE_KERNELS(q8_0, GGML_Q8_0)
MOE_KERNELS(q4_k, GGML_Q4_K)
MOE_KERNELS(q5_k, GGML_Q5_K)
MOE_KERNELS(q6_k, GGML_Q6_K)
