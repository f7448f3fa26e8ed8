"""Numpy stand-ins for the CUDA launchers a transformer plan binds, over tests/fake_cupy.py's
host arrays: the CUDA backend's host logic (weight forms, arena views, workspace, states, the
graph capture and replay, the LM head's blocks) then runs for real on the CPU, so whole-model
logits test the plumbing from plan records to launcher arguments: which value goes where,
strides, storage dtypes, in-place states, replays after a capture. Each stand-in computes what
its launcher's docstring says (in f32, from the same bf16-stored values); the kernels themselves
are tested on the GPU. Captures record the launches and graph.launch replays them.

    with emulated_device(monkeypatch) as used:   # used: the launcher names that ran
        ...
"""
from __future__ import annotations

import contextlib

import numpy as np

from ggfuse.kernels.attention import ref as attn_ref
from ggfuse.kernels.deltanet import ref as dn_ref
from ggfuse.kernels.dense import ref as dense_ref
from ggfuse.kernels.dequant.ref import bf16_bits_to_f32, f32_to_bf16_bits
from ggfuse.kernels.elementwise import ref as ew_ref


def _val(a) -> np.ndarray:
    a = np.asarray(a)
    return bf16_bits_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32)


def _put(out, x) -> None:
    x = np.asarray(x, np.float32).reshape(out.shape)
    out[...] = f32_to_bf16_bits(x) if out.dtype == np.uint16 else x


