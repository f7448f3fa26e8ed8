"""Random, valid GGUF weights for the GEMM tests and benchmarks.

    raw, dense = random_weight("q4_k", (E, N, K), rng)   # raw uint8 [E, N, row_bytes], dense f32 [E, N, K]

Types gguf can quantise (q8_0, q4_0, q5_0, q4_1, ...) go through gguf.quants.quantize; K-quants
are random bytes with sane f16 super-block scales (gguf has no K-quant quantiser). `dense` is
gguf.quants.dequantize of the raw bytes (bf16: the bf16 values), the meaning of the weight.
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dequant.ref import bf16_bits_to_f32, f32_to_bf16_bits, round_bf16  # noqa: F401 (re-exported)

from ggfuse.kernels.quant.types import qtype

# where each K-quant keeps its f16 scales: (byte offset, scale range)
_KQUANT_SCALES = {
    "q4_k": ((0, (1e-4, 3e-4)), (2, (1e-4, 3e-4))),    # d, dmin
    "q5_k": ((0, (5e-5, 1.5e-4)), (2, (5e-5, 1.5e-4))),
    "q6_k": ((208, (2e-5, 6e-5)),),                      # d (scales are int8, any byte is sane)
}


def random_weight(w_type, shape: tuple, rng: np.random.Generator, scale: float = 0.02):
    """(raw, dense): raw GGUF bytes [..., row_bytes] (uint16 bf16 bits for bf16) and float32 [..., K]."""
    import gguf
    from gguf.quants import dequantize, quantize
    t = qtype(w_type)
    *lead, K = shape
    if t.name == "bf16":
        bits = f32_to_bf16_bits(rng.standard_normal(shape, dtype=np.float32) * scale)
        return bits, bf16_bits_to_f32(bits)
    gt = gguf.GGMLQuantizationType(t.ggml_id)
    if t.name in _KQUANT_SCALES:
        nb = K // t.block
        raw = rng.integers(0, 256, size=(*lead, nb, t.block_bytes), dtype=np.uint8)
        for off, (lo, hi) in _KQUANT_SCALES[t.name]:
            d = rng.uniform(lo, hi, size=(*lead, nb)).astype(np.float16)
            raw[..., off:off + 2] = d.view(np.uint8).reshape(*lead, nb, 2)
        raw = raw.reshape(*lead, nb * t.block_bytes)
    else:
        raw = quantize(rng.standard_normal(shape, dtype=np.float32) * scale, gt)
    dense = dequantize(raw, gt).astype(np.float32)
    assert dense.shape == tuple(shape), (dense.shape, shape)
    return raw, dense
