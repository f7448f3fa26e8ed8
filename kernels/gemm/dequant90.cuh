// Fast dequantisation of GGML weight blocks from shared memory into packed bf16 pairs, for the
// producers of the sm_90a GEMM core (gemm90_core.cuh). Same values as ggml_quants.cuh's dequant8
// (bit-exact in f32 before the bf16 rounding: every product and sum is rounded in the order
// gguf's numpy code uses), but word-wise:
//   - raw bytes are read with 16-byte ld.shared (rows misaligned by an even number of bytes, as
//     Q6_K and Q8_0 blocks are, are realigned in registers: two selects and one prmt per word);
//   - a quant byte b becomes the float 2^23 + b with one prmt (b in the low mantissa bits,
//     exponent byte 0x4B): no int->float conversion instruction;
//   - the sub-block scales are decoded once per call (per sub-block), not per element.
// Each function produces 32 elements = 4 chunks of 8 (o[4c .. 4c+3] = chunk c, bf16 pairs, low
// element in the low half), for one W row and one 64-element K step; which chunks of the step
// they are is given per type (the caller stores them into the swizzled tile).
#pragma once

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#include "quant/ggml_quants.cuh"
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DQ90_HD __device__ __forceinline__
#else
#define DQ90_HD inline
#endif

namespace dq90 {

typedef unsigned int u32;

// ---- primitives: device instructions, or a host emulation over dq90::host_smem (the header
// compiles as plain C++ for tests/test_dequant90_host.py, which checks it against gguf) ----
#if defined(__CUDA_ARCH__)
DQ90_HD void lds128(u32 a, u32& x, u32& y, u32& z, u32& w) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(x), "=r"(y), "=r"(z), "=r"(w) : "r"(a));
}
DQ90_HD unsigned short lds16(u32 a) {
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(a));
    return v;
}
DQ90_HD int lds_s8(u32 a) {
    int v;
    asm volatile("ld.shared.s8 %0, [%1];\n" : "=r"(v) : "r"(a));
    return v;
}
DQ90_HD float half_to_float(unsigned short h) {
    float f;
    asm("{\n .reg .b16 t;\n mov.b16 t, %1;\n cvt.f32.f16 %0, t;\n}\n" : "=f"(f) : "h"(h));
    return f;
}
DQ90_HD u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
DQ90_HD u32 perm(u32 x, u32 y, u32 s) { return __byte_perm(x, y, s); }
DQ90_HD float as_float(u32 x) { return __uint_as_float(x); }
DQ90_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
DQ90_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
DQ90_HD float ffma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
#else
inline const unsigned char* host_smem = nullptr;   // "shared address" a = byte offset into it
inline void lds128(u32 a, u32& x, u32& y, u32& z, u32& w) {
    u32 v[4];
    std::memcpy(v, host_smem + a, 16);
    x = v[0]; y = v[1]; z = v[2]; w = v[3];
}
inline unsigned short lds16(u32 a) { unsigned short v; std::memcpy(&v, host_smem + a, 2); return v; }
inline int lds_s8(u32 a) { return (signed char)host_smem[a]; }
inline float half_to_float(unsigned short h) { return ggf::half_bits_to_float(h); }
inline u32 bf16_bits(float f) { u32 u; std::memcpy(&u, &f, 4); return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; }
inline u32 pack_bf16(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }
inline u32 perm(u32 x, u32 y, u32 s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= (u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}
inline float as_float(u32 x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float fmul(float a, float b) { return a * b; }
inline float fsub(float a, float b) { return a - b; }
inline float ffma(float a, float b, float c) { return std::fmaf(a, b, c); }
#endif

// 2^23 + (byte B of x): the byte lands in the low mantissa bits under exponent 0x4B
template<int B> DQ90_HD float magic_byte(u32 x) { return as_float(perm(x, 0x4B000000u, 0x7540 | B)); }

// 8 consecutive 32-bit words from shared byte address a (a even; A16: a % 16 == 0). The
// unaligned case loads the three 16-byte lines around them; it reads at most 16 bytes past
// a + 32 (the callers' raw slots leave room for that).
template<bool A16> DQ90_HD void window8(u32 a, u32 (&o)[8]) {
    if constexpr (A16) {
        lds128(a, o[0], o[1], o[2], o[3]);
        lds128(a + 16, o[4], o[5], o[6], o[7]);
    } else {
        const u32 k = a & 15u, a0 = a - k;
        u32 w[12];
        lds128(a0, w[0], w[1], w[2], w[3]);
        lds128(a0 + 16, w[4], w[5], w[6], w[7]);
        lds128(a0 + 32, w[8], w[9], w[10], w[11]);
        if (k & 8) {
#pragma unroll
            for (int i = 0; i < 10; ++i) w[i] = w[i + 2];
        }
        if (k & 4) {
#pragma unroll
            for (int i = 0; i < 9; ++i) w[i] = w[i + 1];
        }
        const u32 sel = (k & 2) ? 0x5432u : 0x3210u;   // bytes 2..5 of (w[i+1]:w[i]) or w[i]
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = perm(w[i], w[i + 1], sel);
    }
}

// Q4_K block at shared address b (16-byte aligned: 144-byte blocks in 16-byte aligned rows),
// K step `sub` (elements [64 sub, 64 sub + 64) of the block = sub-blocks 2 sub and 2 sub + 1),
// half `hh`: qs bytes [32 sub + 16 hh, +16). Low nibbles -> step chunks 2hh, 2hh+1 (o[0..7]),
// high nibbles -> chunks 4+2hh, 5+2hh (o[8..15]). y = (d*sc)*q - dmin*m.
DQ90_HD void q4_k(u32 b, int sub, int hh, u32 (&o)[16]) {
    u32 hd, s0, s1, s2;
    lds128(b, hd, s0, s1, s2);
    u32 scw, mw;
    if (sub < 2) {
        scw = s0 & 0x3F3F3F3Fu;
        mw = s1 & 0x3F3F3F3Fu;
    } else {
        scw = (s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u);
        mw = ((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u);
    }
    const int sh = (sub & 1) * 16;
    scw >>= sh;
    mw >>= sh;
    const float d = half_to_float((unsigned short)(hd & 0xFFFFu)), dmin = half_to_float((unsigned short)(hd >> 16));
    const float dl0 = fmul(d, fsub(magic_byte<0>(scw), 8388608.f));
    const float dl1 = fmul(d, fsub(magic_byte<1>(scw), 8388608.f));
    const float ml0 = fmul(dmin, fsub(magic_byte<0>(mw), 8388608.f));
    const float ml1 = fmul(dmin, fsub(magic_byte<1>(mw), 8388608.f));
    // (2^23 + q) * dl - 2^23 * dl = q * dl exactly before the one rounding (2^23 dl is exact)
    const float c0 = fmul(dl0, -8388608.f), c1 = fmul(dl1, -8388608.f);
    u32 q[4];
    lds128(b + 16 + 32 * sub + 16 * hh, q[0], q[1], q[2], q[3]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 lo = q[i] & 0x0F0F0F0Fu, hi = (q[i] >> 4) & 0x0F0F0F0Fu;
        o[2 * i] = pack_bf16(fsub(ffma(magic_byte<0>(lo), dl0, c0), ml0),
                             fsub(ffma(magic_byte<1>(lo), dl0, c0), ml0));
        o[2 * i + 1] = pack_bf16(fsub(ffma(magic_byte<2>(lo), dl0, c0), ml0),
                                 fsub(ffma(magic_byte<3>(lo), dl0, c0), ml0));
        o[8 + 2 * i] = pack_bf16(fsub(ffma(magic_byte<0>(hi), dl1, c1), ml1),
                                 fsub(ffma(magic_byte<1>(hi), dl1, c1), ml1));
        o[8 + 2 * i + 1] = pack_bf16(fsub(ffma(magic_byte<2>(hi), dl1, c1), ml1),
                                     fsub(ffma(magic_byte<3>(hi), dl1, c1), ml1));
    }
}

// Q6_K block at shared address b (even), K step `sub` (half H = sub / 2 of the block, elements
// r in [64 (sub & 1), +64) of it), half `hh`: elements [32 hh, 32 hh + 32) of the step ->
// chunks 4hh .. 4hh+3. q = ql nibble (ql[64H + 32hh + l] >> 4 (sub & 1)) | 2 bits of
// qh[32H + l] >> (4 (sub & 1) + 2 hh), y = (d * scales[...]) * (q - 32).
DQ90_HD void q6_k(u32 b, int sub, int hh, u32 (&o)[16]) {
    const int H = sub >> 1, par = sub & 1;
    u32 ql[8], qh[8];
    window8<false>(b + 64 * H + 32 * hh, ql);
    window8<false>(b + 128 + 32 * H, qh);
    const float d = half_to_float(lds16(b + 208));
    const u32 sa = b + 192 + 8 * H + 4 * par + 2 * hh;
    const float dl0 = fmul(d, (float)lds_s8(sa)), dl1 = fmul(d, (float)lds_s8(sa + 1));
    const int shl = 4 * par, shh = 4 * par + 2 * hh;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 q = ((ql[i] >> shl) & 0x0F0F0F0Fu) | (((qh[i] >> shh) << 4) & 0x30303030u);
        const float dl = i < 4 ? dl0 : dl1;
        o[2 * i] = pack_bf16(fmul(fsub(magic_byte<0>(q), 8388640.f), dl),
                             fmul(fsub(magic_byte<1>(q), 8388640.f), dl));
        o[2 * i + 1] = pack_bf16(fmul(fsub(magic_byte<2>(q), 8388640.f), dl),
                                 fmul(fsub(magic_byte<3>(q), 8388640.f), dl));
    }
}

// Q8_0: the 64-element step is two 34-byte blocks from shared address b (even); half hh = block
// hh -> chunks 4hh .. 4hh+3. y = q * d with q the signed byte (x ^ 0x80 = q + 128).
DQ90_HD void q8_0(u32 b, int hh, u32 (&o)[16]) {
    const u32 blk = b + 34 * hh;
    const float d = half_to_float(lds16(blk));
    u32 qs[8];
    window8<false>(blk + 2, qs);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 x = qs[i] ^ 0x80808080u;
        o[2 * i] = pack_bf16(fmul(fsub(magic_byte<0>(x), 8388736.f), d),
                             fmul(fsub(magic_byte<1>(x), 8388736.f), d));
        o[2 * i + 1] = pack_bf16(fmul(fsub(magic_byte<2>(x), 8388736.f), d),
                                 fmul(fsub(magic_byte<3>(x), 8388736.f), d));
    }
}

}  // namespace dq90
