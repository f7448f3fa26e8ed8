// One lane's share of the one-row Q6_K GEMV (gemv1_<a>_q6_k in dense/gemv.cu): 64 elements of a
// 210-byte block, ql[128] qh[64] scales[16] (int8) d (f16 at byte 208), element o = 128 h + r:
//   q = ((ql[64h + r%64] >> 4(r/64)) & 15) | ((qh[32h + r%32] >> 2(r/32)) & 3) << 4,
//   y = d scales[o / 16] (q - 32).
// Lane unit t < 4 of a block: h = t / 2, r0 = 16 (t % 2); elements 128 h + r0 + 32 m + i (m, i
// < 4, 16): 16 bytes of ql at 64 h + r0 (m = 0 low nibbles, m = 2 high), 16 at 64 h + r0 + 32
// (m = 1 low, m = 3 high), 16 of qh at 128 + 32 h + r0 (bits 2m), so every byte of the block is
// read by one lane once. Per 16 elements (one scale): sum (q - 32) x as floats by the exponent
// trick (dq::byte_f's offset takes the 32 off exactly), times the int8 scale; times d once.
//
// Alignment: a block starts 2-byte aligned only (210 bytes), and all the 16-byte runs above sit
// at multiples of 16 in it, so they share the block's address mod 4. Each run is read as 5
// aligned 4-byte words and funnel-shifted (5 loads and 4 shifts, where 2-byte loads take 8 loads
// and 4 merges). The words read up to 2 bytes before the block (the previous block's d) and 2-4
// after a run, never past byte 196 of the block; a row whose first block starts 2 mod 4 follows
// the previous row, so with the matrix 4-byte aligned (kernels/dense/launch.py GEMV1_ALIGN)
// nothing outside it is read. Scales and d: exact 2-byte loads (they end the block).
// Host-compilable like quant/dq8.cuh (tests/test_gemv1_q6k_host.py).
#pragma once
#include "quant/dq8.cuh"

namespace g1 {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// the 16 bytes at p (2-byte aligned) as 4 little-endian words
GGF_HD void load16_a2(const u8* p, u32 v[4]) {
    const unsigned long long a = (unsigned long long)p;
    const u32* w = reinterpret_cast<const u32*>(a & ~3ULL);
    const u32 sh = 8u * (u32)(a & 3ULL);                 // 0 or 16
    u32 t[5];
#pragma unroll
    for (int i = 0; i < 5; ++i) t[i] = w[i];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if defined(__CUDA_ARCH__)
        v[i] = __funnelshift_r(t[i], t[i + 1], sh);
#else
        v[i] = (u32)((((unsigned long long)t[i + 1] << 32) | t[i]) >> sh);
#endif
    }
}

// sum over unit t of block blk of W[e] x[e]; xu: the unit's x, element 128 h + r0 + 32 m + i at
// xu[32 m + i] (16-byte aligned)
GGF_HD float q6k_unit_dot(const u8* __restrict__ blk, int t, const float* __restrict__ xu) {
    const int h = t >> 1, r0 = 16 * (t & 1);
    u32 A[4], B[4], C[4];
    load16_a2(blk + 64 * h + r0, A);
    load16_a2(blk + 64 * h + r0 + 32, B);
    load16_a2(blk + 128 + 32 * h + r0, C);
    // scales[8h + (t & 1) + 2m]: byte t & 1 of the 2-byte words at 192 + 8h + 2m
    const u16* sp = reinterpret_cast<const u16*>(blk + 192 + 8 * h);
    const u32 S[2] = {((u32)sp[0] | ((u32)sp[1] << 16)) ^ 0x80808080u,     // int8 + 128
                      ((u32)sp[2] | ((u32)sp[3] << 16)) ^ 0x80808080u};
    const float d = dq::h2f(*reinterpret_cast<const u16*>(blk + 208));
    float acc = 0.0f;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 l = (m & 1) ? B[k] : A[k];
            const u32 q = ((l >> (4 * (m >> 1))) & 0x0F0F0F0Fu) | (((C[k] >> (2 * m)) & 0x03030303u) << 4);
            const float4 a = *reinterpret_cast<const float4*>(xu + 32 * m + 4 * k);
            s = fmaf(dq::byte_f(q, 0, 32.0f), a.x, s);
            s = fmaf(dq::byte_f(q, 1, 32.0f), a.y, s);
            s = fmaf(dq::byte_f(q, 2, 32.0f), a.z, s);
            s = fmaf(dq::byte_f(q, 3, 32.0f), a.w, s);
        }
        acc = fmaf(dq::byte_f(S[m >> 1], (t & 1) + 2 * (m & 1), 128.0f), s, acc);
    }
    return d * acc;
}

}  // namespace g1
