"""kernels/gemm/dequant90.cuh (the sm_90a GEMM producers' word-wise dequantisation) against
gguf.quants.dequantize, without a GPU: the header also compiles as plain C++ (its shared-memory
loads read a host byte array), and every bf16 it produces must equal round_bf16 of gguf's value,
for every K step, both producer halves and every even misalignment of the block in the raw slot
(the sign of a zero aside).
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants
from quant_blocks import build_host_driver, random_blocks

from ggfuse.kernels.gemm.weights import f32_to_bf16_bits


DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "gemm/dequant90.cuh"

// argv: type, input (whole units: Q4_K/Q6_K 1 block, Q8_0 2 blocks), misalignment, output
int main(int argc, char** argv) {
    const int type = atoi(argv[1]), mis = atoi(argv[3]);
    const std::vector<unsigned char> in = read_all(argv[2]);
    const int unit = type == GGML_Q8_0 ? 68 : type == GGML_Q4_K ? 144 : 210;
    const int steps = type == GGML_Q8_0 ? 1 : 4;
    const long units = (long)in.size() / unit;
    std::vector<unsigned char> smem(256 + 64, 0xA5);   // garbage around the unit
    std::vector<unsigned short> out(units * steps * 64);
    dq90::host_smem = smem.data();
    for (long u = 0; u < units; ++u) {
        for (int i = 0; i < unit; ++i) smem[16 + mis + i] = in[u * unit + i];
        for (int sub = 0; sub < steps; ++sub)
            for (int hh = 0; hh < 2; ++hh) {
                unsigned o[16];
                int ch[4];
                if (type == GGML_Q4_K) {
                    dq90::q4_k(16 + mis, sub, hh, o);
                    ch[0] = 2 * hh; ch[1] = 2 * hh + 1; ch[2] = 4 + 2 * hh; ch[3] = 5 + 2 * hh;
                } else {
                    if (type == GGML_Q6_K) dq90::q6_k(16 + mis, sub, hh, o);
                    else dq90::q8_0(16 + mis, hh, o);
                    for (int i = 0; i < 4; ++i) ch[i] = 4 * hh + i;
                }
                for (int i = 0; i < 4; ++i)
                    for (int w = 0; w < 4; ++w) {
                        const long e = (u * steps + sub) * 64 + ch[i] * 8 + 2 * w;
                        out[e] = o[4 * i + w] & 0xFFFF;
                        out[e + 1] = o[4 * i + w] >> 16;
                    }
            }
    }
    FILE* g = fopen(argv[4], "wb");
    fwrite(out.data(), 2, out.size(), g);
    fclose(g);
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "dequant90_host", DRIVER)


@pytest.mark.parametrize("mis", [0, 2, 4, 6, 8, 10, 12, 14], ids=lambda m: f"mis{m}")
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda t: t.name)
def test_bit_exact_bf16(driver, tmp_path, qtype, mis):
    if qtype == QT.Q4_K and mis:
        pytest.skip("Q4_K blocks (144 bytes) are always 16-byte aligned in the raw slot")
    rng = np.random.default_rng(3000 + int(qtype) + mis)
    raw = random_blocks(rng, qtype, 128 if qtype == QT.Q8_0 else 64)
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(np.ascontiguousarray(raw).tobytes())
    subprocess.run([str(driver), str(int(qtype)), str(inp), str(mis), str(out)], check=True)
    got = np.fromfile(out, dtype=np.uint16)
    ref = f32_to_bf16_bits(quants.dequantize(raw, qtype).reshape(-1).astype(np.float32))
    assert got.size == ref.size
    # the one allowed difference: Q4_K's q * dl is (2^23 + q) dl - 2^23 dl, +0 where gguf may get -0
    got[got == 0x8000], ref[ref == 0x8000] = 0, 0
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, (f"{qtype.name} mis {mis}: {bad.size} of {ref.size} differ, first at {bad[0]}: "
                           f"got {got[bad[0]]:#06x} want {ref[bad[0]]:#06x}")
