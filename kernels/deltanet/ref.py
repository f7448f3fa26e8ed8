"""Numpy references for the Gated DeltaNet layer's core: short causal conv (plain and with its SiLU)
and the delta rule (token-recurrent definition and the chunked WY/UT form).

Letters: T tokens, C channels, Hk key heads, Hv value heads, K key dim, V value dim.
When there are fewer key heads than value heads, value head h reads key head h % Hk
("tile": Qwen3.5, whose converter reorders HF's V heads to match llama.cpp's broadcast) or
h // (Hv / Hk) ("interleave": Qwen3-Next, which llama.cpp repeats explicitly).
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dense.ref import silu

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


def ssm_conv_silu(x: np.ndarray, state: np.ndarray, w) -> tuple[np.ndarray, np.ndarray]:
    """silu(ssm_conv(x, state, w)); the new state is ssm_conv's, unchanged (the window holds the
    conv's inputs, not its activations). Shapes as in `ssm_conv`."""
    y, new_state = ssm_conv(x, state, w)
    return silu(y), new_state


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


def chunk_gated_delta_rule(q, k, v, g, beta, state, *, scale: float, head_map: str = "tile", chunk: int = 64):
    """The gated delta rule computed chunk by chunk (the WY/UT form of flash-linear-attention).

    Same shapes and result as `gated_delta_rule`: q, k [T, Hk, K]; v [T, Hv, V]; g [T, Hv];
    beta [T, Hv]; state [Hv, K, V]. Returns o [T, Hv, V] and the final state [Hv, K, V].

    Within a chunk of L tokens starting from state S, with G = cumsum(g) over the chunk only and
    D[i, j] = exp(G_i - G_j) for j <= i (0 above the diagonal), unrolling the recurrence gives
    the delta-corrected values U as the solution of a unit lower-triangular system:
        (I + tril(diag(beta) K K^T * D, -1)) U = beta V - diag(beta exp(G)) K S
    so with A = (I + tril(...))^-1, w = A (beta exp(G) K), u = A (beta V): U = u - w S, and
        o = scale * ((q exp(G)) S + tril(q K^T * D) U)
        S <- exp(G_L) S + (K exp(G_L - G))^T U
    Every exponent is a difference of cumulative sums inside one chunk, taken in the direction
    that makes it <= 0 (g <= 0): nothing overflows, and a long prompt never forms exp of a
    sum over all of it. D's upper triangle is masked BEFORE exp, where G_i - G_j > 0.
    """
    T, Hk, K = q.shape
    Hv, V = v.shape[1:]
    kh = key_head_of(Hv, Hk, head_map)
    # Head-major float64 so each chunk is a batch of [L, *] matrices per value head.
    qd = q[:, kh].astype(np.float64).transpose(1, 0, 2) * scale
    kd = k[:, kh].astype(np.float64).transpose(1, 0, 2)
    vd = v.astype(np.float64).transpose(1, 0, 2)
    gd = g.astype(np.float64).T
    bd = beta.astype(np.float64).T
    S = state.astype(np.float64).copy()
    o = np.empty((Hv, T, V), dtype=np.float64)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        L = e - s
        qc, kc, vc, bc = qd[:, s:e], kd[:, s:e], vd[:, s:e], bd[:, s:e]
        G = np.cumsum(gd[:, s:e], axis=1)                                    # [Hv, L]
        causal = np.tril(np.ones((L, L), dtype=bool))
        D = np.exp(np.where(causal, G[:, :, None] - G[:, None, :], -np.inf))  # [Hv, L, L]
        strict = np.tril(bc[:, :, None] * (kc @ kc.transpose(0, 2, 1)) * D, -1)
        A = _unit_lower_inverse(strict)
        w = A @ ((bc * np.exp(G))[:, :, None] * kc)                          # [Hv, L, K]
        u = A @ (bc[:, :, None] * vc)                                        # [Hv, L, V]
        U = u - w @ S
        o[:, s:e] = (qc * np.exp(G)[:, :, None]) @ S + ((qc @ kc.transpose(0, 2, 1)) * D) @ U
        G_last = G[:, -1]
        S = np.exp(G_last)[:, None, None] * S + (kc * np.exp(G_last[:, None] - G)[:, :, None]).transpose(0, 2, 1) @ U
    return o.transpose(1, 0, 2).astype(F32), S.astype(F32)


def _unit_lower_inverse(strict: np.ndarray) -> np.ndarray:
    """(I + strict)^-1 for a batch [H, L, L] of strictly lower-triangular matrices, by forward
    substitution row by row: row i of the inverse only needs the rows above it."""
    L = strict.shape[-1]
    A = np.broadcast_to(np.eye(L), strict.shape).copy()
    for i in range(1, L):
        A[:, i, :i] = -np.einsum("hj,hjc->hc", strict[:, i, :i], A[:, :i, :i])
    return A


def ssm_conv_state(x: np.ndarray, state: np.ndarray, *, n_valid: int | None = None) -> np.ndarray:
    """The conv window after a (possibly padded) chunk: the last Kc-1 rows of
    concat(state, x[:n_valid]). x [T, C]; state [Kc-1, C] -> [Kc-1, C]. n_valid None means T,
    which is `ssm_conv`'s new state; a chunk padded past n_valid leaves the window as if the
    padding had never been seen."""
    n = x.shape[0] if n_valid is None else int(n_valid)
    xs = np.concatenate([state.astype(F32), x[:n].astype(F32)], axis=0)
    return xs[xs.shape[0] - state.shape[0]:].copy()


def deltanet_gates(alpha: np.ndarray, beta_lin: np.ndarray, dt_bias, ssm_a, *, n_valid: int | None = None):
    """The gated delta rule's per-token gates, as the plain graph computes them:
        g = softplus(alpha + dt_bias) * ssm_a      (ssm_a = -exp(A_log) <= 0, so g <= 0)
        beta = sigmoid(beta_lin)
    alpha, beta_lin [T, Hv]; dt_bias, ssm_a [Hv] -> (g [T, Hv], beta [T, Hv]).
    Rows t >= n_valid (padding of a fixed-size chunk) get g = 0 and beta = 0: the recurrence
    then keeps the state exactly (decay exp(0) = 1, update beta * (...) = 0)."""
    from ggfuse.kernels.dense import ref as dense_ref
    g = dense_ref.mul(dense_ref.softplus(dense_ref.add(alpha, dt_bias)), ssm_a)
    beta = dense_ref.sigmoid(beta_lin)
    if n_valid is not None:
        g[int(n_valid):] = 0.0
        beta[int(n_valid):] = 0.0
    return g, beta
