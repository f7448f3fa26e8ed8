// One lane's share of a row-times-vector product, straight from a GGML row: the dot of a "unit"
// (a fixed set of UE elements of the row) with the same elements of an f32 / bf16 vector.
//
//     Unit<W>::UE                          elements per unit; unit u of a K-element row, u < K / UE
//     Unit<W>::X x = Unit<W>::load_x(v, u) the vector's elements of unit u (v: the vector's start),
//                                          with whatever the type's dot needs of them (run sums)
//     Unit<W>::dot(row, u, x)              sum over unit u of W[row, e] * v[e]
//
// Loading x once and calling dot for several rows reuses it (kernels/moe/gemv.cu: 4 gate / up
// rows per warp, 8 down rows per warp). Every unit's element set depends on u only, never on
// the row, so one X serves every row of a matrix.
//
// Why units and not dq8's 8-element groups for Q4_K / Q6_K / Q8_0: a group costs a header
// decode (Q4_K: two halves and two 6-bit scales) per 8 elements and an I2F per element, and I2F
// issues at 16 per SM per clock (a quarter warp), so the conversions alone cost the decode
// experts ~8 us per layer on an H200. Here a unit's header is decoded once per 16 or 32
// elements, quants become floats exactly by the exponent trick (0x4B000000 | q is 2^23 + q, one
// byte permute and one add), and the scales multiply the unit's sums, not every element:
//     Q4_K  sum (dl q - ml) v = dl sum(q v) - ml sum(v)        Q6_K, Q8_0  sum (d sc q) v = d sc sum(q v)
// The weights are dequant8's values up to the order of f32 roundings (tests/test_dot_unit_host.py
// checks every unit against dequant8 on the host).
//
// Units:
//   Q4_K (UE 32, 8 per block): unit p of block b: qs bytes [16p, 16p + 16): their low nibbles
//        are elements 256b + 64(p/2) + 16(p%2) + [0, 16) (sub-block 2(p/2)), their high nibbles
//        the same + 32 (sub-block 2(p/2) + 1). Two 16-byte loads: the block header (d, dmin,
//        scales) and the qs bytes; rows 16-byte aligned.
//   Q6_K (UE 16, 16 per block): unit p of block b, h = p / 8, l0 = 4 (p % 8): elements
//        256b + 128h + l0 + i + 32m (i, m < 4), which share one qh word, two ql words and four
//        scales (llama.cpp's layout); 2-byte loads (210-byte blocks are only 2-byte aligned).
//   Q8_0 (UE 16, 2 per block): half a block, 2-byte loads.
//   the other types (UE 8): dq8's group of 8 consecutive elements (quant/dq8.cuh).
// Vectors: f32 or bf16, 16-byte aligned at the row start.
// Host-compilable like dq8.cuh (tests/test_dot_unit_host.py, f32 vectors only).
#pragma once
#include "quant/dq8.cuh"

namespace du {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// byte i of w minus BIAS as a float, exactly (quant/dq8.cuh byte_f: the byte under 2^23's exponent)
template<int BIAS> GGF_HD float byte_f(u32 w, int i) { return dq::byte_f(w, i, (float)BIAS); }
// v < 2^23 as a float, exactly, without the I2F pipe
GGF_HD float small_f(u32 v) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(0x4B000000u | v) - 8388608.0f;
#else
    return (float)v;
#endif
}

// weights and vectors are read-only for the kernel's lifetime: the non-coherent (read-only) path
template<typename T> GGF_HD T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
    return __ldg(p);
#else
    return *p;
#endif
}
GGF_HD u32 ld_u16(const u8* p) { return ldg(reinterpret_cast<const u16*>(p)); }
// 4 bytes at a 2-byte aligned address
GGF_HD u32 ld_u32_2(const u8* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }

// n consecutive vector elements (n a multiple of 4; p 16-byte aligned for f32, 8-byte for bf16)
GGF_HD void ld4(const float* p, float* v) {
    const float4 a = ldg(reinterpret_cast<const float4*>(p));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ void ld4(const __nv_bfloat16* p, float* v) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xFFFF0000u);
    v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xFFFF0000u);
}
#endif
template<int N, typename A> GGF_HD void ldn(const A* p, float* v) {
#pragma unroll
    for (int i = 0; i < N; i += 4) ld4(p + i, v + i);
}

// sum of w's 4 bytes (as BIAS-less quants) times v[0..3], added to acc
template<int BIAS> GGF_HD float dot4(u32 w, const float* v, float acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc = fmaf(byte_f<BIAS>(w, i), v[i], acc);
    return acc;
}

// ---- every type: dq8's groups of 8 ----------------------------------------------------------
template<int W> struct Unit {
    static constexpr int UE = 8;
    struct X { float v[8]; };
    template<typename A> GGF_HD static X load_x(const A* x, int u) {
        X r;
        ldn<8>(x + 8 * u, r.v);
        return r;
    }
    GGF_HD static float dot(const u8* __restrict__ row, int u, const X& x) {
        float w[8];
        dq8<W>(row, 8 * u, w);
        float a = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) a = fmaf(w[i], x.v[i], a);
        return a;
    }
};

// ---- Q4_K: d dmin scales[12] qs[128]; y = (d sc) q - dmin m per 32-element sub-block -----------
// d sc and dmin m of sub-blocks 2q and 2q + 1 of a block whose first 16 bytes (d, dmin,
// scales[12]) are hd: the 6-bit scales and mins (ggml_quants.cuh k4_scale_min) decoded as byte
// pairs, bytes 2(q%2), 2(q%2) + 1 of scales[0..4), [4..8), [8..12); exact products
GGF_HD void q4k_pair_scales(const uint4& hd, int q, float& dl0, float& dl1, float& ml0, float& ml1) {
    const int sh = 16 * (q & 1);
    const u32 y = (hd.y >> sh) & 0xFFFFu, z = (hd.z >> sh) & 0xFFFFu, w = (hd.w >> sh) & 0xFFFFu;
    const u32 sc = q < 2 ? (y & 0x3F3Fu) : ((w & 0x0F0Fu) | ((y >> 2) & 0x3030u));
    const u32 mn = q < 2 ? (z & 0x3F3Fu) : (((w >> 4) & 0x0F0Fu) | ((z >> 2) & 0x3030u));
    const float d = dq::h2f((unsigned short)(hd.x & 0xFFFFu)), dmin = dq::h2f((unsigned short)(hd.x >> 16));
    dl0 = d * small_f(sc & 0xFFu);
    dl1 = d * small_f(sc >> 8);
    ml0 = dmin * small_f(mn & 0xFFu);
    ml1 = dmin * small_f(mn >> 8);
}

template<> struct Unit<GGML_Q4_K> {
    static constexpr int UE = 32;
    struct X { float lo[16], hi[16]; float slo, shi; };
    template<typename A> GGF_HD static X load_x(const A* x, int u) {
        const int p = u & 7;
        const A* xp = x + 256 * (u >> 3) + 64 * (p >> 1) + 16 * (p & 1);
        X r;
        ldn<16>(xp, r.lo);
        ldn<16>(xp + 32, r.hi);
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) { a += r.lo[i]; b += r.hi[i]; }
        r.slo = a;
        r.shi = b;
        return r;
    }
    GGF_HD static float dot(const u8* __restrict__ row, int u, const X& x) {
        const u8* blk = row + 144LL * (u >> 3);
        const int p = u & 7, q = p >> 1;
        const uint4 hd = ldg(reinterpret_cast<const uint4*>(blk));             // d dmin | scales[0..12)
        const uint4 qs = ldg(reinterpret_cast<const uint4*>(blk + 16 + 16 * p));
        const u32 qw[4] = {qs.x, qs.y, qs.z, qs.w};
        float alo = 0.0f, ahi = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            alo = dot4<0>(qw[i] & 0x0F0F0F0Fu, x.lo + 4 * i, alo);
            ahi = dot4<0>((qw[i] >> 4) & 0x0F0F0F0Fu, x.hi + 4 * i, ahi);
        }
        float dl0, dl1, ml0, ml1;
        q4k_pair_scales(hd, q, dl0, dl1, ml0, ml1);
        return fmaf(dl0, alo, fmaf(dl1, ahi, -fmaf(ml0, x.slo, ml1 * x.shi)));
    }
};

