"""GGML weight types as the CUDA kernels name them (kernels/quant/ggml_quants.cuh).

    qtype("q4_k") == qtype(DType.Q4_K) == qtype(GGMLQuantizationType.Q4_K) == qtype(12)
      -> QType(name="q4_k", ggml_id=12, block=256, block_bytes=144)

Kernel entry points carry the lower-case name (dequantize_q4_k_f32). Float types have ggml
block size 1; `block`/`block_bytes` here are ggml's, `row_bytes` works for every type.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    name: str
    ggml_id: int
    block: int
    block_bytes: int

    def row_bytes(self, row_len: int) -> int:
        if row_len % self.block:
            raise ValueError(f"{self.name}: row length {row_len} is not a multiple of the block size {self.block}")
        return row_len // self.block * self.block_bytes


_TYPES = {t.name: t for t in (
    QType("f32", 0, 1, 4), QType("f16", 1, 1, 2), QType("bf16", 30, 1, 2),
    QType("q4_0", 2, 32, 18), QType("q4_1", 3, 32, 20), QType("q5_0", 6, 32, 22), QType("q5_1", 7, 32, 24),
    QType("q8_0", 8, 32, 34), QType("q2_k", 10, 256, 84), QType("q3_k", 11, 256, 110),
    QType("q4_k", 12, 256, 144), QType("q5_k", 13, 256, 176), QType("q6_k", 14, 256, 210),
)}
_BY_ID = {t.ggml_id: t for t in _TYPES.values()}

SUPPORTED = tuple(_TYPES)


def qtype(t) -> QType:
    """The QType of a DType, a gguf GGMLQuantizationType, a ggml type id or a name."""
    if isinstance(t, QType):
        return t
    value = getattr(t, "value", t)  # DType ("q4_k") and GGMLQuantizationType (12) are enums
    if isinstance(value, str):
        got = _TYPES.get(value.lower())
    else:
        got = _BY_ID.get(int(value))
    if got is None:
        raise ValueError(f"GGML type {t!r} has no CUDA dequantiser (supported: {', '.join(SUPPORTED)})")
    return got


def act_kind(dtype, op: str, what: str) -> str:
    """How an activation is stored, as the kernels name it: 'f32' or 'bf16', from a ggfuse DType,
    a name or a numpy dtype (a 2-byte non-f16 dtype holds raw bf16 bits: CuPy has no bfloat16).
    `op` and `what` name the launcher and the operand in the error."""
    if isinstance(dtype, str):   # DType is a str enum: DType.BF16 == "bf16"
        name = str(getattr(dtype, "value", dtype)).lower()
        if name in ("f32", "float32"):
            return "f32"
        if name in ("bf16", "bfloat16"):
            return "bf16"
        raise ValueError(f"{op}: {what} dtype must be f32 or bf16, got {dtype!r}")
    import numpy as np
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "f32"
    if dt.itemsize == 2 and dt != np.float16:
        return "bf16"
    raise ValueError(f"{op}: {what} dtype must be float32 or a 2-byte bf16 container, got {dt}")
