"""Numpy references for mixture-of-experts routing and expert matmuls: the plain per-token
form (topk, take_along, mul_mat_id) and the fused form (moe_route, moe_grouped_gemm)."""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.dense import ref as dense_ref
from ggfuse.kernels.dequant.ref import dense, expert

F32 = np.float32


def topk(x: np.ndarray, *, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first: x [T, E] -> [T, k] int32."""
    order = np.argsort(-x, axis=-1, kind="stable")
    return order[:, :k].astype(np.int32)


def take_along(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x [T, E] (or a per-expert vector [1, E], a weight), ids [T, k] -> x[t, ids[t, j]]  [T, k]."""
    return np.take_along_axis(dense(x), ids.astype(np.int64), axis=-1).astype(F32, copy=False)


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


# ---- fused forms (made by passes/fuse_moe.py) ------------------------------------------------
#
# The routing layout shared by moe_route and moe_grouped_gemm. A token's k choices are "slots",
# numbered t*k + j. sorted_slots lists the slots grouped by expert (expert 0 first; within an
# expert in token order), and each expert's segment is padded with -1 up to a multiple of
# `tile`, so a grouped GEMM can give every row tile exactly one expert and never mix two:
#
#     expert_offsets [E+1]  segment starts; expert e owns sorted_slots[off[e]:off[e+1]],
#                           off[e+1] - off[e] = ceil(count_e / tile) * tile (0 for no tokens)
#     sorted_slots   [S]    S = T*k + E*(tile-1), the worst case, so the length is static for a
#                           symbolic T; entries from off[E] on are -1 too.
#
# Everything is derived from ids on the device (a counting sort), so no host round-trip.

NORM_SUM_MIN = F32(6.103515625e-5)  # llama.cpp clamps the weight sum to the smallest f16 normal


def padded_length(T: int, k: int, E: int, tile: int) -> int:
    """Static length of sorted_slots: every expert may waste up to tile-1 rows."""
    return T * k + E * (tile - 1)


def route_layout(ids: np.ndarray, *, n_expert: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Counting sort of the slots by expert: ids [T, k] -> (sorted_slots [S], expert_offsets [E+1])."""
    T, k = ids.shape
    flat = ids.reshape(-1).astype(np.int64)
    counts = np.bincount(flat, minlength=n_expert)
    padded = -(-counts // tile) * tile
    offsets = np.concatenate([[0], np.cumsum(padded)])
    order = np.argsort(flat, kind="stable")  # stable: token order within an expert
    dense_start = np.concatenate([[0], np.cumsum(counts)])[:-1]
    e_sorted = flat[order]
    pos = offsets[e_sorted] + np.arange(flat.size) - dense_start[e_sorted]
    slots = np.full(padded_length(T, k, n_expert, tile), -1, dtype=np.int32)
    slots[pos] = order
    return slots, offsets.astype(np.int32)


def moe_route(x: np.ndarray, w_router, w_shexp_gate=None, *, k: int, gating: str = "softmax",
              norm: bool = True, scale: float = 0.0, tile: int = 16, expert_scale=None) -> tuple:
    """Router of llama.cpp's build_moe_ffn, plus the routing layout above.

    x [T, D], w_router [E, D], w_shexp_gate [1, D] (optional) ->
      ids [T, k] i32            chosen experts, most probable first
      weights [T, k] f32        their probabilities, / their sum if norm, * scale unless 0 or 1,
                                * expert_scale[0, e] of their expert when given ([1, E]; Gemma 4)
      sorted_slots [S] i32, expert_offsets [E+1] i32   (layout above)
      shexp_gate [T, 1] f32     sigmoid(x w_shexp_gate^T), only when w_shexp_gate is given
    gating: "softmax" or "sigmoid" over the router logits.
    """
    # The same reference functions as the plain ops, in the same order, so rounding agrees.
    logits = dense_ref.matmul(x, w_router)
    if gating == "softmax":
        probs = dense_ref.softmax(logits, axis=-1)
    elif gating == "sigmoid":
        probs = dense_ref.sigmoid(logits)
    else:
        raise ValueError(f"moe_route: gating {gating!r} is not softmax or sigmoid")
    ids = topk(probs, k=k)
    w = take_along(probs, ids)
    if norm:
        s = np.maximum(dense_ref.sum_axis(w, axis=-1, keepdims=True), NORM_SUM_MIN)
        w = dense_ref.div(w, s)
    if scale not in (0.0, 1.0):
        w = dense_ref.scale(w, factor=scale)
    if expert_scale is not None:
        w = dense_ref.mul(w, take_along(expert_scale, ids))
    slots, offsets = route_layout(ids, n_expert=logits.shape[-1], tile=tile)
    out = (ids, w, slots, offsets)
    if w_shexp_gate is not None:
        out += (dense_ref.sigmoid(dense_ref.matmul(x, w_shexp_gate)),)
    return out


def moe_grouped_gemm(x: np.ndarray, weights: np.ndarray, sorted_slots: np.ndarray, expert_offsets: np.ndarray,
                     *, w_down, w_gate=None, w_up=None, w_gate_up=None, shared=None, act: str = "silu") -> np.ndarray:
    """Routed SwiGLU experts over expert-sorted tokens, weighted back into token order.

    x [T, D], weights [T, k], sorted_slots [S], expert_offsets [E+1] (layout above);
    w_gate, w_up [E, F, D] or w_gate_up [E, 2F, D] (gate rows first); w_down [E, D, F];
    shared: (w_gate_sh [Fs, D], w_up_sh [Fs, D], w_down_sh [D, Fs], shexp_gate [T, 1]) or None.
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = expert of slot (t, j),
             + shexp_gate[t] * down_sh(silu(gate_sh x_t) * up_sh x_t)   -> [T, D]
    act "gelu" replaces silu by GELU-tanh in the routed experts (Gemma 4; it has no shared expert).
    Stacked expert weights may be lazy GGUF handles: only experts with tokens are dequantised.
    """
    act_fn = dense_ref.gelu if act == "gelu" else dense_ref.silu
    T, k = weights.shape
    per_slot = np.zeros((T * k, x.shape[1]), dtype=F32)
    w_flat = weights.reshape(-1)
    for e in range(len(expert_offsets) - 1):
        seg = sorted_slots[expert_offsets[e]:expert_offsets[e + 1]]
        seg = seg[seg >= 0].astype(np.int64)  # drop the tile padding
        if seg.size == 0:
            continue
        xe = x[seg // k].astype(F32)
        if w_gate_up is not None:
            gu = xe @ expert(w_gate_up, e).T
            F = gu.shape[1] // 2
            gate, up = gu[:, :F], gu[:, F:]
        else:
            gate, up = xe @ expert(w_gate, e).T, xe @ expert(w_up, e).T
        y = dense_ref.mul(act_fn(gate), up) @ expert(w_down, e).T
        per_slot[seg] = y * w_flat[seg, None]
    # One weighted sum per token over its k slots: the scatter-add, summed as the plain graph does.
    out = dense_ref.sum_axis(per_slot.reshape(T, k, -1), axis=1)
    if shared is not None:
        wg, wu, wd, sg = shared
        h = dense_ref.mul(dense_ref.silu(dense_ref.matmul(x, wg)), dense_ref.matmul(x, wu))
        out = dense_ref.add(out, dense_ref.mul(dense_ref.matmul(h, wd), sg))
    return out
