// GGML block layouts and dequantisation, bit-exact with ggml's dequantize_row_* and
// gguf.quants.dequantize.
//
//     template<int TYPE> struct QBlock { static constexpr int QK, BYTES; };
//     dequant8<TYPE>(block, j, out)   elements [8j, 8j+8) of one block (j < QK/8) as float
//     dequant_at<TYPE>(row, e)        element e of a row whose bytes start at `row`
//
// Bit-exactness: every product and sum is rounded separately, in the order gguf's numpy code
// uses (e.g. Q4_K: (d*sc)*q - dmin*m). On the device __fmul_rn/__fadd_rn stop nvcc/NVRTC from
// contracting a*b-c into one FMA (which rounds once and so differs in the last bit). Half and
// bf16 scales are decoded with integer bit manipulation, which is exact and works on the host.
//
// The header also compiles as plain C++ (tests/test_ggml_quants_host.py builds it with g++ and
// compares with gguf.quants on every type), so it uses no CUDA-only type or intrinsic outside
// the GGF_* macros below.
//
// Float types (F32, F16, BF16) have ggml block size 1; here they get a pseudo block of 8
// elements so dequant8 works uniformly (rows whose length is not a multiple of 8 must use
// dequant_at, which works for any e).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GGF_HD __host__ __device__ __forceinline__
#else
#define GGF_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define GGF_FMUL(a, b) __fmul_rn((a), (b))
#define GGF_FADD(a, b) __fadd_rn((a), (b))
#define GGF_FSUB(a, b) __fsub_rn((a), (b))
#else
#define GGF_FMUL(a, b) ((a) * (b))
#define GGF_FADD(a, b) ((a) + (b))
#define GGF_FSUB(a, b) ((a) - (b))
#endif

// GGML type ids (ggml.h enum ggml_type)
enum GgmlType {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7,
    GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13,
    GGML_Q6_K = 14, GGML_BF16 = 30,
};

namespace ggf {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;


template<int TYPE> struct QBlock;
template<> struct QBlock<GGML_F32>  { static constexpr int QK = 8;   static constexpr int BYTES = 32; };
template<> struct QBlock<GGML_F16>  { static constexpr int QK = 8;   static constexpr int BYTES = 16; };
template<> struct QBlock<GGML_BF16> { static constexpr int QK = 8;   static constexpr int BYTES = 16; };
template<> struct QBlock<GGML_Q4_0> { static constexpr int QK = 32;  static constexpr int BYTES = 18; };
template<> struct QBlock<GGML_Q4_1> { static constexpr int QK = 32;  static constexpr int BYTES = 20; };
template<> struct QBlock<GGML_Q5_0> { static constexpr int QK = 32;  static constexpr int BYTES = 22; };
template<> struct QBlock<GGML_Q5_1> { static constexpr int QK = 32;  static constexpr int BYTES = 24; };
template<> struct QBlock<GGML_Q8_0> { static constexpr int QK = 32;  static constexpr int BYTES = 34; };
template<> struct QBlock<GGML_Q2_K> { static constexpr int QK = 256; static constexpr int BYTES = 84; };
template<> struct QBlock<GGML_Q3_K> { static constexpr int QK = 256; static constexpr int BYTES = 110; };
template<> struct QBlock<GGML_Q4_K> { static constexpr int QK = 256; static constexpr int BYTES = 144; };
template<> struct QBlock<GGML_Q5_K> { static constexpr int QK = 256; static constexpr int BYTES = 176; };
template<> struct QBlock<GGML_Q6_K> { static constexpr int QK = 256; static constexpr int BYTES = 210; };

// ---- scalar decoding ------------------------------------------------------------------------

GGF_HD float bits_to_float(u32 b) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(b);
#else
    union { u32 u; float f; } c;
    c.u = b;
    return c.f;
#endif
}

GGF_HD u32 float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    union { u32 u; float f; } c;
    c.f = f;
    return c.u;
#endif
}

