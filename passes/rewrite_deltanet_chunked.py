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
    g.dce()  # the bypassed SILUs
    return PassResult(g, changed)
