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
