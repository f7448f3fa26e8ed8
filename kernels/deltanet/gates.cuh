// The gated DeltaNet's per-head gates (llama.cpp's GDN): g = softplus(alpha + dt_bias) * ssm_a
// (ssm_a as the GGUF stores it, -exp(A)) and beta = sigmoid(beta_lin), for one value head.
// dense/elementwise.cu deltanet_gates writes them; deltanet/recurrent.cu gdr_step_fused
// computes them itself.
#pragma once
#include "common.cuh"

__device__ __forceinline__ void gdn_gates(float alpha, float dt_bias, float ssm_a, float beta_lin, float& g,
                                          float& beta) {
    const float x = alpha + dt_bias;
    const float sp = x > 20.0f ? x : log1pf(expf(x));
    g = sp * ssm_a;
    beta = sigmoidf_(beta_lin);
}
