"""Numpy references for rotary embeddings and causal attention over a KV cache."""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dequant.ref import round_bf16  # noqa: F401 (re-exported)

F32 = np.float32


def rope(x: np.ndarray, pos: np.ndarray, *, n_dims: int, freq_base: float, mode: str = "neox",
         freq_scale: float = 1.0, sections=()) -> np.ndarray:
    """Rotate the first n_dims dims of each head; the rest pass through.

    x [T, H, D], pos [T] (absolute positions). mode "neox" pairs dim i with i + n_dims/2,
    "normal" pairs 2i with 2i+1. "imrope" (Qwen3.5's interleaved multi-section rope) gives
    every section the same position for text tokens, which makes it exactly "neox".
    """
    T, H, D = x.shape
    half = n_dims // 2
    inv = freq_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_dims)
    theta = (pos.astype(np.float64)[:, None] * freq_scale) * inv[None, :]  # [T, half]
    cos = np.cos(theta).astype(F32)[:, None, :]
    sin = np.sin(theta).astype(F32)[:, None, :]
    y = x.astype(F32, copy=True)
    if mode in ("neox", "imrope", "mrope"):
        x0, x1 = x[..., :half], x[..., half:n_dims]
        y[..., :half] = x0 * cos - x1 * sin
        y[..., half:n_dims] = x0 * sin + x1 * cos
    elif mode == "normal":
        x0, x1 = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
        y[..., 0:n_dims:2] = x0 * cos - x1 * sin
        y[..., 1:n_dims:2] = x0 * sin + x1 * cos
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return y


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float) -> np.ndarray:
    """Causal GQA attention of a chunk over its cache.

    q [T, Hq, D]; k [S, Hkv, D], v [S, Hkv, Dv] with S = P + T (the first P rows are earlier
    chunks). Query t sits at position P + t and sees keys 0..P+t. Query head h reads KV head
    h // (Hq / Hkv). Returns [T, Hq, Dv].
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    P = S - T
    group = Hq // Hkv
    kh = np.repeat(k, group, axis=1).astype(np.float64)  # [S, Hq, D]
    vh = np.repeat(v, group, axis=1).astype(np.float64)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kh) * scale
    mask = np.arange(S)[None, :] > (P + np.arange(T))[:, None]  # [T, S]
    s = np.where(mask[None], -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vh).astype(F32)


def attention_cache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, P: int, *, scale: float) -> np.ndarray:
    """`attention` of a chunk over a KV cache buffer: q [T, Hq, D]; k_cache [max_ctx, Hkv, D],
    v_cache [max_ctx, Hkv, Dv] whose rows 0..P+T-1 are live (the chunk's own K/V at P..P+T-1).
    Returns [T, Hq, Dv]."""
    S = P + q.shape[0]
    return attention(q, k_cache[:S], v_cache[:S], scale=scale)


def kv_append(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, P: int) -> None:
    """Write a chunk's keys and values into the cache, in place: k_cache[P + t] = k[t],
    v_cache[P + t] = v[t] for t < T, rounded to the cache's dtype (bf16 on the GPU; the
    reference rounds through `round_bf16` when the cache is float32 standing in for bf16).
    k, v [T, Hkv, D]; k_cache, v_cache [max_ctx, Hkv, D]. Rows P + t >= max_ctx are dropped."""
    T = k.shape[0]
    n = max(0, min(T, k_cache.shape[0] - P))
    k_cache[P:P + n] = k[:n]
    v_cache[P:P + n] = v[:n]
