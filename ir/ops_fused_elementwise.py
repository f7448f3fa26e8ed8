"""Ops made by passes/fuse_elementwise.py. Each fuses plain ops that would otherwise write a
value to memory only for the next kernel to read it back; shape inference composes the plain
ops' rules, plus the few equalities a one-pass kernel relies on (no broadcasting of the big
operand)."""
from __future__ import annotations

from ggfuse.ir.ops import Op, _numel, _req, infer, register
from ggfuse.ir.types import DType, TensorType, dim_eq, dim_eval
from ggfuse.kernels.elementwise import ref as ew_ref


def _same_shape(a, b) -> bool:
    return a.rank == b.rank and all(dim_eq(x, y) for x, y in zip(a.shape, b.shape))


def _infer_add_rms_norm(a, ins):
    x, y, w = ins
    _req(_same_shape(x, y), f"add_rms_norm operands differ: {x} vs {y}")
    (s,) = infer(Op.ADD, a, (x, y))
    return infer(Op.RMS_NORM, a, (s, w)) + (s,)


register(Op.ADD_RMS_NORM, 3, _infer_add_rms_norm,
         lambda a, env, x, y, w: ew_ref.add_rms_norm(x, y, w, eps=a.eps),
         lambda a, ins, outs, env: 5 * _numel(outs[0], env),  # add 1 + rms_norm 4
         n_outputs=2)


def _infer_norm_rope(a, ins):
    x, w, pos = ins[:3]
    return infer(Op.ROPE, a, (infer(Op.RMS_NORM, a, (x, w))[0], pos) + tuple(ins[3:]))


register(Op.NORM_ROPE, (3, 4), _infer_norm_rope,
         lambda a, env, x, w, pos, ff=None: (ew_ref.norm_rope(x, w, pos, eps=a.eps, n_dims=a.n_dims,
                                                              freq_base=a.freq_base, mode=a.mode,
                                                              freq_scale=a.freq_scale, sections=a.sections,
                                                              freq_factors=ff),),
         lambda a, ins, outs, env: 7 * _numel(outs[0], env))  # rms_norm 4 + rope 3


def _infer_sigmoid_mul(a, ins):
    x, g = ins
    (y,) = infer(Op.MUL, a, (x, infer(Op.SIGMOID, a, (g,))[0]))
    _req(_same_shape(y, x), f"sigmoid_mul gate {g} must broadcast into x {x}")
    return (y,)


register(Op.SIGMOID_MUL, 2, _infer_sigmoid_mul,
         lambda a, env, x, g: (ew_ref.sigmoid_mul(x, g),),
         lambda a, ins, outs, env: _numel(outs[0], env) + _numel(ins[1], env))


def _infer_gated_rms_norm(a, ins):
    o, w, z = ins
    _req(_same_shape(o, z), f"gated_rms_norm gate z {z} must have o's shape {o}")
    return infer(Op.MUL, a, (infer(Op.RMS_NORM, a, (o, w))[0], infer(Op.SILU, a, (z,))[0]))


register(Op.GATED_RMS_NORM, 3, _infer_gated_rms_norm,
         lambda a, env, o, w, z: (ew_ref.gated_rms_norm(o, w, z, eps=a.eps),),
         lambda a, ins, outs, env: 6 * _numel(outs[0], env))  # rms_norm 4 + silu 1 + mul 1


def _infer_ffn_glu(a, ins):
    x, wg, wu = ins
    _req(_same_shape(wg, wu), f"gated FFN gate weight {wg} and up weight {wu} differ")
    (h,) = infer(Op.MATMUL, a, (x, wg))
    return infer(Op.MUL, a, (infer(Op.SILU, a, (h,))[0], h))


def _flops_ffn_swiglu(a, ins, outs, env):
    return 2 * 2 * _numel(outs[0], env) * dim_eval(ins[1].shape[1], env) + 2 * _numel(outs[0], env)


register(Op.FFN_SWIGLU, 3, _infer_ffn_glu,
         lambda a, env, x, wg, wu: (ew_ref.ffn_swiglu(x, wg, wu),), _flops_ffn_swiglu)
register(Op.FFN_GEGLU, 3, _infer_ffn_glu,
         lambda a, env, x, wg, wu: (ew_ref.ffn_geglu(x, wg, wu),), _flops_ffn_swiglu)


def _infer_gelu_mul(a, ins):
    x, y = ins
    _req(_same_shape(x, y), f"gelu_mul operands differ: {x} vs {y}")
    return (TensorType(x.shape, DType.F32),)


register(Op.GELU_MUL, 2, _infer_gelu_mul, lambda a, env, x, y: (ew_ref.gelu_mul(x, y),),
         lambda a, ins, outs, env: 2 * _numel(outs[0], env))


def _infer_norm_add(a, ins):
    x, w, r = ins[:3]
    _req(_same_shape(x, r), f"norm_add operands differ: {x} vs {r}")
    (y,) = infer(Op.RMS_NORM, a, (x, w))
    if len(ins) == 4:
        _req(tuple(ins[3].shape) == (1,), f"norm_add scale must be [1], got {ins[3]}")
    return (y,)


register(Op.NORM_ADD, (3, 4), _infer_norm_add,
         lambda a, env, x, w, r, s=None: (ew_ref.norm_add(x, w, r, s, eps=a.eps),),
         lambda a, ins, outs, env: 6 * _numel(outs[0], env))  # rms_norm 4 + add 1 + scale 1


def _infer_norm_add_norm(a, ins):
    x, w, r, w_next = ins[:4]
    (total,) = _infer_norm_add(a, (x, w, r) + tuple(ins[4:]))
    return infer(Op.RMS_NORM, a, (total, w_next)) + (total,)


register(Op.NORM_ADD_NORM, (4, 5), _infer_norm_add_norm,
         lambda a, env, x, w, r, w_next, s=None: ew_ref.norm_add_norm(x, w, r, w_next, s, eps=a.eps,
                                                                      eps_next=a.eps_next),
         lambda a, ins, outs, env: 10 * _numel(outs[0], env), n_outputs=2)
