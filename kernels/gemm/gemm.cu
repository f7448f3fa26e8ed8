// Dense GEMMs on the tensor cores (kernels/gemm/gemm_core.cuh has the design):
//   gemm_<a>_<w>:        C[M, N] (+)= A[M, K] @ W[N, K]^T
//   gemm_swiglu_<a>_<w>: C[M, F] = silu(A Wg^T) * (A Wu^T)   (built with GLU_ACT=1: gelu(A Wg^T) * (A Wu^T))
// <a> = f32a | bf16a (activation storage), <w> = the GGML type of W (bf16 = pre-dequantised).
// grid (ceil(N / 128), ceil(M / 128)) [swiglu: (ceil(F / 64), ...)], 256 threads,
// dynamic shared memory = launch.smem_bytes(w_type).
#include "pdl.cuh"
#include "gemm/gemm_core.cuh"
#ifndef GLU_ACT
#define GLU_ACT 0   // the GLU's gate: 0 SiLU (SwiGLU), 1 GELU-tanh (Gemma 4; launch.py builds a module with -DGLU_ACT=1)
#endif

#define GEMM_KERNELS(WNAME, WTYPE, AF32, ANAME)                                                     \
extern "C" __global__ void __launch_bounds__(gemm::kThreads, 2)                                     \
gemm_##ANAME##_##WNAME(const void* a, long long lda, const unsigned char* w, long long w_row_bytes,   \
                       int M, int N, int K, void* c, long long ldc, int c_bf16, int accumulate) { ggf_pdl_entry(); \
    gemm::gemm_block<WTYPE, AF32, gemm::kGemm>(a, lda, w, w, w_row_bytes, 0, M, N, K, c, ldc, c_bf16, \
                                               accumulate, nullptr, nullptr, 0, 1, nullptr);          \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__(gemm::kThreads, 2)                                     \
gemm_swiglu_##ANAME##_##WNAME(const void* a, long long lda, const unsigned char* wg,                  \
                              const unsigned char* wu, long long w_row_bytes, int M, int F, int K,    \
                              void* c, long long ldc, int c_bf16) { ggf_pdl_entry();                 \
    gemm::gemm_block<WTYPE, AF32, gemm::kSwiglu, GLU_ACT>(a, lda, wg, wu, w_row_bytes, 0, M, F, K, c, ldc,     \
                                                 c_bf16, 0, nullptr, nullptr, 0, 1, nullptr);        \
}

#define GEMM_BOTH_A(WNAME, WTYPE) GEMM_KERNELS(WNAME, WTYPE, true, f32a) GEMM_KERNELS(WNAME, WTYPE, false, bf16a)

GEMM_BOTH_A(bf16, GGML_BF16)
GEMM_BOTH_A(q4_0, GGML_Q4_0)
GEMM_BOTH_A(q4_1, GGML_Q4_1)
GEMM_BOTH_A(q5_0, GGML_Q5_0)
GEMM_BOTH_A(q8_0, GGML_Q8_0)
GEMM_BOTH_A(q4_k, GGML_Q4_K)
GEMM_BOTH_A(q5_k, GGML_Q5_K)
GEMM_BOTH_A(q6_k, GGML_Q6_K)
