"""The op set: one enum, and per op its arity, shape inference, numpy reference and cost.

Each op's meaning is written once, in kernels/<group>/ref.py; this file binds it to the IR.
`infer(attrs, ins) -> outs` takes and returns TensorTypes; `ref(attrs, env, *arrays)` returns a
tuple of arrays; `flops(attrs, ins, outs, env)` counts multiply-adds as 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from ggfuse.ir.types import DType, TensorType, dim_add, dim_eq, dim_eval, dim_mul, shape_eval
from ggfuse.kernels.attention import ref as attn_ref
from ggfuse.kernels.deltanet import ref as dn_ref
from ggfuse.kernels.dense import ref as dense_ref
from ggfuse.kernels.moe import ref as moe_ref


class Op(str, Enum):
    # memory and graph plumbing
    INPUT = "input"            # tokens, positions, carried state
    WEIGHT = "weight"          # a GGUF tensor, by name
    RESHAPE = "reshape"
    SLICE = "slice"
    CONCAT = "concat"
    KV_APPEND = "kv_append"    # the chunk's K or V rows appended to a KV cache (a state input) at P
    # dense math
    GET_ROWS = "get_rows"
    MATMUL = "matmul"
    LM_HEAD = "lm_head"        # the logits matmul: the runtime computes all rows, the last one or none
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    SCALE = "scale"
    RMS_NORM = "rms_norm"
    L2_NORM = "l2_norm"
    SILU = "silu"
    SIGMOID = "sigmoid"
    SOFTPLUS = "softplus"
    EXP = "exp"
    SOFTMAX = "softmax"
    SUM = "sum"
    GELU = "gelu"              # tanh approximation
    SOFTCAP = "softcap"        # cap * tanh(x / cap)
    PLE_GATHER = "ple_gather"  # per-layer embedding rows of the tokens (Gemma 4)
    # attention
    ROPE = "rope"
    ATTENTION = "attention"
    ATTENTION_WINDOW = "attention_window"  # sliding window over a ring of earlier keys + the chunk
    KV_RING_APPEND = "kv_ring_append"      # write a chunk's keys/values into a sliding ring
    # recurrent (Gated DeltaNet)
    SSM_CONV = "ssm_conv"
    GATED_DELTA_RULE = "gated_delta_rule"
    # mixture of experts
    TOPK = "topk"
    TAKE_ALONG = "take_along"
    MUL_MAT_ID = "mul_mat_id"

    # ---- produced by the passes (registered in ir/ops_fused_*.py) ----
    # recurrent: chunked (WY/UT) gated delta rule, conv with fused activation
    CHUNK_GATED_DELTA_RULE = "chunk_gated_delta_rule"
    SSM_CONV_SILU = "ssm_conv_silu"
    DELTANET_GATES = "deltanet_gates"      # g = softplus(alpha + dt_bias) * ssm_a, beta = sigmoid(b)
    # MoE: routing + counting sort, grouped GEMM over expert-sorted tokens
    MOE_ROUTE = "moe_route"
    MOE_GROUPED_GEMM = "moe_grouped_gemm"
    # elementwise fusions
    ADD_RMS_NORM = "add_rms_norm"          # residual add + RMSNorm: (normed, sum)
    NORM_ROPE = "norm_rope"                # q/k RMSNorm + partial RoPE
    SIGMOID_MUL = "sigmoid_mul"            # attention output gate: x * sigmoid(g)
    GATED_RMS_NORM = "gated_rms_norm"      # DeltaNet output: rms_norm(o, w) * silu(z)
    FFN_SWIGLU = "ffn_swiglu"              # dense FFN gate+up+SwiGLU: silu(x Wg) * (x Wu)
    FFN_GEGLU = "ffn_geglu"                # dense FFN gate+up+GELU-tanh GLU: gelu(x Wg) * (x Wu)
    GELU_MUL = "gelu_mul"                  # gelu(x) * y (Gemma's per-layer-embedding gate)
    NORM_ADD = "norm_add"                  # post-norm residual: (rms_norm(x) w + r) [* s]
    NORM_ADD_NORM = "norm_add_norm"        # norm_add + the next RMSNorm: (normed, sum)
    # transfers (expert streaming under a VRAM budget)
    FETCH_WEIGHTS = "fetch_weights"        # host -> device copy on the copy stream


class InferError(ValueError):
    pass


@dataclass(frozen=True)
class OpDef:
    op: Op
    arity: tuple[int, int]                     # (min, max) inputs
    infer: Callable
    ref: Callable | None                       # None: handled by the interpreter (INPUT, WEIGHT)
    flops: Callable | None = None
    n_outputs: int = 1


OPS: dict[Op, OpDef] = {}


def register(op: Op, arity, infer, ref, flops=None, n_outputs=1):
    if isinstance(arity, int):
        arity = (arity, arity)
    OPS[op] = OpDef(op, arity, infer, ref, flops, n_outputs)


def _req(cond, msg):
    if not cond:
        raise InferError(msg)


def _f32(shape):
    return TensorType(tuple(shape), DType.F32)


def _numel(t: TensorType, env) -> int:
    return t.numel(env)


# ---- plumbing --------------------------------------------------------------------------------

def _infer_input(a, ins):
    return (TensorType(tuple(a.shape), DType(a.dtype)),)


def _infer_weight(a, ins):
    return (TensorType(tuple(a.shape), DType(a.dtype)),)


register(Op.INPUT, 0, _infer_input, None)
register(Op.WEIGHT, 0, _infer_weight, None)


def _known_numel(shape):
    n = 1
    syms = []
    for d in shape:
        if isinstance(d, int):
            n *= d
        else:
            syms.append(d)
    return n, sorted(str(s) for s in syms)


def _infer_reshape(a, ins):
    (x,) = ins
    new = tuple(a.shape)
    # Symbolic dims must match as a multiset and the constant parts must agree.
    _req(_known_numel(x.shape) == _known_numel(new),
         f"reshape {list(x.shape)} -> {list(new)} changes the element count")
    return (TensorType(new, x.dtype),)


register(Op.RESHAPE, 1, _infer_reshape,
         lambda a, env, x: (x.reshape(shape_eval(a.shape, env)),))


def _infer_slice(a, ins):
    (x,) = ins
    ax = a.axis % x.rank
    d = x.shape[ax]
    _req(isinstance(a.start, int) and isinstance(a.stop, int) and 0 <= a.start < a.stop,
         f"slice bounds {a.start}:{a.stop} must be constant and increasing")
    _req(not isinstance(d, int) or a.stop <= d, f"slice {a.start}:{a.stop} past dim {d}")
    shape = list(x.shape)
    shape[ax] = a.stop - a.start
    return (TensorType(tuple(shape), x.dtype),)


def _ref_slice(a, env, x):
    idx = [slice(None)] * x.ndim
    idx[a.axis % x.ndim] = slice(a.start, a.stop)
    return (x[tuple(idx)],)


register(Op.SLICE, 1, _infer_slice, _ref_slice)


def _infer_concat(a, ins):
    _req(len(ins) >= 2, "concat needs two or more inputs")
    r = ins[0].rank
    ax = a.axis % r
    total = ins[0].shape[ax]
    for t in ins[1:]:
        _req(t.rank == r, "concat of different ranks")
        for i in range(r):
            if i != ax:
                _req(dim_eq(t.shape[i], ins[0].shape[i]), f"concat dim {i} differs")
        total = dim_add(total, t.shape[ax])
    shape = list(ins[0].shape)
    shape[ax] = total
    return (TensorType(tuple(shape), ins[0].dtype),)


register(Op.CONCAT, (2, 64), _infer_concat,
         lambda a, env, *xs: (np.concatenate(xs, axis=a.axis),))


# the kinds of carried state an INPUT of kind "state" holds (attrs.state)
STATE_KINDS = ("kv_cache", "conv_window", "recurrent_state",
               "kv_ring")   # a sliding-window layer's last keys or values (ir/ops_gemma4.py)


def _infer_kv_append(a, ins):
    cache, new = ins
    _req(cache.rank == new.rank == 3, f"kv_append wants cache[P, H, D], new[T, H, D], got {cache} and {new}")
    _req(dim_eq(cache.shape[1], new.shape[1]) and dim_eq(cache.shape[2], new.shape[2]),
         f"kv_append: cache {list(cache.shape)} and rows {list(new.shape)} differ in heads or head dim")
    return (TensorType((dim_add(cache.shape[0], new.shape[0]),) + tuple(cache.shape[1:]), cache.dtype),)


register(Op.KV_APPEND, 2, _infer_kv_append,
         lambda a, env, cache, new: (np.concatenate([cache, new], axis=0),), lambda a, ins, outs, env: 0)


# ---- dense math ------------------------------------------------------------------------------

def _infer_get_rows(a, ins):
    w, ids = ins
    _req(w.rank == 2 and ids.rank == 1 and ids.dtype == DType.I32, "get_rows wants w[R, C], ids[T] i32")
    return (_f32((ids.shape[0], w.shape[1])),)


register(Op.GET_ROWS, 2, _infer_get_rows, lambda a, env, w, ids: (dense_ref.get_rows(w, ids),),
         lambda a, ins, outs, env: 0)


def _infer_matmul(a, ins):
    x, w = ins
    _req(w.rank == 2, f"matmul weight must be 2-D, got {w}")
    _req(dim_eq(x.shape[-1], w.shape[1]), f"matmul inner dims differ: x{list(x.shape)} w{list(w.shape)}")
    return (_f32(x.shape[:-1] + (w.shape[0],)),)


def _flops_matmul(a, ins, outs, env):
    return 2 * _numel(outs[0], env) * dim_eval(ins[1].shape[1], env)


register(Op.MATMUL, 2, _infer_matmul, lambda a, env, x, w: (dense_ref.matmul(x, w),), _flops_matmul)
def _lm_head_ref(a, env, x, w):
    y = dense_ref.matmul(x, w)
    # softcap: the logits' soft-cap folded into the head (passes/lower_cuda.py fold_softcap)
    return (dense_ref.softcap(y, cap=a.softcap) if a.get("softcap") else y,)


register(Op.LM_HEAD, 2, _infer_matmul, _lm_head_ref, _flops_matmul)


def _broadcast(sa, sb):
    ra, rb = len(sa), len(sb)
    r = max(ra, rb)
    sa = (1,) * (r - ra) + tuple(sa)
    sb = (1,) * (r - rb) + tuple(sb)
    out = []
    for da, db in zip(sa, sb):
        if da == 1:
            out.append(db)
        elif db == 1 or dim_eq(da, db):
            out.append(da)
        else:
            raise InferError(f"cannot broadcast {list(sa)} with {list(sb)}")
    return tuple(out)


def _infer_binary(a, ins):
    x, y = ins
    return (_f32(_broadcast(x.shape, y.shape)),)


def _flops_elementwise(a, ins, outs, env):
    return _numel(outs[0], env)


for _op, _fn in ((Op.ADD, dense_ref.add), (Op.SUB, dense_ref.sub), (Op.MUL, dense_ref.mul),
                 (Op.DIV, dense_ref.div)):
    register(_op, 2, _infer_binary, (lambda fn: lambda a, env, x, y: (fn(x, y),))(_fn), _flops_elementwise)


def _infer_same(a, ins):
    return (_f32(ins[0].shape),)


for _op, _fn in ((Op.SILU, dense_ref.silu), (Op.SIGMOID, dense_ref.sigmoid),
                 (Op.SOFTPLUS, dense_ref.softplus), (Op.EXP, dense_ref.exp)):
    register(_op, 1, _infer_same, (lambda fn: lambda a, env, x: (fn(x),))(_fn), _flops_elementwise)

register(Op.SCALE, 1, _infer_same, lambda a, env, x: (dense_ref.scale(x, factor=a.factor),),
         _flops_elementwise)
register(Op.SOFTMAX, 1, _infer_same, lambda a, env, x: (dense_ref.softmax(x, axis=a.axis),),
         lambda a, ins, outs, env: 4 * _numel(outs[0], env))


def _infer_rms_norm(a, ins):
    x = ins[0]
    if len(ins) == 2:
        _req(ins[1].rank == 1 and dim_eq(ins[1].shape[0], x.shape[-1]),
             f"rms_norm weight {list(ins[1].shape)} does not match x{list(x.shape)}")
    return (_f32(x.shape),)


register(Op.RMS_NORM, (1, 2), _infer_rms_norm,
         lambda a, env, x, w=None: (dense_ref.rms_norm(x, w, eps=a.eps),),
         lambda a, ins, outs, env: 4 * _numel(outs[0], env))
register(Op.L2_NORM, 1, _infer_same, lambda a, env, x: (dense_ref.l2_norm(x, eps=a.eps),),
         lambda a, ins, outs, env: 3 * _numel(outs[0], env))


def _infer_sum(a, ins):
    (x,) = ins
    ax = a.axis % x.rank
    shape = list(x.shape)
    if a.keepdims:
        shape[ax] = 1
    else:
        del shape[ax]
    return (_f32(tuple(shape)),)


register(Op.SUM, 1, _infer_sum,
         lambda a, env, x: (dense_ref.sum_axis(x, axis=a.axis, keepdims=a.keepdims),),
         lambda a, ins, outs, env: _numel(ins[0], env))


# ---- attention -------------------------------------------------------------------------------

def _infer_rope(a, ins):
    x, pos = ins[:2]
    _req(x.rank == 3 and pos.rank == 1 and dim_eq(x.shape[0], pos.shape[0]), "rope wants x[T, H, D], pos[T]")
    _req(a.n_dims <= x.shape[2] and a.n_dims % 2 == 0, f"rope n_dims {a.n_dims} vs head dim {x.shape[2]}")
    if len(ins) == 3:  # freq factors (llama.cpp rope_freqs), one per rotated pair
        _req(ins[2].rank == 1 and ins[2].shape[0] == a.n_dims // 2,
             f"rope freq factors {list(ins[2].shape)} must be [{a.n_dims // 2}]")
    return (_f32(x.shape),)


register(Op.ROPE, (2, 3), _infer_rope,
         lambda a, env, x, pos, ff=None: (attn_ref.rope(x, pos, n_dims=a.n_dims, freq_base=a.freq_base, mode=a.mode,
                                                        freq_scale=a.freq_scale, sections=a.sections,
                                                        freq_factors=ff),),
         lambda a, ins, outs, env: 3 * _numel(outs[0], env))


def _infer_attention(a, ins):
    q, k, v = ins
    _req(q.rank == k.rank == v.rank == 3, "attention wants q[T, Hq, D], k[S, Hkv, D], v[S, Hkv, Dv]")
    _req(dim_eq(q.shape[2], k.shape[2]) and dim_eq(k.shape[0], v.shape[0]) and dim_eq(k.shape[1], v.shape[1]),
         f"attention shapes disagree: q{list(q.shape)} k{list(k.shape)} v{list(v.shape)}")
    _req(q.shape[1] % k.shape[1] == 0, "query heads must be a multiple of KV heads")
    return (_f32((q.shape[0], q.shape[1], v.shape[2])),)


def _flops_attention(a, ins, outs, env):
    q, k, v = ins
    T, Hq, D = shape_eval(q.shape, env)
    S = dim_eval(k.shape[0], env)
    Dv = dim_eval(v.shape[2], env)
    P = S - T
    pairs = T * P + T * (T + 1) // 2  # causal: only the visible (query, key) pairs
    return 2 * Hq * pairs * (D + Dv)


register(Op.ATTENTION, 3, _infer_attention,
         lambda a, env, q, k, v: (attn_ref.attention(q, k, v, scale=a.scale),), _flops_attention)


# ---- recurrent -------------------------------------------------------------------------------

def _infer_ssm_conv(a, ins):
    x, state, w = ins
    _req(x.rank == 2 and state.rank == 2 and w.rank == 2, "ssm_conv wants x[T, C], state[Kc-1, C], w[C, Kc]")
    _req(dim_eq(x.shape[1], w.shape[0]) and dim_eq(state.shape[1], x.shape[1]) and state.shape[0] == w.shape[1] - 1,
         f"ssm_conv shapes disagree: x{list(x.shape)} state{list(state.shape)} w{list(w.shape)}")
    return (_f32(x.shape), _f32(state.shape))


register(Op.SSM_CONV, 3, _infer_ssm_conv, lambda a, env, x, s, w: dn_ref.ssm_conv(x, s, dense_ref.dense(w)),
         lambda a, ins, outs, env: 2 * _numel(outs[0], env) * ins[2].shape[1], n_outputs=2)


def _infer_gdr(a, ins):
    q, k, v, g, beta, state = ins
    _req(q.rank == k.rank == v.rank == 3, "gated_delta_rule wants q, k [T, Hk, K], v [T, Hv, V]")
    T, Hk, K = q.shape
    _, Hv, V = v.shape
    _req(tuple(k.shape) == tuple(q.shape), "q and k shapes differ")
    _req(isinstance(Hv, int) and isinstance(Hk, int) and Hv % Hk == 0, "Hv must be a multiple of Hk")
    _req(a.head_map in ("tile", "interleave"), f"head_map {a.head_map!r} must be tile or interleave")
    _req(tuple(g.shape) == (T, Hv) and tuple(beta.shape) == (T, Hv), f"g/beta must be [T, {Hv}]")
    _req(tuple(state.shape) == (Hv, K, V), f"state must be [{Hv}, {K}, {V}], got {list(state.shape)}")
    return (_f32((T, Hv, V)), _f32((Hv, K, V)))


def _flops_gdr(a, ins, outs, env):
    T = dim_eval(ins[0].shape[0], env)
    Hv, K, V = ins[5].shape
    return T * Hv * K * V * 8  # decay, S^T k, rank-1 update, S^T q


register(Op.GATED_DELTA_RULE, 6, _infer_gdr,
         lambda a, env, q, k, v, g, b, s: dn_ref.gated_delta_rule(q, k, v, g, b, s, scale=a.scale, head_map=a.head_map),
         _flops_gdr, n_outputs=2)


# ---- mixture of experts ----------------------------------------------------------------------

def _infer_topk(a, ins):
    (x,) = ins
    _req(x.rank == 2 and a.k <= x.shape[1], f"topk {a.k} of {list(x.shape)}")
    return (TensorType((x.shape[0], a.k), DType.I32),)


register(Op.TOPK, 1, _infer_topk, lambda a, env, x: (moe_ref.topk(x, k=a.k),))


def _infer_take_along(a, ins):
    x, ids = ins
    _req(ids.dtype == DType.I32 and x.rank == ids.rank == 2, "take_along wants x[T, E], ids[T, k] i32")
    return (_f32(ids.shape),)


register(Op.TAKE_ALONG, 2, _infer_take_along, lambda a, env, x, ids: (moe_ref.take_along(x, ids),))


def _infer_mul_mat_id(a, ins):
    w, x, ids = ins
    _req(w.rank == 3 and ids.rank == 2 and ids.dtype == DType.I32, "mul_mat_id wants w[E, N, K], ids[T, k]")
    _req(dim_eq(x.shape[-1], w.shape[2]), f"mul_mat_id inner dims differ: x{list(x.shape)} w{list(w.shape)}")
    if x.rank == 3:
        _req(dim_eq(x.shape[1], ids.shape[1]), "x slots differ from ids slots")
    return (_f32((ids.shape[0], ids.shape[1], w.shape[1])),)


def _flops_mul_mat_id(a, ins, outs, env):
    return 2 * _numel(outs[0], env) * dim_eval(ins[0].shape[2], env)


register(Op.MUL_MAT_ID, 3, _infer_mul_mat_id,
         lambda a, env, w, x, ids: (moe_ref.mul_mat_id(w, x, ids),), _flops_mul_mat_id)


def _register_fused():
    # Ops produced by the passes live beside the pass that makes them, the plain ops only Gemma 4
    # emits so far in ops_gemma4; importing registers them.
    import importlib
    for mod in ("ops_gemma4", "ops_fused_deltanet", "ops_fused_moe", "ops_fused_elementwise", "ops_fused_transfer"):
        try:
            importlib.import_module(f"ggfuse.ir.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"ggfuse.ir.{mod}":
                raise


def infer(op: Op, attrs, ins) -> tuple[TensorType, ...]:
    d = OPS.get(op)
    if d is None:
        raise InferError(f"op {op.value} has no registered rule")
    lo, hi = d.arity
    if not lo <= len(ins) <= hi:
        raise InferError(f"{op.value} takes {lo}..{hi} inputs, got {len(ins)}")
    return tuple(d.infer(attrs, tuple(ins)))


__all__ = ["Op", "OpDef", "OPS", "register", "infer", "InferError", "dim_mul", "STATE_KINDS"]

_register_fused()
