"""Numpy references for the Gated DeltaNet layer's core: short causal conv and the delta rule.

Letters: T tokens, C channels, Hk key heads, Hv value heads, K key dim, V value dim.
When there are fewer key heads than value heads, value head h reads key head h % Hk
("tile": Qwen3.5, whose converter reorders HF's V heads to match llama.cpp's broadcast) or
h // (Hv / Hk) ("interleave": Qwen3-Next, which llama.cpp repeats explicitly).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def ssm_conv(x: np.ndarray, state: np.ndarray, w) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal conv1d with a carried window.

    x [T, C]; state [Kc-1, C] (the last Kc-1 inputs before this chunk); w [C, Kc].
    y[t, c] = sum_j w[c, j] * xs[t + j, c] with xs = concat(state, x).
    Returns y [T, C] and the new state (last Kc-1 rows of xs).
    """
    w = np.asarray(w, dtype=F32)
    Kc = w.shape[1]
    T = x.shape[0]
    xs = np.concatenate([state.astype(F32), x.astype(F32)], axis=0)  # [Kc-1+T, C]
    y = np.zeros_like(x, dtype=np.float64)
    for j in range(Kc):
        y += xs[j:j + T].astype(np.float64) * w[:, j].astype(np.float64)[None, :]
    return y.astype(F32), xs[xs.shape[0] - (Kc - 1):].copy()


def key_head_of(Hv: int, Hk: int, head_map: str) -> np.ndarray:
    """Which key head each value head reads: "tile" h % Hk, "interleave" h // (Hv / Hk)."""
    if head_map == "tile":
        return np.arange(Hv) % Hk
    if head_map == "interleave":
        return np.arange(Hv) // (Hv // Hk)
    raise ValueError(f"unknown head_map {head_map!r}")


def gated_delta_rule(q, k, v, g, beta, state, *, scale: float, head_map: str = "tile"):
    """Token-recurrent gated delta rule (the definition; O(T) sequential steps).

    q, k [T, Hk, K]; v [T, Hv, V]; g [T, Hv] log-decay (<= 0); beta [T, Hv] in (0, 1);
    state [Hv, K, V]. Per step and head:
        S <- exp(g_t) S
        S <- S + k_t (beta_t (v_t - S^T k_t))^T
        o_t = scale * S^T q_t
    Returns o [T, Hv, V] and the final state [Hv, K, V].
    """
    T, Hk, K = q.shape
    Hv = v.shape[1]
    kh = key_head_of(Hv, Hk, head_map)
    S = state.astype(np.float64).copy()
    qd = q[:, kh].astype(np.float64)
    kd = k[:, kh].astype(np.float64)
    vd = v.astype(np.float64)
    o = np.empty((T, Hv, v.shape[2]), dtype=np.float64)
    for t in range(T):
        S *= np.exp(g[t].astype(np.float64))[:, None, None]
        kv = np.einsum("hkv,hk->hv", S, kd[t])
        delta = (vd[t] - kv) * beta[t].astype(np.float64)[:, None]
        S += kd[t][:, :, None] * delta[:, None, :]
        o[t] = np.einsum("hkv,hk->hv", S, qd[t]) * scale
    return o.astype(F32), S.astype(F32)
