"""Rewrite the Gated DeltaNet layers for prefill: the token-recurrent delta rule becomes the
chunked (WY/UT) form, whose work is matmuls over C-token chunks instead of T sequential rank-1
updates, and the short conv absorbs the SiLU that follows it.

Both rewrites keep every input and output of the node they replace (the carried conv window
and recurrent state included), so they are in-place op swaps on a copy of the graph.
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.passes.base import PassResult


def run(g: Graph, *, chunk: int = 64) -> PassResult:
    g = g.copy()
    changed = False
    for n in g.by_op(Op.GATED_DELTA_RULE):
        g.replace_node(n.id, op=Op.CHUNK_GATED_DELTA_RULE, attrs=n.attrs.updated(chunk=chunk))
        changed = True
    for n in g.by_op(Op.SSM_CONV):
        y = n.value(0)
        uses = g.uses_of(y)
        # Fusing is only sound when nothing else reads the pre-activation output.
        if len(uses) != 1 or uses[0][0].op != Op.SILU or y in g.outputs.values():
            continue
        silu = uses[0][0]
        g.replace_node(n.id, op=Op.SSM_CONV_SILU)
        g.replace_uses(silu.out, y)
        changed = True
    changed |= _fuse_gates(g)
    g.dce()  # the bypassed SILUs and gate chains
    return PassResult(g, changed)


def _sole_user(g: Graph, v, op: Op):
    uses = g.uses_of(v)
    if len(uses) == 1 and uses[0][0].op == op and v not in g.outputs.values():
        return uses[0][0]
    return None


def _fuse_gates(g: Graph) -> bool:
    """g = softplus(alpha + dt_bias) * ssm_a and beta = sigmoid(beta_lin), the per-token gates of
    each delta rule, become one DELTANET_GATES node (one kernel, which also zeroes the gates of a
    padded chunk's tail so the carried state stays exact)."""
    changed = False
    for n in g.by_op(Op.CHUNK_GATED_DELTA_RULE) + g.by_op(Op.GATED_DELTA_RULE):
        g_in, beta_in = n.inputs[3], n.inputs[4]
        mul, sig = g.node(g_in.node), g.node(beta_in.node)
        if mul.op != Op.MUL or sig.op != Op.SIGMOID or _sole_user(g, beta_in, n.op) is None or _sole_user(g, g_in, n.op) is None:
            continue
        sp_v, ssm_a = mul.inputs
        sp = g.node(sp_v.node)
        if sp.op != Op.SOFTPLUS or _sole_user(g, sp_v, Op.MUL) is None:
            continue
        add = g.node(sp.inputs[0].node)
        if add.op != Op.ADD or _sole_user(g, add.out, Op.SOFTPLUS) is None:
            continue
        alpha, dt_bias = add.inputs
        if g.node(dt_bias.node).op != Op.WEIGHT or g.node(ssm_a.node).op != Op.WEIGHT:
            continue
        gates = g.add(Op.DELTANET_GATES, [alpha, sig.inputs[0], dt_bias, ssm_a], name=n.name.replace("delta_rule", "gates"),
                      meta={k: v for k, v in n.meta.items() if k == "layer"})
        ins = list(g.node(n.id).inputs)
        ins[3], ins[4] = gates
        g.replace_node(n.id, inputs=tuple(ins))
        changed = True
    return changed
