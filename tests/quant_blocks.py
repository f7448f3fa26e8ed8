"""Random GGML blocks for the dequantisation tests (host and GPU): every type, from random
bytes with finite half-precision scales (subnormals and zeros included), or from
gguf.quants.quantize where gguf can quantise the type."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

# type -> (block elements, block bytes, byte offsets of its f16 scale fields)
TYPES = {
    QT.F32: (8, 32, ()), QT.F16: (8, 16, ()), QT.BF16: (8, 16, ()),
    QT.Q4_0: (32, 18, (0,)), QT.Q4_1: (32, 20, (0, 2)), QT.Q5_0: (32, 22, (0,)),
    QT.Q5_1: (32, 24, (0, 2)), QT.Q8_0: (32, 34, (0,)),
    QT.Q2_K: (256, 84, (80, 82)), QT.Q3_K: (256, 110, (108,)), QT.Q4_K: (256, 144, (0, 2)),
    QT.Q5_K: (256, 176, (0, 2)), QT.Q6_K: (256, 210, (208,)),
}
QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}


def random_halves(rng, n):
    """Finite float16 bit patterns: normals of many magnitudes, subnormals, signed zeros."""
    h = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    inf_nan = (h & 0x7C00) == 0x7C00
    h[inf_nan] &= 0xBFFF  # exponent 0x1F -> 0x0F: finite
    special = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x3C00, 0x7BFF], dtype=np.uint16)
    h[: min(n, len(special))] = special[: min(n, len(special))]
    return h


def random_blocks(rng, qtype, n_blocks):
    """uint8 [n_blocks, block bytes]: random quants, finite random f16 scales (float types:
    finite values over a wide range). For F32/F16/BF16 a "block" is 8 elements."""
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
    """uint8 [n_blocks, block bytes] from gguf.quants.quantize of random floats (type in QUANTIZABLE)."""
    qk = TYPES[qtype][0]
    x = rng.standard_normal((n_blocks, qk)).astype(np.float32) * rng.uniform(1e-3, 10, (n_blocks, 1)).astype(np.float32)
    x[0] = 0.0  # an all-zero block (d == 0)
    return np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(n_blocks, -1)


KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


HOST_IO = r"""
#include <cstdio>
#include <vector>
// the whole file at path, as bytes
static std::vector<unsigned char> read_all(const char* path) {
    std::vector<unsigned char> in;
    FILE* f = fopen(path, "rb");
    unsigned char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) in.insert(in.end(), buf, buf + n);
    fclose(f);
    return in;
}
"""


def build_host_driver(tmp_path_factory, name: str, source: str):
    """Compile a C++ driver that includes kernel headers from kernels/ with the host g++ (skips
    when there is none); HOST_IO (read_all) comes first. -ffp-contract=off: the headers'
    separate roundings must not be fused into FMAs on the host."""
    import pytest
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    d = tmp_path_factory.mktemp(name)
    src = d / "driver.cpp"
    src.write_text(HOST_IO + source)
    exe = d / "driver"
    subprocess.run([gxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wno-unknown-pragmas",
                    "-I", KERNELS, str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe
