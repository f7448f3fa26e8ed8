"""Ops made by passes/rewrite_deltanet_chunked.py: the chunked gated delta rule and the short
conv with its SiLU fused. Each has the inputs and outputs of the plain op it replaces, so shape
inference is the plain op's rule."""
from __future__ import annotations

from ggfuse.ir.ops import Op, _infer_gdr, _infer_ssm_conv, _numel, _req, register
from ggfuse.ir.types import DType, TensorType, dim_eval
from ggfuse.kernels.dequant.ref import dense
from ggfuse.kernels.deltanet import ref as dn_ref
from ggfuse.kernels.dense import ref as dense_ref


def _infer_chunk_gdr(a, ins):
    _req(isinstance(a.chunk, int) and a.chunk > 0, f"chunk_gated_delta_rule chunk must be a positive int, got {a.chunk!r}")
    return _infer_gdr(a, ins)


def _flops_chunk_gdr(a, ins, outs, env):
    """Matmuls of the chunked algorithm, summed over the full chunks and the short last one."""
    T = dim_eval(ins[0].shape[0], env)
    Hv, K, V = ins[5].shape
    full, rest = divmod(T, a.chunk)

    def per_chunk(L):
        intra = L * L * (6 * K + 4 * V)  # K K^T, A (beta e^G K), q K^T; A (beta V), (q K^T * D) U
        invert = L * L * L // 3          # forward substitution for A = (I + strict)^-1
        state = 6 * L * K * V            # w S, q S, K^T U
        return intra + invert + state

    return Hv * (full * per_chunk(a.chunk) + (per_chunk(rest) if rest else 0))


register(Op.CHUNK_GATED_DELTA_RULE, 6, _infer_chunk_gdr,
         lambda a, env, q, k, v, g, b, s: dn_ref.chunk_gated_delta_rule(
             q, k, v, g, b, s, scale=a.scale, head_map=a.head_map, chunk=a.chunk),
         _flops_chunk_gdr, n_outputs=2)

register(Op.SSM_CONV_SILU, 3, _infer_ssm_conv,
         lambda a, env, x, s, w: dn_ref.ssm_conv_silu(x, s, dense_ref.dense(w)),
         lambda a, ins, outs, env: (2 * ins[2].shape[1] + 1) * _numel(outs[0], env),  # SiLU as 1, like Op.SILU
         n_outputs=2)


def _infer_gates(a, ins):
    alpha, beta_lin, dt_bias, ssm_a = ins
    _req(alpha.rank == 2 and tuple(alpha.shape) == tuple(beta_lin.shape), "deltanet_gates wants alpha, beta_lin [T, Hv]")
    _req(tuple(dt_bias.shape) == (alpha.shape[1],) == tuple(ssm_a.shape), "dt_bias and ssm_a must be [Hv]")
    return (TensorType(alpha.shape, DType.F32), TensorType(alpha.shape, DType.F32))


register(Op.DELTANET_GATES, 4, _infer_gates,
         lambda a, env, alpha, b, dtb, A: dn_ref.deltanet_gates(alpha, b, dense(dtb), dense(A)),
         lambda a, ins, outs, env: 8 * outs[0].numel(env), n_outputs=2)
