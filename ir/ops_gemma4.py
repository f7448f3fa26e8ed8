"""Plain ops the Gemma 4 frontend brought in (any architecture may use them): GELU, the logit
soft-cap, the per-layer-embedding gather, and sliding-window attention over a ring cache.

Sliding-window KV state (see kernels/attention/ref.py): a sliding layer carries a ring of
R >= window - 1 rows per K and V instead of a cache that grows with the prompt. For a chunk at
positions P..P+T-1 (P is the shape symbol, the tokens before the chunk):

    o     = ATTENTION_WINDOW(q, k, v, k_ring, v_ring)     the chunk's own k, v plus the ring
    ring' = KV_RING_APPEND(ring, k [, after])             rows (P + t) % R <- k[t], the last R rows

The attention reads the ring as it was before the chunk, so a runtime that updates the ring in
place must write it only after every reader: `after` is a value the append does not read, an
edge that orders it behind the last reader (ir/verify.py checks that every reader of a state
comes before the node that writes it). Layers that share another layer's KV (Gemma's
KV-shared layers) feed the same k, v, k_ring, v_ring values to their own ATTENTION_WINDOW.
"""
from __future__ import annotations

from ggfuse.ir.ops import Op, _f32, _numel, _req, register
from ggfuse.ir.types import DType, dim_eq, dim_eval
from ggfuse.kernels.attention import ref as attn_ref
from ggfuse.kernels.dense import ref as dense_ref


def _infer_same(a, ins):
    return (_f32(ins[0].shape),)


def _flops_elementwise(a, ins, outs, env):
    return _numel(outs[0], env)


register(Op.GELU, 1, _infer_same, lambda a, env, x: (dense_ref.gelu(x),), _flops_elementwise)


def _infer_softcap(a, ins):
    _req(isinstance(a.cap, (int, float)) and a.cap > 0, f"softcap cap must be > 0, got {a.cap!r}")
    return (_f32(ins[0].shape),)


register(Op.SOFTCAP, 1, _infer_softcap, lambda a, env, x: (dense_ref.softcap(x, cap=a.cap),),
         lambda a, ins, outs, env: 3 * _numel(outs[0], env))


def _infer_ple_gather(a, ins):
    w, ids = ins
    _req(w.rank == 2 and ids.rank == 1 and ids.dtype == DType.I32, "ple_gather wants table[V, L*P], ids[T] i32")
    _req(isinstance(a.n_layer, int) and isinstance(a.width, int) and w.shape[1] == a.n_layer * a.width,
         f"ple_gather table rows of {w.shape[1]} are not n_layer {a.n_layer} x width {a.width}")
    return (_f32((ids.shape[0], a.n_layer, a.width)),)


register(Op.PLE_GATHER, 2, _infer_ple_gather,
         lambda a, env, w, ids: (dense_ref.ple_gather(w, ids, n_layer=a.n_layer, width=a.width, scale=a.scale),),
         lambda a, ins, outs, env: _numel(outs[0], env))


def _infer_attention_window(a, ins):
    q, k, v, kr, vr = ins
    _req(all(t.rank == 3 for t in ins),
         "attention_window wants q[Tq, Hq, D], k[T, Hkv, D], v[T, Hkv, Dv], k_ring[R, Hkv, D], v_ring[R, Hkv, Dv]")
    _req(dim_eq(q.shape[2], k.shape[2]) and dim_eq(k.shape[0], v.shape[0]) and dim_eq(k.shape[1], v.shape[1]),
         f"attention_window shapes disagree: q{list(q.shape)} k{list(k.shape)} v{list(v.shape)}")
    _req(tuple(kr.shape[1:]) == tuple(k.shape[1:]) and tuple(vr.shape[1:]) == tuple(v.shape[1:])
         and kr.shape[0] == vr.shape[0],
         f"attention_window rings k{list(kr.shape)} v{list(vr.shape)} do not hold rows of k{list(k.shape)} v{list(v.shape)}")
    _req(isinstance(a.window, int) and a.window >= 1, f"attention_window window must be an int >= 1, got {a.window!r}")
    R = kr.shape[0]
    _req(isinstance(R, int) and R >= max(1, a.window - 1),
         f"attention_window ring of {R} rows cannot hold the {a.window - 1} keys before a chunk")
    _req(isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1] == 0,
         "query heads must be a multiple of KV heads")
    return (_f32((q.shape[0], q.shape[1], v.shape[2])),)


def _flops_attention_window(a, ins, outs, env):
    q, k, v = ins[:3]
    Tq, T = dim_eval(q.shape[0], env), dim_eval(k.shape[0], env)
    pairs = attn_ref.window_pairs(Tq, T, int(env.get("P", 0)), a.window)
    return 2 * q.shape[1] * pairs * (dim_eval(q.shape[2], env) + dim_eval(v.shape[2], env))


register(Op.ATTENTION_WINDOW, 5, _infer_attention_window,
         lambda a, env, q, k, v, kr, vr: (attn_ref.attention_window(q, k, v, kr, vr, P=int(env["P"]), window=a.window,
                                                                    scale=a.scale),),
         _flops_attention_window)


def _infer_kv_ring_append(a, ins):
    ring, x = ins[:2]
    _req(ring.rank == x.rank == 3 and tuple(ring.shape[1:]) == tuple(x.shape[1:]) and isinstance(ring.shape[0], int),
         f"kv_ring_append wants ring[R, H, D] and x[T, H, D], got ring{list(ring.shape)} x{list(x.shape)}")
    return (_f32(ring.shape),)


register(Op.KV_RING_APPEND, (2, 3), _infer_kv_ring_append,
         lambda a, env, ring, x, after=None: (attn_ref.kv_ring_append(ring, x, P=int(env["P"])),),
         lambda a, ins, outs, env: 0)
