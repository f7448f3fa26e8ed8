"""kernels/quant/ggml_quants.cuh is bit-exact with gguf.quants.dequantize, checked without a GPU.

The header also compiles as plain C++, so a tiny g++ driver dequantises blocks of every type
(with both dequant8 and dequant_at) and the result must equal gguf's bit for bit. Blocks come
from gguf.quants.quantize where it supports the type, and from random bytes (with finite
half-precision scales, subnormals and zeros included) for every type.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants
from quant_blocks import build_host_driver, QUANTIZABLE, TYPES, quantized_blocks, random_blocks


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
    const std::vector<unsigned char> in = read_all(argv[2]);
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
    return build_host_driver(tmp_path_factory, "ggml_quants_host", DRIVER)


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


def test_act_kind_names_storage_and_rejects_others():
    """The launchers' activation-storage check (kernels/quant/types.py act_kind), shared by the
    GEMM and attention launchers: f32, or bf16 bits in any 2-byte non-f16 container."""
    from ggfuse.ir.types import DType
    from ggfuse.kernels.attention.launch import _dtype_name
    from ggfuse.kernels.gemm.launch import act_kind
    assert act_kind(np.float32) == act_kind(DType.F32) == act_kind("float32") == "f32"
    assert act_kind(np.uint16) == act_kind(DType.BF16) == _dtype_name("bfloat16", "q") == "bf16"
    with pytest.raises(ValueError, match="gemm: c dtype must be float32"):
        act_kind(np.float16, "c")
    with pytest.raises(ValueError, match="flash_attn_prefill: out dtype must be f32 or bf16"):
        _dtype_name("f16", "out")
