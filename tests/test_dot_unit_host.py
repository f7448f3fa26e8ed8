"""kernels/quant/dot_unit.cuh (the decode experts' per-lane dot products, kernels/moe/gemv.cu)
against dequant8: the units of a row cover each element exactly once (a one-hot vector gives
dequant8's value of that element, up to one f32 rounding) and a row's units summed give
dequant8's row times a random vector, up to f32 rounding. Built for the host with the system
C++ compiler (skipped without one), on random bytes with sane scales."""
import subprocess

from quant_blocks import build_host_driver

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
#include "quant/dot_unit.cuh"

// random bytes, with every f16 scale of the block set to a small normal value
template<int W> void fill(unsigned char* blk, int nblocks) {
    constexpr int BY = QBlock<W>::BYTES;
    for (int i = 0; i < nblocks * BY; ++i) blk[i] = (unsigned char)(rand() & 0xFF);
    if (W == GGML_BF16) {       // finite values: sign, exponent 2^-7 .. 2^-4, random mantissa
        for (int i = 0; i < nblocks * BY; i += 2) blk[i + 1] = (blk[i + 1] & 0x81) | 0x3C;
        return;
    }
    for (int b = 0; b < nblocks; ++b) {
        unsigned char* p = blk + b * BY;
        const unsigned short h = (unsigned short)(0x1400 + (rand() & 0x3FF));   // ~1e-3 .. 2e-3
        auto put = [&](int off) { p[off] = h & 0xFF; p[off + 1] = h >> 8; };
        if (W == GGML_Q4_K || W == GGML_Q5_K) { put(0); put(2); }
        else if (W == GGML_Q6_K) put(208);
        else if (W == GGML_Q8_0 || W == GGML_Q4_0 || W == GGML_Q5_0) put(0);
    }
}

template<int W> int check(const char* name, int K, unsigned seed) {
    using U = Unit<W>;
    constexpr int QK = QBlock<W>::QK, BY = QBlock<W>::BYTES;
    const int rows = 5, row_bytes = K / QK * BY, nu = K / U::UE;
    alignas(16) static unsigned char buf[1 << 16];
    alignas(16) static float x[4096];
    srand(seed);
    fill<W>(buf, rows * K / QK);
    int bad = 0;
    double worst_hot = 0, worst_dot = 0;
    for (int r = 0; r < rows; ++r) {
        const unsigned char* row = buf + r * row_bytes;   // rows back to back from a 16-byte aligned base
        float w[4096];
        for (int e0 = 0; e0 < K; e0 += 8) dequant8<W>(row + (e0 / QK) * BY, (e0 % QK) / 8, w + e0);
        float wmax = 0;
        for (int e = 0; e < K; ++e) wmax = std::fmax(wmax, std::fabs(w[e]));
        // one-hot: each element covered exactly once, with dequant8's value
        for (int e = 0; e < K; ++e) {
            memset(x, 0, sizeof(float) * K);
            x[e] = 1.0f;
            double s = 0;
            for (int u = 0; u < nu; ++u) s += U::dot(row, u, U::load_x(x, u));
            const double err = std::fabs(s - w[e]) / wmax;
            worst_hot = std::fmax(worst_hot, err);
            if (err > 1e-6) ++bad;
        }
        // a random vector: the row's dot product
        double ref = 0, mag = 0, got = 0;
        for (int e = 0; e < K; ++e) {
            x[e] = (float)((rand() % 2001) - 1000) / 500.0f;
            ref += (double)w[e] * x[e];
            mag += std::fabs((double)w[e] * x[e]);
        }
        for (int u = 0; u < nu; ++u) got += U::dot(row, u, U::load_x(x, u));
        const double err = std::fabs(got - ref) / mag;
        worst_dot = std::fmax(worst_dot, err);
        if (err > 1e-6) ++bad;
    }
    printf("%s %d %.3g %.3g\n", name, bad, worst_hot, worst_dot);
    return bad;
}

int main() {
    int bad = 0;
    bad += check<GGML_Q4_K>("q4_k", 512, 1);
    bad += check<GGML_Q4_K>("q4_k_2048", 2048, 2);
    bad += check<GGML_Q6_K>("q6_k", 512, 3);
    bad += check<GGML_Q6_K>("q6_k_768", 768, 4);
    bad += check<GGML_Q8_0>("q8_0", 704, 5);
    bad += check<GGML_Q5_K>("q5_k", 512, 6);
    bad += check<GGML_Q4_0>("q4_0", 256, 7);
    bad += check<GGML_BF16>("bf16", 256, 8);
    return bad != 0;
}
"""

NAMES = {"q4_k", "q4_k_2048", "q6_k", "q6_k_768", "q8_0", "q5_k", "q4_0", "bf16"}


def test_dot_units_match_dequant8(tmp_path_factory):
    exe = build_host_driver(tmp_path_factory, "dot_unit_host", PROGRAM)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.split("\n") if line.strip()}
    assert set(rows) == NAMES, out.stdout + out.stderr
    assert all(v[0] == "0" for v in rows.values()), rows
    assert out.returncode == 0
