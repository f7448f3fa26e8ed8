"""Fuse elementwise chains where a kernel would otherwise write a value only for the next one to
read it back: residual add + RMSNorm, q/k norm + (partial) RoPE, the sigmoid output gates, the
DeltaNet gated output norm, and gate+up+SwiGLU of dense FFNs.

The fusions are data: `RULES` is a list of (pattern, replacement) rules applied by
passes/rewrite.py. Runs after fuse_moe, so it fuses whatever gating fuse_moe has left.
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.passes.base import PassResult
from ggfuse.passes.rewrite import Pat, Rule, cap, rewrite


def _add_rms_norm(g, m):
    # A residual add never broadcasts; the fused kernel reads a and b in the same layout.
    if m.type("a") != m.type("b"):
        return None
    normed, total = g.add(Op.ADD_RMS_NORM, (m["a"], m["b"], m["w"]), name=m.root.name, eps=m.root.attrs.eps)
    return {"norm": normed, "sum": total}


def _norm_rope(g, m):
    return g.add(Op.NORM_ROPE, (m["x"], m["w"], m["pos"]), name=m.root.name,
                 attrs=m.root.attrs.updated(eps=m.node("norm").attrs.eps))


def _sigmoid_mul(g, m):
    # The gate may broadcast into x (the shared expert's [T, 1] gate), never the other way.
    if g.type_of(m.root.out) != m.type("x"):
        return None
    return g.add(Op.SIGMOID_MUL, (m["x"], m["g"]), name=m.root.name)


def _gated_rms_norm(g, m):
    if m.type("o") != m.type("z"):
        return None
    return g.add(Op.GATED_RMS_NORM, (m["o"], m["w"], m["z"]), name=m.root.name, eps=m.node("norm").attrs.eps)


def _ffn_swiglu(g, m):
    if m.type("w_gate").shape != m.type("w_up").shape:
        return None
    return g.add(Op.FFN_SWIGLU, (m["x"], m["w_gate"], m["w_up"]), name=m.root.name)


def _proj(w: str) -> Pat:
    return Pat(Op.MATMUL, cap("x"), cap(w), sole_use=True)


RULES = [
    # The add is kept, not sole_use: the next residual add reads the sum too, so the fused op
    # returns it as a second output instead of the add running twice.
    Rule("add_rms_norm", Pat(Op.RMS_NORM, Pat(Op.ADD, cap("a"), cap("b"), name="sum"), cap("w"), name="norm"),
         _add_rms_norm),
    Rule("norm_rope", Pat(Op.ROPE, Pat(Op.RMS_NORM, cap("x"), cap("w"), sole_use=True, name="norm"), cap("pos")),
         _norm_rope),
    Rule("sigmoid_mul", Pat(Op.MUL, cap("x"), Pat(Op.SIGMOID, cap("g"), sole_use=True), commute=True),
         _sigmoid_mul),
    # z is whatever feeds the SiLU, a RESHAPE view included: the reshape stays a free view
    # and the fused op's z has o's shape.
    Rule("gated_rms_norm", Pat(Op.MUL, Pat(Op.RMS_NORM, cap("o"), cap("w"), sole_use=True, name="norm"),
                               Pat(Op.SILU, cap("z"), sole_use=True), commute=True),
         _gated_rms_norm),
    # Both projections must read the same x (a capture name bound twice must agree).
    Rule("ffn_swiglu", Pat(Op.MUL, Pat(Op.SILU, _proj("w_gate"), sole_use=True), _proj("w_up"), commute=True),
         _ffn_swiglu),
]


def run(g: Graph, *, rules: list[Rule] = RULES) -> PassResult:
    out, n = rewrite(g, rules)
    return PassResult(out, n > 0)
