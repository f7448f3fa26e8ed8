// dq8<W>(row, e0, v): the 8 consecutive elements [e0, e0 + 8) of one GGML row (e0 % 8 == 0), the
// same values as dequant8 (quant/ggml_quants.cuh) with the same arithmetic in the same order,
// read with word loads instead of byte loads: one 16-byte load for bf16 / f16, two for f32; for
// Q8_0 and Q6_K (34- and 210-byte blocks, 2-byte aligned) 2-byte loads; for Q4_K (144-byte
// blocks) a 4-byte header and an 8-byte quant load. The other types use dequant8 itself.
// Alignment: a row of bf16 / f16 / f32 / Q4_K starts 16-byte aligned (the runtime places every
// tensor 256-byte aligned and these rows are multiples of 16 bytes), any row of Q8_0 / Q6_K
// 2-byte aligned.
// Host-compilable too (tests/test_dq8_host.py builds it with a C++ compiler and checks every
// specialisation against dequant8 bit for bit, given uint2 / uint4 / float4 structs).
#pragma once
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif
#include "quant/ggml_quants.cuh"

namespace dq {

typedef unsigned char u8;
typedef unsigned int u32;

// IEEE half bits -> float, exact
GGF_HD float h2f(unsigned short h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return ggf::half_bits_to_float(h);
#endif
}

template<int W> GGF_HD void dq8(const u8* __restrict__ row, int e0, float v[8]) {
    constexpr int QK = QBlock<W>::QK, BY = QBlock<W>::BYTES;
    dequant8<W>(row + (long long)(e0 / QK) * BY, (e0 % QK) >> 3, v);
}

GGF_HD void bf16x2(u32 w, float& a, float& b) {
    a = ggf::bits_to_float(w << 16);
    b = ggf::bits_to_float(w & 0xFFFF0000u);
}
GGF_HD void f16x2(u32 w, float& a, float& b) {     // exact, as half_bits_to_float
    a = h2f((unsigned short)(w & 0xFFFFu));
    b = h2f((unsigned short)(w >> 16));
}

// 8 two-byte elements from one 16-byte load, each pair of them converted by CV
template<void (*CV)(u32, float&, float&)> GGF_HD void dq8_pairs(const u8* __restrict__ row, int e0, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 2LL * e0);
    CV(u.x, v[0], v[1]);
    CV(u.y, v[2], v[3]);
    CV(u.z, v[4], v[5]);
    CV(u.w, v[6], v[7]);
}
template<> GGF_HD void dq8<GGML_BF16>(const u8* __restrict__ row, int e0, float v[8]) { dq8_pairs<bf16x2>(row, e0, v); }
template<> GGF_HD void dq8<GGML_F16>(const u8* __restrict__ row, int e0, float v[8]) { dq8_pairs<f16x2>(row, e0, v); }

template<> GGF_HD void dq8<GGML_F32>(const u8* __restrict__ row, int e0, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(row + 4LL * e0)[0];
    const float4 b = reinterpret_cast<const float4*>(row + 4LL * e0)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// float(byte i of w) - off, exact for byte - off in [-2^23, 2^23) with off a small integer: the
// byte is placed under the exponent of 2^23 (one byte permute on the device) and 2^23 + off is
// subtracted (one add), where a cast would take an int-to-float conversion, which runs at an
// eighth of the FMA rate on sm_80..sm_90. The same value as (float)((int)byte - off), bit for bit.
GGF_HD float byte_f(u32 w, int i, float off) {
#if defined(__CUDA_ARCH__)
    const float f = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + (u32)i));
#else
    const float f = ggf::bits_to_float(0x4B000000u | ((w >> (8 * i)) & 0xFFu));
#endif
    return f - (8388608.0f + off);
}

// 8 bytes at a 2-byte aligned address, as two little-endian words
GGF_HD void load8_u16(const u8* p, u32& lo, u32& hi) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    lo = (u32)h[0] | ((u32)h[1] << 16);
    hi = (u32)h[2] | ((u32)h[3] << 16);
}

// Q8_0: d (f16) qs[32]; y = q * d
template<> GGF_HD void dq8<GGML_Q8_0>(const u8* __restrict__ row, int e0, float v[8]) {
    const u8* b = row + (long long)(e0 >> 5) * 34;
    const float d = h2f(*reinterpret_cast<const unsigned short*>(b));
    u32 lo, hi;
    load8_u16(b + 2 + (e0 & 31), lo, hi);
    lo ^= 0x80808080u;              // signed q -> q + 128, read back as q by byte_f's offset
    hi ^= 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = GGF_FMUL(byte_f(lo, i, 128.0f), d);
        v[4 + i] = GGF_FMUL(byte_f(hi, i, 128.0f), d);
    }
}

// Q4_K: d dmin scales[12] qs[128]; sub-block s = o / 32: y = (d sc) q - dmin m
template<> GGF_HD void dq8<GGML_Q4_K>(const u8* __restrict__ row, int e0, float v[8]) {
    const u8* b = row + (long long)(e0 >> 8) * 144;
    const int o = e0 & 255, s = o >> 5;
    const u32 dm = *reinterpret_cast<const u32*>(b);
    int sc, m;
    ggf::k4_scale_min(b + 4, s, sc, m);
    const float dl = GGF_FMUL(h2f((unsigned short)(dm & 0xFFFFu)), (float)sc);
    const float ml = GGF_FMUL(h2f((unsigned short)(dm >> 16)), (float)m);
    const uint2 qw = *reinterpret_cast<const uint2*>(b + 16 + 32 * (s >> 1) + (o & 31));
    const int sh = 4 * (s & 1);
    const u32 lo = (qw.x >> sh) & 0x0F0F0F0Fu, hi = (qw.y >> sh) & 0x0F0F0F0Fu;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = GGF_FSUB(GGF_FMUL(dl, byte_f(lo, i, 0.0f)), ml);
        v[4 + i] = GGF_FSUB(GGF_FMUL(dl, byte_f(hi, i, 0.0f)), ml);
    }
}

// Q6_K: ql[128] qh[64] scales[16] (int8) d; o = 128 h + r:
// q = ((ql[64h + r%64] >> 4(r/64)) & 15 | ((qh[32h + r%32] >> 2(r/32)) & 3) << 4) - 32; y = (d sc) q
template<> GGF_HD void dq8<GGML_Q6_K>(const u8* __restrict__ row, int e0, float v[8]) {
    const u8* b = row + (long long)(e0 >> 8) * 210;
    const int o = e0 & 255, h = o >> 7, r = o & 127;
    const float d = h2f(*reinterpret_cast<const unsigned short*>(b + 208));
    const float dl = GGF_FMUL(d, (float)(signed char)b[192 + (o >> 4)]);
    u32 l0, l1, h0, h1;
    load8_u16(b + 64 * h + (r & 63), l0, l1);
    load8_u16(b + 128 + 32 * h + (r & 31), h0, h1);
    const int shl = 4 * (r >> 6), shh = 2 * (r >> 5);
    const u32 q0 = ((l0 >> shl) & 0x0F0F0F0Fu) | (((h0 >> shh) & 0x03030303u) << 4);
    const u32 q1 = ((l1 >> shl) & 0x0F0F0F0Fu) | (((h1 >> shh) & 0x03030303u) << 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = GGF_FMUL(dl, byte_f(q0, i, 32.0f));
        v[4 + i] = GGF_FMUL(dl, byte_f(q1, i, 32.0f));
    }
}

}  // namespace dq

using dq::dq8;