// ---- Q6_K: ql[128] qh[64] scales[16] (int8) d; y = (d sc) (q - 32) per 16 elements --------------
template<> struct Unit<GGML_Q6_K> {
    static constexpr int UE = 16;
    struct X { float v[16]; };        // v[4m + i]: element 128h + l0 + i + 32m of the block
    template<typename A> GGF_HD static X load_x(const A* x, int u) {
        const A* xp = x + 256 * (u >> 4) + 128 * ((u >> 3) & 1) + 4 * (u & 7);
        X r;
#pragma unroll
        for (int m = 0; m < 4; ++m) ldn<4>(xp + 32 * m, r.v + 4 * m);
        return r;
    }
    GGF_HD static float dot(const u8* __restrict__ row, int u, const X& x) {
        const u8* blk = row + 210LL * (u >> 4);
        const int h = (u >> 3) & 1, l0 = 4 * (u & 7);
        const u32 A = ld_u32_2(blk + 64 * h + l0);          // ql: m = 0 low nibbles, m = 2 high
        const u32 B = ld_u32_2(blk + 64 * h + 32 + l0);     // m = 1 low, m = 3 high
        const u32 C = ld_u32_2(blk + 128 + 32 * h + l0);    // qh: bits 2m of each byte
        // scales[c + 2m], c = 8h + l0 / 16: the low or high bytes of four 2-byte words
        const int c = 8 * h + (l0 >> 4);
        const u8* sp = blk + 192 + (c & ~1);
        const int ssh = 8 * (c & 1);
        const float d = dq::h2f((unsigned short)ld_u16(blk + 208));
        const u32 q[4] = {(A & 0x0F0F0F0Fu) | ((C << 4) & 0x30303030u), (B & 0x0F0F0F0Fu) | ((C << 2) & 0x30303030u),
                          ((A >> 4) & 0x0F0F0F0Fu) | (C & 0x30303030u), ((B >> 4) & 0x0F0F0F0Fu) | ((C >> 2) & 0x30303030u)};
        float acc = 0.0f;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const u32 s = ((ld_u16(sp + 2 * m) >> ssh) & 0xFFu) ^ 0x80u;     // int8 + 128
            acc = fmaf(small_f(s) - 128.0f, dot4<32>(q[m], x.v + 4 * m, 0.0f), acc);
        }
        return d * acc;
    }
};

// ---- Q8_0: d (f16) qs[32] (int8); y = d q ---------------------------------------------------
template<> struct Unit<GGML_Q8_0> {
    static constexpr int UE = 16;
    struct X { float v[16]; };
    template<typename A> GGF_HD static X load_x(const A* x, int u) {
        X r;
        ldn<16>(x + 16 * u, r.v);
        return r;
    }
    GGF_HD static float dot(const u8* __restrict__ row, int u, const X& x) {
        const u8* blk = row + 34LL * (u >> 1);
        const u8* qs = blk + 2 + 16 * (u & 1);
        const float d = dq::h2f((unsigned short)ld_u16(blk));
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc = dot4<128>(ld_u32_2(qs + 4 * i) ^ 0x80808080u, x.v + 4 * i, acc);
        return d * acc;
    }
};

}  // namespace du

using du::Unit;
