"""Numpy references for mixture-of-experts routing and per-token expert matmuls."""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dequant.ref import expert

F32 = np.float32


def topk(x: np.ndarray, *, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first: x [T, E] -> [T, k] int32."""
    order = np.argsort(-x, axis=-1, kind="stable")
    return order[:, :k].astype(np.int32)


def take_along(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x [T, E], ids [T, k] -> x[t, ids[t, j]]  [T, k]."""
    return np.take_along_axis(x, ids.astype(np.int64), axis=-1).astype(F32, copy=False)


def mul_mat_id(w, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-(token, slot) expert matmul.

    w [E, N, K] stacked experts; x [T, K] (shared by every slot) or [T, k, K]; ids [T, k].
    out[t, j] = w[ids[t, j]] @ x[t(, j)]  -> [T, k, N].
    """
    T, kk = ids.shape
    xs = np.broadcast_to(x[:, None, :], (T, kk, x.shape[-1])) if x.ndim == 2 else x
    out = None
    for e in np.unique(ids):
        tt, jj = np.nonzero(ids == e)
        W = expert(w, e)
        if out is None:
            out = np.zeros((T, kk, W.shape[0]), dtype=F32)
        out[tt, jj] = xs[tt, jj].astype(F32) @ W.T
    if out is None:  # T == 0
        out = np.zeros((T, kk, 0), dtype=F32)
    return out
