// Small row kernels the runtime composes around the big ones.
//   rowdot_sigmoid: out[t] = sigmoid(dot(x[t, :], w))      (the shared expert's gate, [T, D] x [D])
//   axpy_rows:      out[t, :] += y[t, :] * s[t]             (adding the gated shared expert)
// x, y, out rows have strides (elements); D is the row length.
#include "pdl.cuh"
#include "common.cuh"

extern "C" __global__ void rowdot_sigmoid_f32(const float* __restrict__ x, long long ldx,
                                              const float* __restrict__ w, float* __restrict__ out,
                                              int T, int D) { ggf_pdl_entry();
    // one warp per row
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= T) return;
    const float* xr = x + (long long)warp * ldx;
    float acc = 0.f;
    for (int i = lane; i < D; i += 32) acc += xr[i] * w[i];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[warp] = 1.f / (1.f + __expf(-acc));
}

extern "C" __global__ void axpy_rows_f32(float* __restrict__ out, long long ldo,
                                         const float* __restrict__ y, long long ldy,
                                         const float* __restrict__ s, int T, int D) { ggf_pdl_entry();
    const long long n = (long long)T * D;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / D, d = i - t * D;
        out[t * ldo + d] += y[t * ldy + d] * s[t];
    }
}

// Gemma 4's per-expert output scale folded into the route weights (kernels/moe/ref.py moe_route
// expert_scale): weights[t, j] *= scale[ids[t, j]] for the T*k slots. ids and weights contiguous.
extern "C" __global__ void scale_by_expert_f32(float* __restrict__ weights, const int* __restrict__ ids,
                                               const float* __restrict__ scale, int n) { ggf_pdl_entry();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        weights[i] *= scale[ids[i]];
}