// IEEE half -> float, exact (also for subnormals, infinities and NaN payloads).
GGF_HD float half_bits_to_float(u16 h) {
    const u32 sign = (u32)(h & 0x8000u) << 16;
    const u32 ex = (h >> 10) & 0x1fu;
    const u32 man = h & 0x3ffu;
    if (ex == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (ex != 0) return bits_to_float(sign | ((ex + 112u) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, a normal float (exact: man < 2^10, power-of-two scale)
    const float v = GGF_FMUL((float)man, 5.9604644775390625e-8f);
    return bits_to_float(sign | float_to_bits(v));
}

GGF_HD float bf16_bits_to_float(u16 h) { return bits_to_float((u32)h << 16); }

GGF_HD u16 load_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
GGF_HD u32 load_u32(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24); }
GGF_HD float load_half(const u8* p) { return half_bits_to_float(load_u16(p)); }

// 6-bit scale j (0..7) and min of a Q4_K / Q5_K block's 12 packed scale bytes.
GGF_HD void k4_scale_min(const u8* s, int j, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// signed 6-bit scale j (0..15) of a Q3_K block, minus 32.
GGF_HD int q3k_scale(const u8* s, int j) {
    const int lo = (s[j & 7] >> (4 * (j >> 3))) & 0x0F;
    const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 0x03;
    return (lo | (hi << 4)) - 32;
}

// ---- 8 consecutive elements [8j, 8j+8) of one block ------------------------------------------
// In every type those 8 elements share one scale and read 8 consecutive quant bytes.

template<int TYPE> GGF_HD void dequant8(const u8* b, int j, float out[8]);

template<> GGF_HD void dequant8<GGML_F32>(const u8* b, int j, float out[8]) {
    for (int i = 0; i < 8; ++i) out[i] = bits_to_float(load_u32(b + 4 * (8 * j + i)));
}
template<> GGF_HD void dequant8<GGML_F16>(const u8* b, int j, float out[8]) {
    for (int i = 0; i < 8; ++i) out[i] = load_half(b + 2 * (8 * j + i));
}
template<> GGF_HD void dequant8<GGML_BF16>(const u8* b, int j, float out[8]) {
    for (int i = 0; i < 8; ++i) out[i] = bf16_bits_to_float(load_u16(b + 2 * (8 * j + i)));
}

// Q4_0: y = d * (q - 8); element i < 16 is the low nibble of qs[i], i >= 16 the high of qs[i-16]
template<> GGF_HD void dequant8<GGML_Q4_0>(const u8* b, int j, float out[8]) {
    const float d = load_half(b);
    const u8* qs = b + 2 + 8 * (j & 1);
    const int sh = 4 * (j >> 1);
    for (int i = 0; i < 8; ++i) out[i] = GGF_FMUL(d, (float)(((qs[i] >> sh) & 0x0F) - 8));
}
// Q4_1: y = d * q + m
template<> GGF_HD void dequant8<GGML_Q4_1>(const u8* b, int j, float out[8]) {
    const float d = load_half(b), m = load_half(b + 2);
    const u8* qs = b + 4 + 8 * (j & 1);
    const int sh = 4 * (j >> 1);
    for (int i = 0; i < 8; ++i) out[i] = GGF_FADD(GGF_FMUL(d, (float)((qs[i] >> sh) & 0x0F)), m);
}
// Q5_0: 5th bit of element e is bit e of the little-endian u32 qh; y = d * (q - 16)
template<> GGF_HD void dequant8<GGML_Q5_0>(const u8* b, int j, float out[8]) {
    const float d = load_half(b);
    const u32 qh = load_u32(b + 2) >> (8 * j);
    const u8* qs = b + 6 + 8 * (j & 1);
    const int sh = 4 * (j >> 1);
    for (int i = 0; i < 8; ++i) {
        const int q = ((qs[i] >> sh) & 0x0F) | (((qh >> i) & 1) << 4);
        out[i] = GGF_FMUL(d, (float)(q - 16));
    }
}
// Q5_1: y = d * q + m
template<> GGF_HD void dequant8<GGML_Q5_1>(const u8* b, int j, float out[8]) {
    const float d = load_half(b), m = load_half(b + 2);
    const u32 qh = load_u32(b + 4) >> (8 * j);
    const u8* qs = b + 8 + 8 * (j & 1);
    const int sh = 4 * (j >> 1);
    for (int i = 0; i < 8; ++i) {
        const int q = ((qs[i] >> sh) & 0x0F) | (((qh >> i) & 1) << 4);
        out[i] = GGF_FADD(GGF_FMUL(d, (float)q), m);
    }
}
// Q8_0: y = q * d
template<> GGF_HD void dequant8<GGML_Q8_0>(const u8* b, int j, float out[8]) {
    const float d = load_half(b);
    const u8* qs = b + 2 + 8 * j;
    for (int i = 0; i < 8; ++i) out[i] = GGF_FMUL((float)(signed char)qs[i], d);
}

// K-quants: element e = h*128 + s*32 + l (h half, s 2-bit shift group, l < 32) unless noted.

// Q2_K: scales[16] qs[64] d dmin. q = (qs[32h + l] >> 2s) & 3; sub-block e/16 with
// dl = d * (sc & 15), ml = dmin * (sc >> 4); y = dl * q - ml.
template<> GGF_HD void dequant8<GGML_Q2_K>(const u8* b, int j, float out[8]) {
    const int e0 = 8 * j;
    const float d = load_half(b + 80), dmin = load_half(b + 82);
    const int sc = b[e0 >> 4];
    const float dl = GGF_FMUL(d, (float)(sc & 0x0F));
    const float ml = GGF_FMUL(dmin, (float)(sc >> 4));
    const u8* qs = b + 16 + 32 * (e0 >> 7) + (e0 & 31);
    const int sh = 2 * ((e0 >> 5) & 3);
    for (int i = 0; i < 8; ++i) out[i] = GGF_FSUB(GGF_FMUL(dl, (float)((qs[i] >> sh) & 3)), ml);
}
// Q3_K: hmask[32] qs[64] scales[12] d. q = ((qs[32h + l] >> 2s) & 3) - (bit (e/32) of hmask[l] ? 0 : 4);
// y = (d * scale(e/16)) * q.
template<> GGF_HD void dequant8<GGML_Q3_K>(const u8* b, int j, float out[8]) {
    const int e0 = 8 * j;
    const float d = load_half(b + 108);
    const float dl = GGF_FMUL(d, (float)q3k_scale(b + 96, e0 >> 4));
    const u8* hm = b + (e0 & 31);
    const int hb = e0 >> 5;
    const u8* qs = b + 32 + 32 * (e0 >> 7) + (e0 & 31);
    const int sh = 2 * ((e0 >> 5) & 3);
    for (int i = 0; i < 8; ++i) {
        const int q = ((qs[i] >> sh) & 3) - (((hm[i] >> hb) & 1) ? 0 : 4);
        out[i] = GGF_FMUL(dl, (float)q);
    }
}
// Q4_K: d dmin scales[12] qs[128]. Sub-block s = e/32 (8 of them): q = (qs[32*(s/2) + l] >> 4*(s%2)) & 15;
// y = (d * sc) * q - dmin * m.
template<> GGF_HD void dequant8<GGML_Q4_K>(const u8* b, int j, float out[8]) {
    const int e0 = 8 * j, s = e0 >> 5;
    const float d = load_half(b), dmin = load_half(b + 2);
    int sc, m;
    k4_scale_min(b + 4, s, sc, m);
    const float dl = GGF_FMUL(d, (float)sc);
    const float ml = GGF_FMUL(dmin, (float)m);
    const u8* qs = b + 16 + 32 * (s >> 1) + (e0 & 31);
    const int sh = 4 * (s & 1);
    for (int i = 0; i < 8; ++i) out[i] = GGF_FSUB(GGF_FMUL(dl, (float)((qs[i] >> sh) & 0x0F)), ml);
}
// Q5_K: d dmin scales[12] qh[32] qs[128]. As Q4_K plus 5th bit = bit s of qh[l].
template<> GGF_HD void dequant8<GGML_Q5_K>(const u8* b, int j, float out[8]) {
    const int e0 = 8 * j, s = e0 >> 5;
    const float d = load_half(b), dmin = load_half(b + 2);
    int sc, m;
    k4_scale_min(b + 4, s, sc, m);
    const float dl = GGF_FMUL(d, (float)sc);
    const float ml = GGF_FMUL(dmin, (float)m);
    const u8* qh = b + 16 + (e0 & 31);
    const u8* qs = b + 48 + 32 * (s >> 1) + (e0 & 31);
    const int sh = 4 * (s & 1);
    for (int i = 0; i < 8; ++i) {
        const int q = ((qs[i] >> sh) & 0x0F) | (((qh[i] >> s) & 1) << 4);
        out[i] = GGF_FSUB(GGF_FMUL(dl, (float)q), ml);
    }
}
// Q6_K: ql[128] qh[64] scales[16] (int8) d. e = 128h + r:
// q = ((ql[64h + r%64] >> 4*(r/64)) & 15 | ((qh[32h + r%32] >> 2*(r/32)) & 3) << 4) - 32;
// y = (d * scales[e/16]) * q.
template<> GGF_HD void dequant8<GGML_Q6_K>(const u8* b, int j, float out[8]) {
    const int e0 = 8 * j, h = e0 >> 7, r = e0 & 127;
    const float d = load_half(b + 208);
    const float dl = GGF_FMUL(d, (float)(signed char)b[192 + (e0 >> 4)]);
    const u8* ql = b + 64 * h + (r & 63);
    const int shl = 4 * (r >> 6);
    const u8* qh = b + 128 + 32 * h + (r & 31);
    const int shh = 2 * (r >> 5);
    for (int i = 0; i < 8; ++i) {
        const int q = (((ql[i] >> shl) & 0x0F) | (((qh[i] >> shh) & 3) << 4)) - 32;
        out[i] = GGF_FMUL(dl, (float)q);
    }
}

// ---- one element -----------------------------------------------------------------------------

template<int TYPE> GGF_HD float dequant_at(const u8* row, int e) {
    float v[8];
    const u8* blk = row + (long long)(e / QBlock<TYPE>::QK) * QBlock<TYPE>::BYTES;
    const int r = e % QBlock<TYPE>::QK;
    dequant8<TYPE>(blk, r >> 3, v);
    float x = v[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) x = ((r & 7) == i) ? v[i] : x;
    return x;
}
// Float types: read the element directly (any row length).
template<> GGF_HD float dequant_at<GGML_F32>(const u8* row, int e) { return bits_to_float(load_u32(row + 4 * (long long)e)); }
template<> GGF_HD float dequant_at<GGML_F16>(const u8* row, int e) { return load_half(row + 2 * (long long)e); }
template<> GGF_HD float dequant_at<GGML_BF16>(const u8* row, int e) { return bf16_bits_to_float(load_u16(row + 2 * (long long)e)); }

}  // namespace ggf

using ggf::QBlock;
using ggf::dequant8;
using ggf::dequant_at;