def _dequant(raw, qtype, n_rows: int, row_len: int, row0: int = 0) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from ggfuse.kernels.quant.types import qtype as _qt
    t = _qt(qtype)
    name = t.name
    b = np.asarray(raw).reshape(-1).view(np.uint8)
    if name in ("f32", "f16", "bf16"):
        item = {"f32": 4, "f16": 2, "bf16": 2}[name]
        v = b[row0 * row_len * item:(row0 + n_rows) * row_len * item]
        v = v.view({"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[name])
        v = bf16_bits_to_f32(v) if name == "bf16" else v.astype(np.float32)
        return v.reshape(n_rows, row_len)
    rb = t.row_bytes(row_len)
    rows = b[row0 * rb:(row0 + n_rows) * rb].reshape(n_rows, rb)
    return dequantize(rows, GGMLQuantizationType(t.ggml_id)).reshape(n_rows, row_len).astype(np.float32)


def _matrix(w, w_type, N: int, K: int) -> np.ndarray:
    """W [N, K] of a GEMM operand: bf16 bits, an f32 array, or raw GGUF bytes."""
    w = np.asarray(w)
    if w.dtype == np.uint16:
        return bf16_bits_to_f32(w).reshape(-1)[:N * K].reshape(N, K)
    if w.dtype == np.float32:
        return w.reshape(-1)[:N * K].reshape(N, K)
    return _dequant(w, w_type, N, K)


def _rows(a, M: int, K: int) -> np.ndarray:
    return _val(a)[:M, :K]


def _gelu(x):
    return dense_ref.gelu(x)


def _act(act):
    return _gelu if act == "gelu" else dense_ref.silu


# ---- the launchers -------------------------------------------------------------------------------

def dequantize(raw, qtype, n_rows, row_len, out, *, row0=0, stream=None):
    _put(out.reshape(-1)[:n_rows * row_len], _dequant(raw, qtype, n_rows, row_len, row0))


def get_rows(raw, qtype, row_len, ids, out, n_tokens=None, *, stream=None):
    from ggfuse.kernels.quant.types import qtype as _qt
    n = int(ids.size) if n_tokens is None else int(n_tokens)
    n_table = np.asarray(raw).reshape(-1).view(np.uint8).size // _qt(qtype).row_bytes(row_len)
    table = _dequant(raw, qtype, n_table, row_len)
    _put(out.reshape(-1)[:n * row_len], table[np.clip(np.asarray(ids)[:n], 0, n_table - 1)])


def ple_gather(raw, qtype, ids, out, scale, *, stream=None):
    T = out.shape[0]
    flat = out.reshape(T, -1)
    get_rows(raw, qtype, flat.shape[1], ids, flat, T)
    flat[...] = flat * np.float32(scale)


def rms_norm(x, w, out, *, eps, stream=None):
    _put(out, dense_ref.rms_norm(_val(x), None if w is None else _val(w), eps=eps))


def add_rms_norm(a, b, w, out_norm, out_sum, *, eps, stream=None):
    s = _val(a) + _val(b)
    _put(out_sum, s)
    _put(out_norm, dense_ref.rms_norm(s, _val(w), eps=eps))


def norm_rope(x, w, pos, out, *, eps, n_dims, freq_base, freq_scale=1.0, mode="neox", freq_factors=None,
              stream=None):
    T = x.shape[0]
    _put(out, ew_ref.norm_rope(_val(x), _val(w), np.asarray(pos)[:T], eps=eps, n_dims=n_dims, freq_base=freq_base,
                               mode=mode, freq_scale=freq_scale,
                               freq_factors=None if freq_factors is None else _val(freq_factors)))


def norm_add(x, w, res, out_sum, *, scale=None, w_next=None, out_norm=None, eps, eps_next=0.0, stream=None):
    total = ew_ref.norm_add(_val(x), _val(w), _val(res), None if scale is None else _val(scale), eps=eps)
    if w_next is not None:
        _put(out_norm, dense_ref.rms_norm(total, _val(w_next), eps=eps_next))
    _put(out_sum, total)


def _b(a, b):
    """b as the kernel reads it against a: the same shape, a [T, 1] gate, or a [D] row vector."""
    b = _val(b)
    if b.shape == a.shape or (b.ndim == a.ndim and b.shape[-1] == 1):
        return b
    if b.ndim == 1 and b.shape[0] == a.shape[-1]:
        return b[None]
    return b.reshape(a.shape)


def add(a, b, out, *, stream=None):
    x = _val(a)
    _put(out, x + _b(x, b))


def mul(a, b, out, *, stream=None):
    x = _val(a)
    _put(out, x * _b(x, b))


def sigmoid_mul(x, g, out, *, stream=None):
    a = _val(x)
    _put(out, a * dense_ref.sigmoid(_b(a, g)))


def silu_mul(a, b, out, *, stream=None):
    _put(out, dense_ref.silu(_val(a)) * _val(b))


def gelu(x, out, *, stream=None):
    _put(out, _gelu(_val(x)))


def gelu_mul(a, b, out, *, stream=None):
    _put(out, _gelu(_val(a)) * _val(b))


def softcap(x, out, cap, *, stream=None):
    _put(out, dense_ref.softcap(_val(x), cap=cap))


def scale(x, out, factor, *, stream=None):
    _put(out, _val(x) * np.float32(factor))


def copy(src, dst, *, stream=None):
    _put(dst, _val(src).reshape(dst.shape))


def kv_append(k, v, k_cache, v_cache, p_dev, *, stream=None):
    P = int(np.asarray(p_dev)[0])
    max_ctx, Hkv, D = k_cache.shape
    for src, dst in ((k, k_cache), (v, v_cache)):
        x = _val(src).reshape(src.shape[0], Hkv, D)
        n = max(0, min(x.shape[0], max_ctx - P))
        _put(dst[P:P + n], x[:n])


def kv_ring_append(x, ring, p_dev, n_valid_dev, *, stream=None):
    P, nv = int(np.asarray(p_dev)[0]), int(np.asarray(n_valid_dev)[0])
    R, Hkv, D = ring.shape
    xs = _val(x).reshape(x.shape[0], Hkv, D)[:nv]
    new = attn_ref.kv_ring_append(_val(ring), xs, P=P)
    _put(ring, new)


def flash_attn_prefill(q, q_dtype, q_stride_t, q_stride_h, k_cache, v_cache, out, T, Hq, Hkv, D, Dv, scale,
                       past_dev, n_valid_dev, stream=None):
    P, nv = int(np.asarray(past_dev)[0]), int(np.asarray(n_valid_dev)[0])
    o = np.zeros((T, Hq, Dv), np.float32)
    if nv:
        o[:nv] = attn_ref.attention_cache(_val(q)[:nv], _val(k_cache), _val(v_cache), P, scale=scale)
    _put(out, o)


def window_attn(q, q_dtype, k, v, k_ring, v_ring, out, T, Hq, Hkv, D, ring_rows, window, scale, past_dev,
                n_valid_dev, stream=None):
    P, nv = int(np.asarray(past_dev)[0]), int(np.asarray(n_valid_dev)[0])
    o = np.zeros((T, Hq, D), np.float32)
    if nv:
        if ring_rows:
            o[:nv] = attn_ref.attention_window(_val(q)[:nv], _val(k)[:nv], _val(v)[:nv], _val(k_ring), _val(v_ring),
                                               P=P, window=window, scale=scale)
        else:
            assert window == 0
            o[:nv] = attn_ref.attention_cache(_val(q)[:nv], _val(k_ring), _val(v_ring), P, scale=scale)
    _put(out, o)


def decode_attn(q, q_dtype, q_stride_h, k_cache, v_cache, out, Hq, Hkv, D, scale, n_split, ws, past_dev, n_valid_dev,
                stream=None):
    from ggfuse.kernels.attention.launch import DECODE_MIN_KEYS, decode_workspace_bytes
    P, nv = int(np.asarray(past_dev)[0]), int(np.asarray(n_valid_dev)[0])
    assert ws.nbytes >= decode_workspace_bytes(Hq, D, n_split)
    o = np.zeros((1, Hq, D), np.float32)
    if nv:
        o[:] = attn_ref.attention_decode_split(_val(q)[:1], _val(k_cache), _val(v_cache), P, scale=scale,
                                               n_split=n_split, min_keys=DECODE_MIN_KEYS)
    _put(out, o)


def gemm(a, a_dtype, lda, w, w_type, N, K, c, c_dtype, ldc, M, stream=None, *, accumulate=False, impl=None,
         persist=True, dequant="fast"):
    y = _rows(a, M, K) @ _matrix(w, w_type, N, K).T
    cv = c[:M, :N]
    _put(cv, y + (_val(cv) if accumulate else 0))


def gemm_bf16(a, lda, w, N, K, c, c_dtype, ldc, M, stream=None, *, accumulate=False):
    gemm(a, "bf16", lda, w, "bf16", N, K, c, c_dtype, ldc, M, accumulate=accumulate)


def gemm_swiglu(a, a_dtype, lda, w_gate, w_up, w_type, F, K, c, c_dtype, ldc, M, stream=None, *, impl=None,
                persist=True, dequant="fast", act="silu"):
    x = _rows(a, M, K)
    _put(c[:M, :F], _act(act)(x @ _matrix(w_gate, w_type, F, K).T) * (x @ _matrix(w_up, w_type, F, K).T))


def gemv(x, w, w_type, N, K, y, *, M=None, nvalid=None, stream=None):
    xs = _val(x)
    row = xs[int(np.asarray(nvalid)[0]) - 1:int(np.asarray(nvalid)[0])] if nvalid is not None else xs[:M or 1]
    _put(y[:row.shape[0], :N], row[:, :K] @ _matrix(w, w_type, N, K).T)


def gemv_group(x, mats, w_type, K, *, norm=None, stream=None):
    row = _val(x)[:1]
    if norm is not None:        # x is the first operand of an add_rms_norm the launch does itself
        b, w, eps, out_sum, out_norm = norm
        s = _val(x) + _val(b)
        _put(out_sum, s)
        row = dense_ref.rms_norm(s, _val(w), eps=eps).reshape(1, -1)
        if out_norm is not None:
            _put(out_norm, row)
            row = _val(out_norm).reshape(1, -1)  # as stored (bf16 where the norm's output is)
    for w, n, y in mats:
        _put(y[:1, :n], row[:, :K] @ _matrix(w, w_type, n, K).T)


def gemm_f32(a, w, c, *, stream=None):
    _put(c, _val(a) @ _val(w).reshape(c.shape[1], -1).T)


def router_gemm(a, w, c, *, split="f16", tile=None, w_scale=256.0, stream=None):
    gemm_f32(a, w, c)


def rowdot_sigmoid(x, w, out, *, stream=None):
    _put(out, dense_ref.sigmoid(_val(x) @ _val(w).reshape(-1)))


def axpy_rows(out, y, s, *, stream=None):
    _put(out, _val(out) + _val(y) * _val(s).reshape(-1, 1))


def scale_by_expert(weights, ids, scale, *, stream=None):
    _put(weights, _val(weights) * _val(scale).reshape(-1)[np.asarray(ids)])


def _topk(logits, T, k, norm, scale, n_valid_dev, ids_out, weights_out, gating):
    """moe_topk: ids and weights into the outputs (padding tokens: ids 0..k-1, weight 0);
    returns (ids, n_valid)."""
    from ggfuse.kernels.moe import ref as moe_ref
    nv = int(np.asarray(n_valid_dev)[0])
    lg = _val(logits).reshape(T, -1) if _val(logits).ndim == 1 else _val(logits)[:T]   # moe_route1: [E]
    probs = dense_ref.softmax(lg, axis=-1) if gating == "softmax" else dense_ref.sigmoid(lg)
    ids = moe_ref.topk(probs, k=k)
    w = moe_ref.take_along(probs, ids)
    if norm:
        w = w / np.maximum(w.sum(-1, keepdims=True), moe_ref.NORM_SUM_MIN)
    if scale not in (0.0, 1.0):
        w = w * np.float32(scale)
    ids[nv:] = np.arange(k)
    w[nv:] = 0
    ids_out[...] = ids
    _put(weights_out, w)
    return ids, nv


def moe_route(logits, T, E, k, norm, scale, tile, n_valid_dev, ids_out, weights_out, sorted_slots_out,
              expert_offsets_out, scratch, stream=None, *, gating="softmax"):
    from ggfuse.kernels.moe import ref as moe_ref
    ids, nv = _topk(logits, T, k, norm, scale, n_valid_dev, ids_out, weights_out, gating)
    slots, offs = moe_ref.route_layout(ids[:nv], n_expert=E, tile=tile)
    sorted_slots_out[...] = -1
    sorted_slots_out[:slots.size] = slots
    expert_offsets_out[...] = offs


def moe_route1(x, w_router, w_shared, D, E, k, norm, scale, n_valid_dev, logits, counter, ids_out, weights_out,
               slot_expert_out, shared_out=None, stream=None, *, gating="softmax", add_norm=None):
    """One token: the router's f32 logits, the shared gate, then moe_route_slot_experts (with
    add_norm: on rms_norm(x + b) * w, whose sum and normed row it writes)."""
    if add_norm is not None:
        b, w, eps, out_sum, out_norm = add_norm
        add_rms_norm(x, b, w, out_norm, out_sum, eps=eps)
        x = out_norm
    xv = _val(x).reshape(-1)[:D].astype(np.float32)
    _put(logits, (_val(w_router).reshape(E, D) @ xv).reshape(logits.shape))
    if w_shared is not None:
        _put(shared_out, dense_ref.sigmoid(np.array([xv @ _val(w_shared).reshape(-1)])).reshape(shared_out.shape))
    moe_route_slot_experts(logits, 1, E, k, norm, scale, n_valid_dev, ids_out, weights_out, slot_expert_out,
                           gating=gating)


def moe_route_slot_experts(logits, T, E, k, norm, scale, n_valid_dev, ids_out, weights_out, slot_expert_out,
                           stream=None, *, gating="softmax"):
    """moe_route's ids and weights; slot_expert_out = ids, -1 for a padding token's slots."""
    ids, nv = _topk(logits, T, k, norm, scale, n_valid_dev, ids_out, weights_out, gating)
    se = ids.reshape(-1).astype(np.int32)
    se[nv * k:] = -1
    slot_expert_out[:T * k] = se


def _experts(w, w_type, E, rows, K):
    return _dequant(w, w_type, E * rows, K).reshape(E, rows, K) if np.asarray(w).dtype == np.uint8 else \
        _matrix(w, w_type, E * rows, K).reshape(E, rows, K)


def moe_gate_up(x, x_dtype, w_gate, w_up, w_type, E, F, D, sorted_slots, expert_offsets, k, h_out, stream=None, *,
                ldx=None, impl=None, schedule=None, wtab=None, max_blocks=None, dequant="fast", act="silu"):
    assert wtab is None, "expert tables are not emulated"
    xs = _val(x)
    if w_up is None:
        gu = _experts(w_gate, w_type, E, 2 * F, D)
        wg, wu = gu[:, :F], gu[:, F:]
    else:
        wg, wu = _experts(w_gate, w_type, E, F, D), _experts(w_up, w_type, E, F, D)
    slots, offs = np.asarray(sorted_slots), np.asarray(expert_offsets)
    h = np.zeros((slots.size, F), np.float32)
    for e in range(E):
        for r in range(offs[e], offs[e + 1]):
            if slots[r] >= 0:
                t = xs[slots[r] // k, :D]
                h[r] = _act(act)(t @ wg[e].T) * (t @ wu[e].T)
    _put(h_out.reshape(-1)[:h.size].reshape(h.shape), h)


def moe_down(h, w_down, w_type, E, D, F, sorted_slots, expert_offsets, weights, k, out, stream=None, *,
             zero_out=True, impl=None, schedule=None, wtab=None, max_blocks=None, dequant="fast"):
    assert wtab is None, "expert tables are not emulated"
    wd = _experts(w_down, w_type, E, D, F)
    hs = _val(h).reshape(-1, F)
    slots, offs = np.asarray(sorted_slots), np.asarray(expert_offsets)
    wts = _val(weights).reshape(-1)
    o = np.zeros(out.shape, np.float32) if zero_out else _val(out)
    for e in range(E):
        for r in range(offs[e], offs[e + 1]):
            s = slots[r]
            if s >= 0:
                o[s // k] += wts[s] * (hs[r] @ wd[e].T)
    _put(out, o)


def _bytes_at(ptr: int, n: int) -> np.ndarray:
    """n bytes of (fake) device memory at address ptr."""
    import ctypes
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(int(ptr))).copy()


def _slot_experts(slots, offs, n_slots):
    e_of = np.full(n_slots, -1, np.int32)
    slots, offs = np.asarray(slots), np.asarray(offs)
    for e in range(len(offs) - 1):
        seg = slots[offs[e]:offs[e + 1]]
        e_of[seg[seg >= 0]] = e
    return e_of


def _gemv_rows(x, wg_ptr, wu_ptr, w_type, F, D, act):
    """act(x Wg^T) * (x Wu^T) of one [F, D] gate and up pair at these (fake device) addresses."""
    from ggfuse.kernels.quant.types import qtype as _qt
    rb = _qt(w_type).row_bytes(D)
    wg = _dequant(_bytes_at(wg_ptr, F * rb), w_type, F, D)
    wu = _dequant(_bytes_at(wu_ptr, F * rb), w_type, F, D)
    return _act(act)(x @ wg.T) * (x @ wu.T)


def moe_gemv_gate_up(x, w_gate, up_ptr, e_bytes, w_type, E, F, D, k, h, *, sorted_slots=None, expert_offsets=None,
                     slot_expert=None, wtab=None, act="silu", shared=None, stream=None):
    assert wtab is None, "expert tables are not emulated"
    xs = _val(x)
    T = xs.shape[0]
    if sorted_slots is not None:
        e_of = _slot_experts(sorted_slots, expert_offsets, T * k)
        slot_expert[:T * k] = e_of
    elif slot_expert is not None:               # given: each slot's expert (moe_route_slot_experts)
        e_of = np.asarray(slot_expert).reshape(-1)[:T * k].copy()
    else:
        e_of = np.zeros(T * k, np.int32)
    base = w_gate.data.ptr
    out = np.zeros((T * k, F), np.float32)
    for j in range(T * k):
        e = int(e_of[j])
        if e >= 0:
            out[j] = _gemv_rows(xs[j // k, :D], base + e * e_bytes, int(up_ptr) + e * e_bytes, w_type, F, D, act)
    _put(h.reshape(-1)[:out.size].reshape(out.shape), out)
    if shared is not None:                      # one more slot per token, the same launch
        hs = np.stack([_gemv_rows(xs[t, :D], shared.gate.data.ptr, shared.up.data.ptr, shared.gate_up_type,
                                  shared.F, D, "silu") for t in range(T)]).astype(np.float32)
        _put(shared.h.reshape(-1)[:hs.size].reshape(hs.shape), hs)


def moe_gemv_down(h, w_down, e_bytes, w_type, D, F, k, weights, out, *, slot_expert=None, accumulate=False, wtab=None,
                  shared=None, stream=None):
    from ggfuse.kernels.quant.types import qtype as _qt
    assert wtab is None, "expert tables are not emulated"
    T = out.size // D
    hs = _val(h).reshape(-1)[:T * k * F].reshape(T * k, F)
    wts = _val(weights).reshape(-1)
    e_of = np.asarray(slot_expert) if slot_expert is not None else np.zeros(T * k, np.int32)
    rb = _qt(w_type).row_bytes(F)
    o = _val(out).reshape(T, D) if accumulate else np.zeros((T, D), np.float32)
    for j in range(T * k):
        e = int(e_of[j])
        if e < 0:
            continue
        wd = _dequant(_bytes_at(w_down.data.ptr + e * e_bytes, D * rb), w_type, D, F)
        o[j // k] += wts[j] * (hs[j] @ wd.T)
    if shared is not None:
        Fs = shared.F
        wsd = _dequant(_bytes_at(shared.down.data.ptr, D * _qt(shared.down_type).row_bytes(Fs)), shared.down_type, D, Fs)
        sh = _val(shared.h).reshape(-1)[:T * Fs].reshape(T, Fs)
        o += _val(shared.scale).reshape(-1)[:T, None] * (sh @ wsd.T)
    _put(out, o)


# ---- DeltaNet ------------------------------------------------------------------------------------

def _nv(n_valid_dev, T: int) -> int:
    return T if n_valid_dev is None else int(np.asarray(n_valid_dev)[0])


def _read(base, off: int, shape, strides) -> np.ndarray:
    """What a kernel given base's address, an element offset and element strides reads, as f32
    (checked to lie inside the allocation base views)."""
    import ctypes
    a = np.asarray(base)
    root = a
    while True:                 # the array owning the memory: up through views, as_strided's too
        b = root.base
        b = b if isinstance(b, np.ndarray) else getattr(b, "base", None)
        if not isinstance(b, np.ndarray):
            break
        root = b
    item, lo = a.itemsize, root.__array_interface__["data"][0]
    start = a.__array_interface__["data"][0] + off * item
    span = (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * item
    assert lo <= start and start + span <= lo + root.nbytes, "a read past the operand's allocation"
    buf = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(start)).view(a.dtype)
    return _val(np.lib.stride_tricks.as_strided(buf, tuple(shape), tuple(s * item for s in strides)).copy())


def _head_map(head_map) -> str:
    return head_map if isinstance(head_map, str) else ("tile", "interleave")[int(head_map)]


def l2_norm(x, out, *, eps, stream=None):
    _put(out, dense_ref.l2_norm(_val(x), eps=eps))


def gated_rms_norm(o, w, z, out, *, eps, stream=None):
    """rms_norm(o) * w * silu(z) per head (z may be [T, Hv*V])."""
    ov = _val(o)
    _put(out, ew_ref.gated_rms_norm(ov, _val(w), _val(z).reshape(ov.shape), eps=eps))


def ssm_conv_silu(x, conv_state, w, out, n_valid=None, *, stream=None):
    """silu(causal conv) of every row; the window then advances by the n_valid valid rows only."""
    xv, st = _val(x), _val(conv_state)
    y, _ = dn_ref.ssm_conv_silu(xv, st, _val(w))
    _put(out, y)
    _put(conv_state, dn_ref.ssm_conv_state(xv, st, n_valid=_nv(n_valid, xv.shape[0])))


def _gates(alpha, beta_lin, dt_bias, ssm_a, n_valid, fn: str):
    """deltanet_gates' g, beta [T, Hv] (rows past n_valid 0), from [T, Hv] or [T, Hk, r] views."""
    from ggfuse.kernels.dense.launch import gate_layout
    T, Hv, *_ = gate_layout(alpha, beta_lin, fn)        # the real launcher's layout checks
    return dn_ref.deltanet_gates(_val(alpha).reshape(T, Hv), _val(beta_lin).reshape(T, Hv), _val(dt_bias).reshape(-1),
                                 _val(ssm_a).reshape(-1), n_valid=_nv(n_valid, T))


def deltanet_gates(alpha, beta_lin, dt_bias, ssm_a, g_out, beta_out, n_valid=None, *, stream=None):
    g, b = _gates(alpha, beta_lin, dt_bias, ssm_a, n_valid, "deltanet_gates")
    _put(g_out, g)
    _put(beta_out, b)


def chunk_gated_delta_rule(q, k, v, q_k_row_stride, q_col_off, k_col_off, v_row_stride, v_col_off, g, beta, state,
                           out, out_dtype, T, Hk, Hv, K, V, scale, head_map, workspace, stream=None, *, v_block=None):
    """The chunked delta rule (ref's chunked form, chunks of 64) on q, k, v read from the base
    arrays at the offsets and row strides given; the final state written into `state`."""
    from ggfuse.kernels.deltanet import launch as dn
    if T <= 0:
        return
    assert out_dtype == ("f32" if out.dtype == np.float32 else "bf16"), (out_dtype, out.dtype)
    assert tuple(state.shape) == (Hv, K, V) and tuple(g.shape) == tuple(beta.shape) == (T, Hv)
    in_dtype = "f32" if np.asarray(q).dtype == np.float32 else "bf16"
    assert workspace.size * workspace.itemsize >= dn.workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=in_dtype)
    qv = _read(q, q_col_off, (T, Hk, K), (q_k_row_stride, K, 1))
    kv = _read(k, k_col_off, (T, Hk, K), (q_k_row_stride, K, 1))
    vv = _read(v, v_col_off, (T, Hv, V), (v_row_stride, V, 1))
    o, s = dn_ref.chunk_gated_delta_rule(qv, kv, vv, _val(g), _val(beta), _val(state), scale=scale,
                                         head_map=_head_map(head_map), chunk=dn.CHUNK)
    _put(out.reshape(-1)[:T * Hv * V], o)
    _put(state, s)


def gated_delta_rule_recurrent(q, k, v, g, beta, state, out, scale, head_map, stream=None, *, kernel="auto"):
    """The token-recurrent delta rule (ref's definition): q and k read with q's row stride, heads
    contiguous; the step kernel (one token) reads row 0 only. State in place."""
    from ggfuse.kernels.deltanet import launch as dn
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    step_ok = T == 1 and dn.step_supported(K, V) and state.data.ptr % 16 == 0
    assert kernel in ("auto", "loop") or (kernel == "step" and step_ok), (kernel, T, K, V)
    rq, rv = q.strides[0] // q.itemsize, v.strides[0] // v.itemsize
    qv, kv = (_read(a, 0, (T, Hk, K), (rq, K, 1)) for a in (q, k))
    vv = _read(v, 0, (T, Hv, V), (rv, V, 1))
    o, s = dn_ref.gated_delta_rule(qv, kv, vv, _val(g).reshape(T, Hv), _val(beta).reshape(T, Hv), _val(state),
                                   scale=scale, head_map=_head_map(head_map))
    _put(out.reshape(-1)[:T * Hv * V], o)
    _put(state, s)


def gdr_step_fused(q, k, v, state, out, scale, head_map, *, eps_q, eps_k, alpha, beta_lin, dt_bias, ssm_a, n_valid,
                   stream=None):
    """One token: l2_norm(q), l2_norm(k) (eps_q, eps_k), deltanet_gates(alpha, beta_lin, dt_bias,
    ssm_a, n_valid), then the recurrent step; q, k, v row 0, heads contiguous."""
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    assert T == 1 and state.data.ptr % 16 == 0
    qv, kv = (_read(a, 0, (1, Hk, K), (0, K, 1)) for a in (q, k))
    vv = _read(v, 0, (1, Hv, V), (0, V, 1))
    g, b = _gates(alpha, beta_lin, dt_bias, ssm_a, n_valid, "gdr_step_fused")
    o, s = dn_ref.gated_delta_rule(dense_ref.l2_norm(qv, eps=eps_q), dense_ref.l2_norm(kv, eps=eps_k), vv, g, b,
                                   _val(state), scale=scale, head_map=_head_map(head_map))
    _put(out.reshape(-1)[:Hv * V], o)
    _put(state, s)


def _noop(*a, **k):
    return None


EMULATED = {
    "ggfuse.kernels.dense.launch": ["dequantize", "get_rows", "ple_gather", "rms_norm", "add_rms_norm", "norm_rope",
                                    "norm_add", "add", "mul", "sigmoid_mul", "silu_mul", "gelu", "gelu_mul", "softcap",
                                    "scale", "copy", "kv_append", "kv_ring_append", "gemv", "gemv_group", "gemm_f32", "router_gemm",
                                    "rowdot_sigmoid", "axpy_rows", "scale_by_expert", "l2_norm", "gated_rms_norm",
                                    "ssm_conv_silu", "deltanet_gates"],
    "ggfuse.kernels.deltanet.launch": ["chunk_gated_delta_rule", "gated_delta_rule_recurrent", "gdr_step_fused"],
    "ggfuse.kernels.gemm.launch": ["gemm", "gemm_swiglu"],
    "ggfuse.kernels.gemm.blas": ["gemm_bf16"],
    "ggfuse.kernels.moe.launch": ["moe_route", "moe_route1", "moe_route_slot_experts", "moe_gate_up", "moe_down", "moe_gemv_gate_up", "moe_gemv_down"],
    "ggfuse.kernels.attention.launch": ["flash_attn_prefill", "window_attn", "decode_attn"],
}


@contextlib.contextmanager
def emulated_device(monkeypatch):
    """fake_cupy's device with the launchers above computing for real and CUDA graphs that
    replay what was captured. Yields the set of launcher names that ran (module.function)."""
    import importlib
    import sys

    from fake_cupy import Stream, fake_device
    used: set = set()
    capturing: dict = {}
    with fake_device(monkeypatch):
        cp = sys.modules["cupy"]
        cp.asnumpy = lambda a, stream=None: np.array(a)
        for modname, names in EMULATED.items():
            mod = importlib.import_module(modname)
            for name in names:
                impl = globals()[name]
                tag = f"{modname.split('.')[-2]}.{name}"

                def run(*a, __impl=impl, __tag=tag, **k):
                    used.add(__tag)
                    rec = capturing.get("launches")
                    if rec is not None:
                        rec.append(lambda: __impl(*a, **k))
                    else:
                        __impl(*a, **k)
                monkeypatch.setattr(mod, name, run)

        def begin(self):
            capturing["launches"] = []

        def end(self):
            rec = capturing.pop("launches")

            def launch(stream=None):
                for fn in rec:
                    fn()
            import types
            return types.SimpleNamespace(launch=launch)
        monkeypatch.setattr(Stream, "begin_capture", begin)
        monkeypatch.setattr(Stream, "end_capture", end)
        # a programmatic-launch capture (kernels/graph.py) ends through the runtime: the same graph
        from ggfuse.kernels import graph as kgraph
        monkeypatch.setattr(cp.cuda.runtime, "streamEndCapture", lambda ptr: end(None))
        monkeypatch.setattr(kgraph, "_programmatic_graph", lambda g: g)
        # copies issued while capturing (a streamed layer's expert fetch joined to the graph)
        # are part of the graph: they run when it is launched
        copy = cp.cuda.runtime.memcpyAsync

        def memcpy(*a):
            rec = capturing.get("launches")
            if rec is not None:
                rec.append(lambda: copy(*a))
            else:
                copy(*a)
        monkeypatch.setattr(cp.cuda.runtime, "memcpyAsync", memcpy)
        yield used
