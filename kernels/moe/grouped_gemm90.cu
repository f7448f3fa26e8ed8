// ggfuse-nvrtc-arch: sm_90 -> sm_90a
// MoE grouped GEMMs for Hopper on wgmma: the kernels of moe/grouped_gemm.cu (same arguments,
// layout and meaning) on the sm_90a core kernels/gemm/gemm90_core.cuh. Grid y walks row tiles
// of 128 sorted slots (MOE_TILE); x walks BN/2 output columns (gate_up) or BN (down), BN from
// g90::Cfg (128 for GGML weights and f32 x, 256 for bf16 x and bf16 weights).
//   moe90_gate_up_<a>_<w>: h[r, f] = silu(x[tok] Wg_e[f]) * (x[tok] Wu_e[f]); padding rows get 0.
//   moe90_down_<w>:        out[tok] += route_w[slot] * (h[r] Wd_e^T) by f32 vector atomics.
//   moe90p_gate_up_<a>_<w>, moe90p_down_<w>: the same, persistent (gemm90_core.cuh PERSIST):
//     grid (blocks, 1) with blocks ~ the SM count; each block walks the (row tile, column tile)
//     items of the layout blockIdx.x, + gridDim.x, ...; the number of row tiles is read from
//     expert_offsets[E] on the device.
//   moe90w_gate_up_<a>_<w>, moe90w_down_<w> (GGML W): persistent with wide tiles (gemm90_core.cuh
//     WIDE): 256-row tiles that never cross an expert (an expert's 128-padded segment is cut into
//     ceil(len / 256) tiles, counted on the device), m64 halves past the valid rows skipped; half
//     the dequantisation per MMA of the 128-row tiles.
// wtab (last argument, may be null): an expert table, as in moe/grouped_gemm.cu.
// Empty entry points for any target but sm_90a (launch.py picks them only there).
#include "pdl.cuh"
#include "gemm/gemm90_core.cuh"
#ifndef GLU_ACT
#define GLU_ACT 0   // the GLU's gate: 0 SiLU (SwiGLU), 1 GELU-tanh (Gemma 4; launch.py builds a module with -DGLU_ACT=1)
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE90_BODY(...) __VA_ARGS__
#else
#define MOE90_BODY(...)
#endif

#define MOE90_GATE_UP(WNAME, WTYPE, AF32, ANAME) MOE90_GATE_UP_P(WNAME, WTYPE, AF32, ANAME, moe90, false, false) \
    MOE90_GATE_UP_P(WNAME, WTYPE, AF32, ANAME, moe90p, true, false)
#define MOE90_GATE_UP_P(WNAME, WTYPE, AF32, ANAME, PFX, PERSIST, WIDE)                              \
extern "C" __global__ void __launch_bounds__((g90::Cfg<WTYPE, AF32, WIDE>::THREADS), 1)             \
PFX##_gate_up_##ANAME##_##WNAME(const void* x, long long ldx, const unsigned char* wg,                \
                                const unsigned char* wu, long long w_row_bytes,                       \
                                long long w_expert_bytes, int F, int K, void* h, long long ldh,       \
                                const int* sorted_slots, const int* expert_offsets, int n_expert,     \
                                int topk, const unsigned long long* wtab) { ggf_pdl_entry();          \
    MOE90_BODY(g90::gemm_block<WTYPE, AF32, g90::kMoeGateUp, PERSIST, WIDE, GLU_ACT>(x, ldx, wg, wu, w_row_bytes,       \
        w_expert_bytes, 0, F, K, h, ldh, 1, 0, sorted_slots, expert_offsets, n_expert, topk, nullptr, wtab);) \
}

#define MOE90_DOWN(WNAME, WTYPE, PFX, PERSIST, WIDE)                                                \
extern "C" __global__ void __launch_bounds__((g90::Cfg<WTYPE, false, WIDE>::THREADS), 1)            \
PFX##_down_##WNAME(const void* h, long long ldh, const unsigned char* wd, long long w_row_bytes,      \
                   long long w_expert_bytes, int D, int F, float* out, long long ldo,                 \
                   const int* sorted_slots, const int* expert_offsets, int n_expert, int topk,        \
                   const float* route_w, const unsigned long long* wtab) { ggf_pdl_entry();           \
    MOE90_BODY(g90::gemm_block<WTYPE, false, g90::kMoeDown, PERSIST, WIDE>(h, ldh, wd, wd, w_row_bytes,        \
        w_expert_bytes, 0, D, F, out, ldo, 0, 0, sorted_slots, expert_offsets, n_expert, topk, route_w, wtab);) \
}

#define MOE90_KERNELS(WNAME, WTYPE)                                                                 \
MOE90_GATE_UP(WNAME, WTYPE, true, f32a)                                                             \
MOE90_GATE_UP(WNAME, WTYPE, false, bf16a)                                                           \
MOE90_DOWN(WNAME, WTYPE, moe90, false, false)                                                       \
MOE90_DOWN(WNAME, WTYPE, moe90p, true, false)
// wide tiles (GGML weights, bf16 x): moe90w_*
#define MOE90_WIDE(WNAME, WTYPE)                                                                    \
MOE90_GATE_UP_P(WNAME, WTYPE, false, bf16a, moe90w, true, true)                                     \
MOE90_DOWN(WNAME, WTYPE, moe90w, true, true)

MOE90_KERNELS(bf16, GGML_BF16)
MOE90_KERNELS(q8_0, GGML_Q8_0)
MOE90_KERNELS(q4_k, GGML_Q4_K)
MOE90_KERNELS(q6_k, GGML_Q6_K)
MOE90_WIDE(q8_0, GGML_Q8_0)
MOE90_WIDE(q4_k, GGML_Q4_K)
MOE90_WIDE(q6_k, GGML_Q6_K)
