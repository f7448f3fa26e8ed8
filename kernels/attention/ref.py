"""Numpy references for rotary embeddings and causal attention over a KV cache."""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dequant.ref import round_bf16  # noqa: F401 (re-exported)

F32 = np.float32


def rope(x: np.ndarray, pos: np.ndarray, *, n_dims: int, freq_base: float, mode: str = "neox",
         freq_scale: float = 1.0, sections=(), freq_factors=None) -> np.ndarray:
    """Rotate the first n_dims dims of each head; the rest pass through.

    x [T, H, D], pos [T] (absolute positions). mode "neox" pairs dim i with i + n_dims/2,
    "normal" pairs 2i with 2i+1. "imrope" (Qwen3.5's interleaved multi-section rope) gives
    every section the same position for text tokens, which makes it exactly "neox".
    freq_factors [n_dims/2] (llama.cpp's rope_freqs) divide each pair's angle; Gemma 4's full
    layers set 1e30 on the pairs that must not rotate ("proportional" partial RoPE).
    """
    T, H, D = x.shape
    half = n_dims // 2
    inv = freq_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_dims)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64).reshape(half)
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


def decode_key_ranges(n: int, n_split: int, min_keys: int = 32) -> list[tuple[int, int]]:
    """The key ranges of the split one-token step (decode_attn.cu da::key_range): n keys cut
    into n_split ranges of ceil(n / n_split) keys, at least min_keys; the last ones may be empty."""
    per = max(-(-n // n_split) if n else 0, min_keys)
    return [(s * per, min(n, s * per + per)) for s in range(n_split)]


def attention_decode_split(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, P: int, *, scale: float,
                           n_split: int, min_keys: int = 32) -> np.ndarray:
    """`attention_cache` of one query row (q [1, Hq, D], the step's K/V at row P) computed the way
    decode_attn.cu does: a partial softmax state (m, l, acc) in log2 units per key range and
    query head, then their combination. Equal to attention_cache up to rounding."""
    _, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    n = P + 1
    sl2 = scale * np.log2(np.e)
    out = np.zeros((1, Hq, v_cache.shape[2]), np.float64)
    for h in range(Hq):
        hk = h // group
        parts = []
        for lo, hi in decode_key_ranges(n, n_split, min_keys):
            if lo >= hi:
                continue
            s = k_cache[lo:hi, hk].astype(np.float64) @ (q[0, h].astype(np.float64) * sl2)
            m = s.max()
            w = np.exp2(s - m)
            parts.append((m, w.sum(), w @ v_cache[lo:hi, hk].astype(np.float64)))
        M = max(p[0] for p in parts)
        L = sum(l * np.exp2(m - M) for m, l, _ in parts)
        out[0, h] = sum(a * np.exp2(m - M) for m, _, a in parts) / L
    return out.astype(F32)


def kv_append(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, P: int) -> None:
    """Write a chunk's keys and values into the cache, in place: k_cache[P + t] = k[t],
    v_cache[P + t] = v[t] for t < T, rounded to the cache's dtype (bf16 on the GPU; the
    reference rounds through `round_bf16` when the cache is float32 standing in for bf16).
    k, v [T, Hkv, D]; k_cache, v_cache [max_ctx, Hkv, D]. Rows P + t >= max_ctx are dropped."""
    T = k.shape[0]
    n = max(0, min(T, k_cache.shape[0] - P))
    k_cache[P:P + n] = k[:n]
    v_cache[P:P + n] = v[:n]


# ---- sliding-window attention over a ring cache (Gemma's SWA layers) -------------------------
#
# A sliding layer keeps only the keys a later query can still see: a query at position p sees
# the keys at p - window + 1 .. p (itself included), so a chunk starting at P needs at most the
# window - 1 keys before P. The carried state is a ring of R >= window - 1 rows: row r holds the
# key (value) of the latest position p < P with p % R == r, and is empty while p < 0. Its size is
# fixed by the window, whatever the prompt length.

def ring_positions(P: int, R: int) -> np.ndarray:
    """Position of the key each of the R ring rows holds before a chunk starting at P (-1: empty)."""
    r = np.arange(R, dtype=np.int64)
    p = P - 1 - ((P - 1 - r) % R)
    return np.where(p >= 0, p, -1)


def attention_window(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_ring: np.ndarray, v_ring: np.ndarray,
                     *, P: int, window: int, scale: float) -> np.ndarray:
    """Causal sliding-window GQA attention of a chunk over its own keys and a ring of earlier ones.

    q [Tq, Hq, D] are the last Tq queries of the chunk (Tq = T normally), at positions
    P + T - Tq + t; k [T, Hkv, D], v [T, Hkv, Dv] are the chunk's keys and values at P..P+T-1;
    k_ring [R, Hkv, D], v_ring [R, Hkv, Dv] hold the keys before P (see ring_positions).
    A query at p sees the keys at p0 with p0 <= p and p - p0 < window. Returns [Tq, Hq, Dv].
    """
    Tq, Hq, D = q.shape
    T, Hkv, _ = k.shape
    R = k_ring.shape[0]
    group = Hq // Hkv
    pos_k = np.concatenate([ring_positions(P, R), P + np.arange(T)])        # [R + T]
    pos_q = P + T - Tq + np.arange(Tq)                                      # [Tq]
    keys = np.concatenate([k_ring, k]).astype(np.float64)
    vals = np.concatenate([v_ring, v]).astype(np.float64)
    kh = np.repeat(keys, group, axis=1)
    vh = np.repeat(vals, group, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kh) * scale
    dist = pos_q[:, None] - pos_k[None, :]
    visible = (pos_k[None, :] >= 0) & (dist >= 0) & (dist < window)       # [Tq, R + T]
    s = np.where(visible[None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vh).astype(F32)


def window_pairs(Tq: int, T: int, P: int, window: int) -> int:
    """(query, key) pairs attention_window actually weighs: sum over queries of min(window, p + 1)."""
    pos_q = P + T - Tq + np.arange(Tq)
    return int(np.minimum(window, pos_q + 1).sum())


def kv_ring_append(ring: np.ndarray, x: np.ndarray, *, P: int) -> np.ndarray:
    """The ring after a chunk: x [T, Hkv, D] at positions P..P+T-1 written to rows (P + t) % R;
    only the last R rows of a chunk longer than the ring survive. ring [R, Hkv, D] -> new ring."""
    R, T = ring.shape[0], x.shape[0]
    out = ring.astype(F32, copy=True)
    first = max(0, T - R)
    out[(P + np.arange(first, T)) % R] = x[first:]
    return out
