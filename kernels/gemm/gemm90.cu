// ggfuse-nvrtc-arch: sm_90 -> sm_90a
// Dense GEMMs for Hopper on wgmma (kernels/gemm/gemm90_core.cuh has the design); same meaning
// and arguments as gemm/gemm.cu:
//   gemm90_<a>_<w>:        C[M, N] (+)= A[M, K] @ W[N, K]^T
//   gemm90_swiglu_<a>_<w>: C[M, F] = silu(A Wg^T) * (A Wu^T)   (GLU_ACT=1: gelu(A Wg^T) * (A Wu^T))
// <a> = f32a | bf16a, <w> = bf16 | q8_0 | q4_k | q6_k. Threads and BN from g90::Cfg (bf16a_bf16:
// 384, BN 256; otherwise 512, BN 128), grid (ceil(N / BN), ceil(M / 128)) [swiglu:
// (ceil(F / (BN / 2)), ...)], dynamic shared memory = launch.smem_bytes90(w, a). K % 64 == 0 (and % 256 for K-quants).
// gemm90p_* / gemm90p_swiglu_*: the same, persistent (about one block per SM walking the
// (row tile, column tile) items; launch.py's default, GGFUSE_GEMM90_PERSIST=0 for a block per tile).
// Compiled for sm_90a; for any other target the entry points are empty (launch.py never picks
// them there).
#include "pdl.cuh"
#include "gemm/gemm90_core.cuh"
#ifndef GLU_ACT
#define GLU_ACT 0   // the GLU's gate: 0 SiLU (SwiGLU), 1 GELU-tanh (Gemma 4; launch.py builds a module with -DGLU_ACT=1)
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GEMM90_BODY(...) __VA_ARGS__
#else
#define GEMM90_BODY(...)
#endif

#define GEMM90_KERNELS(WNAME, WTYPE, AF32, ANAME) GEMM90_KERNELS_P(WNAME, WTYPE, AF32, ANAME, gemm90, false) \
    GEMM90_KERNELS_P(WNAME, WTYPE, AF32, ANAME, gemm90p, true)
#define GEMM90_KERNELS_P(WNAME, WTYPE, AF32, ANAME, PFX, PERSIST)                                   \
extern "C" __global__ void __launch_bounds__((g90::Cfg<WTYPE, AF32>::THREADS), 1)                   \
PFX##_##ANAME##_##WNAME(const void* a, long long lda, const unsigned char* w, long long w_row_bytes,  \
                        int M, int N, int K, void* c, long long ldc, int c_bf16, int accumulate) { ggf_pdl_entry(); \
    GEMM90_BODY(g90::gemm_block<WTYPE, AF32, g90::kGemm, PERSIST>(a, lda, w, w, w_row_bytes, 0, M, N,   \
                K, c, ldc, c_bf16, accumulate, nullptr, nullptr, 0, 1, nullptr);)                    \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__((g90::Cfg<WTYPE, AF32>::THREADS), 1)                   \
PFX##_swiglu_##ANAME##_##WNAME(const void* a, long long lda, const unsigned char* wg,                 \
                               const unsigned char* wu, long long w_row_bytes, int M, int F, int K,   \
                               void* c, long long ldc, int c_bf16) { ggf_pdl_entry();                \
    GEMM90_BODY(g90::gemm_block<WTYPE, AF32, g90::kSwiglu, PERSIST, false, GLU_ACT>(a, lda, wg, wu, w_row_bytes, 0,    \
                M, F, K, c, ldc, c_bf16, 0, nullptr, nullptr, 0, 1, nullptr);)                       \
}

#define GEMM90_BOTH_A(WNAME, WTYPE) GEMM90_KERNELS(WNAME, WTYPE, true, f32a) GEMM90_KERNELS(WNAME, WTYPE, false, bf16a)

GEMM90_BOTH_A(bf16, GGML_BF16)
GEMM90_BOTH_A(q8_0, GGML_Q8_0)
GEMM90_BOTH_A(q4_k, GGML_Q4_K)
GEMM90_BOTH_A(q6_k, GGML_Q6_K)
