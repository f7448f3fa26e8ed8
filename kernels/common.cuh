// Small device helpers shared by every kernel: warp/block reductions and bf16 load/store.
// Kept tiny on purpose; anything group-specific lives beside its kernels.
#pragma once
#include <cuda_bf16.h>

#define GGF_FULL_MASK 0xffffffffu

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(GGF_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(GGF_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats of
// shared memory. Contains __syncthreads: call it from every thread of the block. Safe to call
// twice in a row with the same scratch (the trailing barrier protects the reuse).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : __int_as_float(0xff800000);
    v = warp_max(v);
    __syncthreads();
    return v;
}

// ---- bf16 / f32 storage ------------------------------------------------------------------------
// load_f / store_f let a kernel template over its storage type (float or __nv_bfloat16).

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 8 consecutive values; p must be 16-byte aligned for both types (32 bytes of f32 = two 16-byte
// accesses, 8 bf16 = one).
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
    return *reinterpret_cast<const unsigned*>(&h);
}

// D += A B on the tensor cores, one m16n8k16 bf16 MMA with f32 accumulators (sm_80 and up):
// a [4] and b [2] the registers of the A (row) and B (col) fragments, c [4] of C.
__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- activations ---------------------------------------------------------------------------------

// GELU, tanh approximation (ggml_gelu; kernels/dense/ref.py gelu): 0.5 x (1 + tanh u) written as
// x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). Same function; under --use_fast_math tanhf is
// tanh.approx (2^-11 absolute), and 1 + tanh u cancels where tanh u nears -1 (x < -2): the
// sigmoid form keeps the relative error of __expf there.
__device__ __forceinline__ float gelu_tanh(float x) {
    return x / (1.0f + __expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}
// A GLU's gate chosen at run time: act 0 SiLU, 1 GELU-tanh (Gemma 4)
__device__ __forceinline__ float glu_gate_by(float g, int act) {
    return act == 1 ? gelu_tanh(g) : g / (1.0f + __expf(-g));
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float v[8]) {
    uint4 u;
    u.x = pack_bf16x2(v[0], v[1]);
    u.y = pack_bf16x2(v[2], v[3]);
    u.z = pack_bf16x2(v[4], v[5]);
    u.w = pack_bf16x2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
}

// Expert e of a stacked MoE weight: from an expert table when one is given (entry = e, or
// E + e for the up half of a gate_up table; kernels/moe/table.py), else base + e * stride.
__device__ __forceinline__ const unsigned char* expert_weights(const unsigned long long* wtab, int entry,
                                                               const unsigned char* base, int e,
                                                               long long stride) {
    return wtab ? reinterpret_cast<const unsigned char*>(wtab[entry]) : base + (long long)e * stride;
}

// The outputs of one thread's 4x4 register tile in a 64x64 block tile of 256 threads (the f32
// CUDA-core GEMMs: dense/gemm_f32.cu, dense/gemm_qf32.cu, moe/grouped_f32.cu): thread t holds
// tile rows ty*4 + i and columns tx*4 + j (tx = t % 16, ty = t / 16). Calls f(i, j, r, n) for
// tile row r = ty*4 + i and output column n = n0 + tx*4 + j below n_end; rows are f's to check.
template<class F>
__device__ __forceinline__ void for_tile4x4(int n0, int n_end, F&& f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n < n_end) f(i, j, ty * 4 + i, n);
        }
    }
}
