// The GEMM epilogue's pair store, shared by the mma.sync core (gemm_core.cuh) and the wgmma core
// (gemm90_core.cuh): a thread's accumulator fragment holds two adjacent columns of a row.
#pragma once
#include <cuda_bf16.h>

namespace gepi {

// C[n], C[n + 1] of the row at c + row_off (elements) = (v0, v1), plus what is there when
// accumulate; f32 or bf16 (round to nearest even) by c_bf16; columns >= N are not touched.
__device__ __forceinline__ void store_pair(void* c, long long row_off, int n, int N, float v0, float v1,
                                           int c_bf16, int accumulate) {
    if (c_bf16) {
        __nv_bfloat16* o = static_cast<__nv_bfloat16*>(c) + row_off + n;
        if (n + 1 < N) {
            if (accumulate) {
                const __nv_bfloat162 old = *reinterpret_cast<const __nv_bfloat162*>(o);
                v0 += __low2float(old);
                v1 += __high2float(old);
            }
            const __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
            *reinterpret_cast<unsigned int*>(o) = *reinterpret_cast<const unsigned int*>(&h);
        } else if (n < N) {
            if (accumulate) v0 += __bfloat162float(o[0]);
            o[0] = __float2bfloat16_rn(v0);
        }
    } else {
        float* o = static_cast<float*>(c) + row_off + n;
        if (n + 1 < N) {
            if (accumulate) {
                const float2 old = *reinterpret_cast<const float2*>(o);
                v0 += old.x;
                v1 += old.y;
            }
            *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
        } else if (n < N) {
            o[0] = accumulate ? o[0] + v0 : v0;
        }
    }
}

}  // namespace gepi
