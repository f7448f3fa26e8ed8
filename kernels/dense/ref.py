"""Numpy references for dense math: matmul, embedding rows, norms, elementwise.

Activations are float32 with tokens first: x [T, D]. Weights keep GGUF's numpy order
[out, in] (GGUF ne reversed), so a projection is x @ w.T.
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dequant.ref import dense, rows

F32 = np.float32


def matmul(x: np.ndarray, w) -> np.ndarray:
    """x [..., K] @ w[N, K]^T -> [..., N]."""
    W = dense(w)
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]).astype(F32) @ W.T
    return y.reshape(*lead, W.shape[0]).astype(F32, copy=False)


def get_rows(w, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: w [V, D], ids [T] -> [T, D]."""
    return rows(w, np.asarray(ids, dtype=np.int64)).astype(F32, copy=False)


def rms_norm(x: np.ndarray, w=None, *, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis, times w (ggml accumulates in double)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    y = x * (1.0 / np.sqrt(ms + eps)).astype(F32)
    if w is not None:
        y = y * dense(w)
    return y.astype(F32, copy=False)


def l2_norm(x: np.ndarray, *, eps: float) -> np.ndarray:
    """x / sqrt(sum(x^2) + eps) over the last axis (llama.cpp's GDN q/k normalisation)."""
    ss = np.sum(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ss + eps)).astype(F32)).astype(F32, copy=False)


def silu(x):
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def softplus(x):
    # ggml: x > 20 ? x : log1p(exp(x))
    xd = x.astype(np.float64)
    return np.where(xd > 20.0, xd, np.log1p(np.exp(np.minimum(xd, 20.0)))).astype(F32)


def exp(x):
    return np.exp(x.astype(np.float64)).astype(F32)


def softmax(x, *, axis: int = -1):
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(F32)


def add(a, b):
    return (dense(a) + dense(b)).astype(F32, copy=False)


def sub(a, b):
    return (dense(a) - dense(b)).astype(F32, copy=False)


def mul(a, b):
    return (dense(a) * dense(b)).astype(F32, copy=False)


def div(a, b):
    return (dense(a) / dense(b)).astype(F32, copy=False)


def scale(x, *, factor: float):
    return (x * F32(factor)).astype(F32, copy=False)


def sum_axis(x, *, axis: int, keepdims: bool = False):
    return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float64).astype(F32)


_GELU_C = np.sqrt(2.0 / np.pi)


def gelu(x):
    """GELU, tanh approximation (ggml_gelu, HF gelu_pytorch_tanh):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xd = x.astype(np.float64)
    return (0.5 * xd * (1.0 + np.tanh(_GELU_C * (xd + 0.044715 * xd ** 3)))).astype(F32)


def softcap(x, *, cap: float):
    """Soft-cap: cap * tanh(x / cap) (Gemma's final logits)."""
    return (cap * np.tanh(x.astype(np.float64) / cap)).astype(F32)


def ple_gather(w, ids: np.ndarray, *, n_layer: int, width: int, scale: float) -> np.ndarray:
    """Per-layer embeddings of the tokens: w [V, n_layer * width], ids [T] ->
    rows * scale as [T, n_layer, width] (layer il's slice is [:, il])."""
    r = get_rows(w, ids)
    return (r * F32(scale)).reshape(len(ids), n_layer, width)
