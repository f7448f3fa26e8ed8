"""Ops made by passes/fuse_elementwise.py. Each fuses plain ops that would otherwise write a
value to memory only for the next kernel to read it back; shape inference composes the plain
ops' rules, plus the few equalities a one-pass kernel relies on (no broadcasting of the big
operand)."""
from __future__ import annotations

from ggfuse.ir.ops import Op, _numel, _req, infer, register
from ggfuse.ir.types import dim_eq, dim_eval
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
    x, w, pos = ins
    return infer(Op.ROPE, a, (infer(Op.RMS_NORM, a, (x, w))[0], pos))


register(Op.NORM_ROPE, 3, _infer_norm_rope,
         lambda a, env, x, w, pos: (ew_ref.norm_rope(x, w, pos, eps=a.eps, n_dims=a.n_dims, freq_base=a.freq_base,
                                                     mode=a.mode, freq_scale=a.freq_scale, sections=a.sections),),
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


def _infer_ffn_swiglu(a, ins):
    x, wg, wu = ins
    _req(_same_shape(wg, wu), f"ffn_swiglu gate weight {wg} and up weight {wu} differ")
    (h,) = infer(Op.MATMUL, a, (x, wg))
    return infer(Op.MUL, a, (infer(Op.SILU, a, (h,))[0], h))


def _flops_ffn_swiglu(a, ins, outs, env):
    return 2 * 2 * _numel(outs[0], env) * dim_eval(ins[1].shape[1], env) + 2 * _numel(outs[0], env)


register(Op.FFN_SWIGLU, 3, _infer_ffn_swiglu,
         lambda a, env, x, wg, wu: (ew_ref.ffn_swiglu(x, wg, wu),), _flops_ffn_swiglu)
