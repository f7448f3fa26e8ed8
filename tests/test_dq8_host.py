"""kernels/quant/dq8.cuh (the word-load dequantisation the GEMV and few-rows kernels use) gives
dequant8's values bit for bit, for every type it specialises and every 8-element group of a row:
built for the host with the system C++ compiler (skipped without one), on random bytes."""
import subprocess

from quant_blocks import build_host_driver

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
#include "quant/dq8.cuh"

template<int W> int check(const char* name, int K, unsigned seed) {
    constexpr int QK = QBlock<W>::QK, BY = QBlock<W>::BYTES;
    const int rows = 7, row_bytes = K / QK * BY;
    alignas(16) static unsigned char buf[1 << 16];
    srand(seed);
    int bad = 0;
    for (int r = 0; r < rows; ++r) {
        // each row at a multiple of its row size from a 16-byte aligned base, as on the device
        unsigned char* row = buf + r * row_bytes;
        for (int i = 0; i < row_bytes; ++i) row[i] = (unsigned char)(rand() & 0xFF);
        for (int e0 = 0; e0 < K; e0 += 8) {
            float a[8], b[8];
            dequant8<W>(row + (e0 / QK) * BY, (e0 % QK) / 8, a);
            dq8<W>(row, e0, b);
            if (memcmp(a, b, sizeof a) != 0) ++bad;
        }
    }
    printf("%s %d\n", name, bad);
    return bad;
}

int main() {
    int bad = 0;
    bad += check<GGML_F32>("f32", 512, 1);
    bad += check<GGML_F16>("f16", 512, 2);
    bad += check<GGML_BF16>("bf16", 512, 3);
    bad += check<GGML_Q8_0>("q8_0", 512, 4);
    bad += check<GGML_Q4_K>("q4_k", 512, 5);
    bad += check<GGML_Q6_K>("q6_k", 512, 6);
    bad += check<GGML_Q5_K>("q5_k", 512, 7);
    return bad != 0;
}
"""


def test_dq8_matches_dequant8_bit_for_bit(tmp_path_factory):
    exe = build_host_driver(tmp_path_factory, "dq8_host", PROGRAM)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    lines = dict(line.split() for line in out.stdout.split("\n") if line.strip())
    assert set(lines) == {"f32", "f16", "bf16", "q8_0", "q4_k", "q6_k", "q5_k"}, out.stdout + out.stderr
    assert all(v == "0" for v in lines.values()), lines
    assert out.returncode == 0
