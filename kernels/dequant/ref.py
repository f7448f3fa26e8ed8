"""Weights as the reference ops see them.

A weight is either a plain float array or a lazy handle onto the memory-mapped GGUF that
dequantises on demand (whole tensor, some rows, one expert): a 35B-A3B layer's experts are
3 GB as float32, so the reference never densifies what it does not touch.
"""
from __future__ import annotations

import numpy as np


def dense(w) -> np.ndarray:
    """Float32 array of a weight or activation."""
    if hasattr(w, "dense"):
        return w.dense()
    return np.asarray(w, dtype=np.float32)


def rows(w, ids: np.ndarray) -> np.ndarray:
    """w[ids] for a 2-D weight [R, C]: only those rows are dequantised."""
    if hasattr(w, "rows"):
        return w.rows(ids)
    return np.asarray(w, dtype=np.float32)[ids]


def expert(w, e: int) -> np.ndarray:
    """Slice e of a stacked 3-D expert weight [E, N, K] as float32 [N, K]."""
    if hasattr(w, "expert"):
        return w.expert(int(e))
    return np.asarray(w[int(e)], dtype=np.float32)


# ---- bfloat16 as the GPU stores it (uint16 bit patterns; CuPy has no bf16 dtype) ---------------

def f32_to_bf16_bits(x) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).reshape(np.shape(x))


def bf16_bits_to_f32(b) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(x) -> np.ndarray:
    """float32 -> nearest bf16 value, returned as float32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x))
