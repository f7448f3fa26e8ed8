"""kernels/dense/gemv1_q6k.cuh (the lane units of the one-row Q6_K GEMV, gemv1_<a>_q6_k) against
gguf's dequantize and a float64 dot: random Q6_K rows (extreme quants and scales included) times
random x, summed over the 4 lanes of every block with the kernel's padded x layout. Rows have
1, 3 and 5 blocks, so blocks start at every even address mod 4; the matrix sits against
PROT_NONE guard pages, first at the start of a page, then ending at the end of one, so a read
outside it kills the program. Built for the host with the system C++ compiler (skipped without
one)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from quant_blocks import build_host_driver


PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
#include "dense/gemv1_q6k.cuh"

// read_all: quant_blocks.HOST_IO
// y[n] = sum over blocks b and lanes t as gemv1_q6k_impl computes it, x staged and padded as
// there (4 floats per 128), the matrix at `base`
static void gemv1(const unsigned char* base, int N, int K, const float* x, float* y) {
    std::vector<float> xsv(K + K / 32 + 4);
    float* xs = xsv.data() + ((4 - ((size_t)xsv.data() / 4) % 4) % 4);   // 16-byte aligned
    for (int i = 0; i < K; ++i) xs[i + 4 * (i >> 7)] = x[i];
    const int nb = K / 256;
    const long long rb = 210LL * nb;
    for (int n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int b = 0; b < nb; ++b)
            for (int t = 0; t < 4; ++t)
                acc += g1::q6k_unit_dot(base + n * rb + 210LL * b, t, xs + 264 * b + 132 * (t >> 1) + 16 * (t & 1));
        y[n] = acc;
    }
}

int main(int argc, char** argv) {
    const int N = atoi(argv[1]), K = atoi(argv[2]);
    const std::vector<unsigned char> w = read_all(argv[3]);
    const std::vector<unsigned char> xb = read_all(argv[4]);
    const float* x = reinterpret_cast<const float*>(xb.data());
    const long page = sysconf(_SC_PAGESIZE), bytes = (long)w.size();
    const long span = (bytes + page - 1) / page * page;
    unsigned char* m = (unsigned char*)mmap(nullptr, span + 2 * page, PROT_READ | PROT_WRITE,
                                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(m, page, PROT_NONE);
    mprotect(m + page + span, page, PROT_NONE);
    std::vector<float> y(N);
    unsigned char* bases[2] = {m + page, m + page + ((span - bytes) & ~3L)};   // page start; 4-aligned, at the end
    for (unsigned char* base : bases) {
        memcpy(base, w.data(), bytes);
        gemv1(base, N, K, x, y.data());
        fwrite(y.data(), 4, N, stdout);
    }
    return 0;
}
"""


def _rows(N, K, rng):
    """Random Q6_K rows: d in 1e-3..2e-3, a few blocks with every quant 0 or 63 and scales -128
    / 127."""
    nb = K // 256
    raw = rng.integers(0, 256, size=(N, nb, 210), dtype=np.uint8)
    raw[..., 208:210] = rng.uniform(1e-3, 2e-3, size=(N, nb)).astype(np.float16).view(np.uint8).reshape(N, nb, 2)
    raw[0, 0, :192] = 0xFF                       # q = 63 everywhere
    raw[0, 0, 192:208] = np.array([0x80, 0x7F] * 8, np.uint8)
    raw[-1, -1, :192] = 0                        # q = 0 everywhere
    raw[-1, -1, 192:208] = 0x80
    return raw.reshape(N, nb * 210)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "gemv1_q6k_host", PROGRAM)


@pytest.mark.parametrize("N,K", [(7, 256), (5, 768), (3, 1280)], ids=["k256", "k768", "k1280"])
def test_gemv1_q6k_units_match_gguf(N, K, driver, tmp_path):
    exe = driver
    rng = np.random.default_rng(K)
    raw = _rows(N, K, rng)
    x = rng.standard_normal(K).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(raw.tobytes())
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    out = subprocess.run([str(exe), str(N), str(K), str(tmp_path / "w.bin"), str(tmp_path / "x.bin")],
                         capture_output=True)
    assert out.returncode == 0, (out.returncode, out.stderr)
    got = np.frombuffer(out.stdout, np.float32).reshape(2, N).astype(np.float64)
    dense = dequantize(raw, QT.Q6_K).astype(np.float64)
    ref = dense @ x.astype(np.float64)
    mag = np.abs(dense) @ np.abs(x.astype(np.float64))
    err = np.abs(got - ref) / mag
    assert err.max() < 2e-6, err
