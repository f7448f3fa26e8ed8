"""kernels/quant/ggml_quants.cuh is bit-exact with gguf.quants.dequantize, checked without a GPU.

The header also compiles as plain C++, so a tiny g++ driver dequantises blocks of every type
(with both dequant8 and dequant_at) and the result must equal gguf's bit for bit. Blocks come
from gguf.quants.quantize where it supports the type, and from random bytes (with finite
half-precision scales, subnormals and zeros included) for every type.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

# type -> (block elements, block bytes, byte offsets of its f16 scale fields)
TYPES = {
    QT.F32: (8, 32, ()), QT.F16: (8, 16, ()), QT.BF16: (8, 16, ()),
    QT.Q4_0: (32, 18, (0,)), QT.Q4_1: (32, 20, (0, 2)), QT.Q5_0: (32, 22, (0,)),
    QT.Q5_1: (32, 24, (0, 2)), QT.Q8_0: (32, 34, (0,)),
    QT.Q2_K: (256, 84, (80, 82)), QT.Q3_K: (256, 110, (108,)), QT.Q4_K: (256, 144, (0, 2)),
    QT.Q5_K: (256, 176, (0, 2)), QT.Q6_K: (256, 210, (208,)),
}
QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "quant/ggml_quants.cuh"

template<int T> void run(const std::vector<unsigned char>& in, long n_blocks, float* a, float* b) {
    constexpr int QK = QBlock<T>::QK, BY = QBlock<T>::BYTES;
    for (long i = 0; i < n_blocks; ++i)
        for (int j = 0; j < QK / 8; ++j) dequant8<T>(in.data() + i * BY, j, a + i * QK + 8 * j);
    // dequant_at over the whole stream viewed as one row
    for (long e = 0; e < n_blocks * QK; ++e) b[e] = dequant_at<T>(in.data(), (int)e);
}

int main(int argc, char** argv) {
    const int type = atoi(argv[1]);
    FILE* f = fopen(argv[2], "rb");
    std::vector<unsigned char> in;
    unsigned char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) in.insert(in.end(), buf, buf + n);
    fclose(f);
    long nb = 0;
    std::vector<float> a, b;
#define CASE(T) case T: nb = (long)in.size() / QBlock<T>::BYTES; a.resize(nb * QBlock<T>::QK); \
    b.resize(a.size()); run<T>(in, nb, a.data(), b.data()); break;
    switch (type) {
        CASE(GGML_F32) CASE(GGML_F16) CASE(GGML_BF16) CASE(GGML_Q4_0) CASE(GGML_Q4_1)
        CASE(GGML_Q5_0) CASE(GGML_Q5_1) CASE(GGML_Q8_0) CASE(GGML_Q2_K) CASE(GGML_Q3_K)
        CASE(GGML_Q4_K) CASE(GGML_Q5_K) CASE(GGML_Q6_K)
        default: return 2;
    }
    FILE* o = fopen(argv[3], "wb");
    fwrite(a.data(), 4, a.size(), o);
    fwrite(b.data(), 4, b.size(), o);
    fclose(o);
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    d = tmp_path_factory.mktemp("ggml_quants_host")
    src = d / "driver.cpp"
    src.write_text(DRIVER)
    exe = d / "driver"
    # -ffp-contract=off: the header's separate roundings must not be fused into FMAs on the host.
    subprocess.run([gxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wno-unknown-pragmas",
                    "-I", KERNELS, str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def random_halves(rng, n):
    """Finite float16 bit patterns: normals of many magnitudes, subnormals, signed zeros."""
    h = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    inf_nan = (h & 0x7C00) == 0x7C00
    h[inf_nan] &= 0xBFFF  # exponent 0x1F -> 0x0F: finite
    special = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x3C00, 0x7BFF], dtype=np.uint16)
    h[: min(n, len(special))] = special[: min(n, len(special))]
    return h


def random_blocks(rng, qtype, n_blocks):
    qk, nbytes, scale_offsets = TYPES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint32).astype(np.uint8)
    if qtype == QT.F16:
        raw = random_halves(rng, n_blocks * qk).view(np.uint8).reshape(n_blocks, nbytes)
    elif qtype in (QT.F32, QT.BF16):
        # keep values finite: no NaN payload questions
        x = rng.standard_normal(n_blocks * qk).astype(np.float32) * np.exp2(rng.integers(-60, 60, n_blocks * qk)).astype(np.float32)
        raw = (x.view(np.uint8) if qtype == QT.F32 else (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
        raw = raw.reshape(n_blocks, nbytes)
    for off in scale_offsets:
        raw[:, off:off + 2] = random_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def quantized_blocks(rng, qtype, n_blocks):
    qk = TYPES[qtype][0]
    x = rng.standard_normal((n_blocks, qk)).astype(np.float32) * rng.uniform(1e-3, 10, (n_blocks, 1)).astype(np.float32)
    x[0] = 0.0  # an all-zero block (d == 0)
    return np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(n_blocks, -1)


def check(driver, tmp_path, qtype, raw):
    qk = TYPES[qtype][0]
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    inp.write_bytes(raw.tobytes())
    subprocess.run([str(driver), str(int(qtype)), str(inp), str(out)], check=True)
    got = np.fromfile(out, dtype=np.float32).reshape(2, -1)
    if qtype in (QT.F32, QT.F16, QT.BF16):
        flat = raw.reshape(-1)
        ref = quants.dequantize(flat, qtype).astype(np.float32).reshape(-1)
    else:
        ref = quants.dequantize(raw, qtype).reshape(-1)
    assert ref.size == raw.shape[0] * qk
    for name, g in (("dequant8", got[0]), ("dequant_at", got[1])):
        bad = np.nonzero(g.view(np.uint32) != ref.view(np.uint32))[0]
        assert bad.size == 0, (f"{qtype.name} {name}: {bad.size} of {ref.size} differ, first at element {bad[0]} "
                               f"(block {bad[0] // qk}): got {g[bad[0]]!r} want {ref[bad[0]]!r}")


@pytest.mark.parametrize("qtype", list(TYPES), ids=[t.name for t in TYPES])
def test_random_bytes_bit_exact(driver, tmp_path, qtype):
    rng = np.random.default_rng(1000 + int(qtype))
    check(driver, tmp_path, qtype, random_blocks(rng, qtype, 257))


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE), ids=[t.name for t in sorted(QUANTIZABLE)])
def test_quantized_bit_exact(driver, tmp_path, qtype):
    rng = np.random.default_rng(2000 + int(qtype))
    check(driver, tmp_path, qtype, quantized_blocks(rng, qtype, 129))
