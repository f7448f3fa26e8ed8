"""The integer-valued few-rows path (kernels/moe/grouped_small.cu, schedule "smallq") rests on two
facts, checked here in numpy on random Q4_K / Q6_K rows against the dequantised weights: each
lane's word of quants (IQ<W>::quads: elements 16 st + 4q .. + 3 of a block) holds the right
quants, and the per-scale identity
    sum x w = dl * sum x (128 + q) - bl * sum x     (Q4_K bl = 128 dl + dmin m, Q6_K bl = 160 dl)
gives the dot product; bf16 0x43qq is 128 + qq exactly for qq < 128."""
import numpy as np
import pytest

from ggfuse.kernels.dequant.ref import bf16_bits_to_f32
from ggfuse.kernels.gemm.weights import random_weight


def _k4(s, j):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _block_dot(name, b, x):
    u32 = lambda o: int.from_bytes(b[o:o + 4], "little")          # noqa: E731
    u16 = lambda o: int.from_bytes(b[o:o + 2], "little")          # noqa: E731
    half = lambda o: float(np.frombuffer(b[o:o + 2], dtype=np.float16)[0])   # noqa: E731
    if name == "q4_k":
        sps = 2

        def scale(sg):
            sc, m = _k4(b[4:16], sg)
            dl = half(0) * sc
            return dl, 128 * dl + half(2) * m

        def quads(st, q):
            sb = st >> 1
            return (u32(16 + 32 * (sb >> 1) + 16 * (st & 1) + 4 * q) >> (4 * (sb & 1))) & 0x0F0F0F0F
    else:
        sps = 1

        def scale(sg):
            dl = half(208) * float(np.int8(np.uint8(b[192 + sg])))
            return dl, 160 * dl

        def quads(st, q):
            e0 = 16 * st + 4 * q
            h, r = e0 >> 7, e0 & 127
            lo = u16(64 * h + (r & 63)) | (u16(64 * h + (r & 63) + 2) << 16)
            hi = u16(128 + 32 * h + (r & 31)) | (u16(128 + 32 * h + (r & 31) + 2) << 16)
            return ((lo >> (4 * (r >> 6))) & 0x0F0F0F0F) | (((hi >> (2 * (r >> 5))) & 0x03030303) << 4)
    tot = 0.0
    for sg in range(16 // sps):
        dl, bl = scale(sg)
        t = s_ = 0.0
        for s in range(sps):
            st = sg * sps + s
            for q in range(4):
                v = quads(st, q)
                for i in range(4):
                    e = 16 * st + 4 * q + i
                    qq = (v >> (8 * i)) & 0xFF
                    assert qq < 64
                    t += x[e] * float(bf16_bits_to_f32(np.array([0x4300 | qq], dtype=np.uint16))[0])
                    s_ += x[e]
        tot += dl * t - bl * s_
    return tot


@pytest.mark.parametrize("name,nbytes", [("q4_k", 144), ("q6_k", 210)])
def test_integer_quants_and_scale_identity(name, nbytes):
    rng = np.random.default_rng(7)
    K = 512
    raw, dense = random_weight(name, (3, K), rng)
    raw = np.asarray(raw).view(np.uint8).reshape(3, -1)
    x = rng.standard_normal(K)
    for row in range(3):
        rb = raw[row].tobytes()
        got = sum(_block_dot(name, rb[c // 256 * nbytes:(c // 256 + 1) * nbytes], x[c:c + 256])
                  for c in range(0, K, 256))
        want = float(np.asarray(dense[row], dtype=np.float64) @ x)
        assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (name, row, got, want)
