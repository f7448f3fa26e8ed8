"""Fuse elementwise chains where a kernel would otherwise write a value only for the next one to
read it back: residual add + RMSNorm, q/k norm + (partial) RoPE, the sigmoid output gates, the
DeltaNet gated output norm, and gate+up+SwiGLU of dense FFNs; for Gemma 4 the GELU GLU, the
per-layer-embedding GELU gate, and the post-norm residual chain

    h' = rms_norm(x) w + r  [* layer_output_scale]  ->  rms_norm(h') w_next (the next block's norm)

as NORM_ADD, or NORM_ADD_NORM (normed, sum) when the sum goes on down the residual stream.

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


def _norm_rope_ff(g, m):
    return g.add(Op.NORM_ROPE, (m["x"], m["w"], m["pos"], m["ff"]), name=m.root.name,
                 attrs=m.root.attrs.updated(eps=m.node("norm").attrs.eps))


def _ffn_geglu(g, m):
    if m.type("w_gate").shape != m.type("w_up").shape:
        return None
    return g.add(Op.FFN_GEGLU, (m["x"], m["w_gate"], m["w_up"]), name=m.root.name)


def _gelu_mul(g, m):
    if m.type("x") != m.type("y"):
        return None
    return g.add(Op.GELU_MUL, (m["x"], m["y"]), name=m.root.name)


def _norm_add(g, m):
    # a residual add never broadcasts
    if m.type("x") != m.type("r") or g.type_of(m.root.out) != m.type("r"):
        return None
    return g.add(Op.NORM_ADD, (m["x"], m["w"], m["r"]), name=m.root.name, eps=m.node("norm").attrs.eps)


def _norm_add_scaled(g, m):
    na = m.node("sum")
    if len(na.inputs) != 3 or tuple(m.type("s").shape) != (1,):
        return None
    return g.add(Op.NORM_ADD, na.inputs + (m["s"],), name=m.root.name, eps=na.attrs.eps)


def _norm_add_norm(g, m):
    na = m.node("sum")
    # Only a sum that goes on down the residual stream is worth the second output; a sum read by
    # this norm alone (Gemma's MoE dense+experts combine) is left for its own residual NORM_ADD.
    if len(g.users(na.id)) < 2:
        return None
    x, w, r = na.inputs[:3]
    normed, total = g.add(Op.NORM_ADD_NORM, (x, w, r, m["w_next"]) + na.inputs[3:], name=m.root.name,
                          eps=na.attrs.eps, eps_next=m.root.attrs.eps)
    return {"norm": normed, "sum": total}


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
    # ---- Gemma 4 ----
    # full layers rotate through rope_freqs factors (a third RoPE input)
    Rule("norm_rope_ff", Pat(Op.ROPE, Pat(Op.RMS_NORM, cap("x"), cap("w"), sole_use=True, name="norm"), cap("pos"),
                             cap("ff")), _norm_rope_ff),
    Rule("ffn_geglu", Pat(Op.MUL, Pat(Op.GELU, _proj("w_gate"), sole_use=True), _proj("w_up"), commute=True),
         _ffn_geglu),
    Rule("gelu_mul", Pat(Op.MUL, Pat(Op.GELU, cap("x"), sole_use=True), cap("y"), commute=True), _gelu_mul),
    # post-norm residual: the ADD is the root, visited before the next norm reads it
    Rule("norm_add", Pat(Op.ADD, Pat(Op.RMS_NORM, cap("x"), cap("w"), sole_use=True, name="norm"), cap("r"),
                         commute=True), _norm_add),
    Rule("norm_add_scaled", Pat(Op.MUL, Pat(Op.NORM_ADD, name="sum", sole_use=True), cap("s"), commute=True),
         _norm_add_scaled),
    # kept, like add_rms_norm's sum: the residual stream reads it on
    Rule("norm_add_norm", Pat(Op.RMS_NORM, Pat(Op.NORM_ADD, name="sum"), cap("w_next"), name="norm"),
         _norm_add_norm),
]


def run(g: Graph, *, rules: list[Rule] = RULES) -> PassResult:
    out, n = rewrite(g, rules)
    return PassResult(out, n > 0)
