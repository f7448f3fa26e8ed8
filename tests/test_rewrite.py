"""passes/rewrite.py on small hand-built graphs: matching, sole-use, kept intermediates, the
fixed point, and the input graph left as it was."""
from __future__ import annotations

import pytest

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.ir.printer import to_text
from ggfuse.ir.verify import verify
from ggfuse.passes.rewrite import Pat, Rule, RewriteError, cap, match, rewrite

D = 8


def _inp(g, name, shape=("T", D)):
    return g.add(Op.INPUT, name=name, key=name, kind="activation", shape=shape, dtype="f32")


def _sigmoid_mul_rule(build=None):
    return Rule("sigmoid_mul", Pat(Op.MUL, cap("x"), Pat(Op.SIGMOID, cap("g"), sole_use=True), commute=True),
                build or (lambda g, m: g.add(Op.SIGMOID_MUL, (m["x"], m["g"]), name=m.root.name)))


def _gated_graph(gate_first=False):
    g = Graph("t")
    x, gt = _inp(g, "x"), _inp(g, "g")
    s = g.add(Op.SIGMOID, (gt,))
    g.set_output("out", g.add(Op.MUL, (s, x) if gate_first else (x, s), name="gated"))
    return g


@pytest.mark.parametrize("gate_first", [False, True], ids=["x_first", "gate_first"])
def test_match_binds_captures_in_either_order(gate_first):
    g = _gated_graph(gate_first)
    m = match(g, _sigmoid_mul_rule().pattern, g.node(g.outputs["out"].node))
    assert m is not None
    assert g.node(m["x"].node).attrs.key == "x" and g.node(m["g"].node).attrs.key == "g"
    assert [n.op for n, _ in m.nodes] == [Op.MUL, Op.SIGMOID]  # root first


def test_rewrite_replaces_root_and_drops_dead_nodes():
    g = _gated_graph()
    out, n = rewrite(g, [_sigmoid_mul_rule()])
    verify(out)
    assert n == 1
    assert out.op_counts() == {"input": 2, "sigmoid_mul": 1}
    assert out.node(out.outputs["out"].node).name == "gated"


def test_no_match_when_intermediate_has_another_user():
    g = _gated_graph()
    s = g.by_op(Op.SIGMOID)[0]
    g.set_output("gate", s.out)  # a graph output is a user too
    out, n = rewrite(g, [_sigmoid_mul_rule()])
    assert n == 0 and out.op_counts() == g.op_counts()

    g = _gated_graph()
    g.set_output("other", g.add(Op.ADD, (g.by_op(Op.SIGMOID)[0].out, g.inputs()["x"].out)))
    out, n = rewrite(g, [_sigmoid_mul_rule()])
    assert n == 0 and out.op_counts() == g.op_counts()


def test_build_may_decline():
    out, n = rewrite(_gated_graph(), [_sigmoid_mul_rule(build=lambda g, m: None)])
    assert n == 0 and out.op_counts()["mul"] == 1


def _add_norm_rule():
    def build(g, m):
        normed, s = g.add(Op.ADD_RMS_NORM, (m["a"], m["b"], m["w"]), eps=m.root.attrs.eps)
        return {"norm": normed, "sum": s}
    return Rule("add_rms_norm", Pat(Op.RMS_NORM, Pat(Op.ADD, cap("a"), cap("b"), name="sum"), cap("w"), name="norm"),
                build)


def test_kept_intermediate_is_reexported():
    g = Graph("t")
    a, b, w = _inp(g, "a"), _inp(g, "b"), _inp(g, "w", (D,))
    s = g.add(Op.ADD, (a, b))
    g.set_output("normed", g.add(Op.RMS_NORM, (s, w), eps=1e-6))
    g.set_output("next", g.add(Op.ADD, (s, a)))  # the next residual add reads the sum
    out, n = rewrite(g, [_add_norm_rule()])
    verify(out)
    fused = out.by_op(Op.ADD_RMS_NORM)[0]
    assert n == 1 and out.op_counts()["add"] == 1 and "rms_norm" not in out.op_counts()
    assert out.outputs["normed"] == fused.value(0)
    assert out.node(out.outputs["next"].node).inputs[0] == fused.value(1)


def test_kept_intermediate_feeding_a_capture_is_not_fused():
    # w depends on the sum: fusing would make the fused node read its own output.
    g = Graph("t")
    a, b = _inp(g, "a"), _inp(g, "b")
    s = g.add(Op.ADD, (a, b))
    w = g.add(Op.SUM, (s,), axis=0, keepdims=False)
    g.set_output("normed", g.add(Op.RMS_NORM, (s, w), eps=1e-6))
    out, n = rewrite(g, [_add_norm_rule()])
    assert n == 0
    verify(out)


def test_repeated_capture_must_bind_one_value():
    proj = lambda w: Pat(Op.MATMUL, cap("x"), cap(w), sole_use=True)  # noqa: E731
    rule = Rule("swiglu", Pat(Op.MUL, Pat(Op.SILU, proj("wg"), sole_use=True), proj("wu")),
                lambda g, m: g.add(Op.FFN_SWIGLU, (m["x"], m["wg"], m["wu"])))
    for same_x in (True, False):
        g = Graph("t")
        x1, x2 = _inp(g, "x1"), _inp(g, "x2")
        wg, wu = _inp(g, "wg", (4, D)), _inp(g, "wu", (4, D))
        h = g.add(Op.MUL, (g.add(Op.SILU, (g.add(Op.MATMUL, (x1, wg)),)), g.add(Op.MATMUL, (x1 if same_x else x2, wu))))
        g.set_output("h", h)
        _, n = rewrite(g, [rule])
        assert n == (1 if same_x else 0)


def _scale_chain(k):
    g = Graph("t")
    v = _inp(g, "x")
    for i in range(k):
        v = g.add(Op.SCALE, (v,), factor=2.0, name=f"s{i}")
    g.set_output("y", v)
    return g


# SCALE(SCALE(x)) -> one SCALE: each rewrite makes a new chain for the next to match.
_MERGE = Rule("merge_scales", Pat(Op.SCALE, Pat(Op.SCALE, cap("x"), sole_use=True, name="inner")),
              lambda g, m: g.add(Op.SCALE, (m["x"],), factor=m.root.attrs.factor * m.node("inner").attrs.factor))


def test_fixed_point_and_determinism():
    g = _scale_chain(5)
    out, n = rewrite(g, [_MERGE])
    verify(out)
    assert n == 4 and out.op_counts() == {"input": 1, "scale": 1}
    assert out.node(out.outputs["y"].node).attrs.factor == 32.0
    again, n2 = rewrite(g, [_MERGE])
    assert n2 == n and to_text(again) == to_text(out)


def test_input_graph_untouched():
    g = _scale_chain(3)
    before = to_text(g)
    ids = [n.id for n in g.nodes()]
    rewrite(g, [_MERGE])
    assert to_text(g) == before and [n.id for n in g.nodes()] == ids


def test_replacement_of_wrong_type_is_an_error():
    bad = _sigmoid_mul_rule(build=lambda g, m: g.add(Op.SUM, (m["x"],), axis=1, keepdims=True))
    with pytest.raises(RewriteError, match="sigmoid_mul"):
        rewrite(_gated_graph(), [bad])


def test_rules_that_never_settle_are_an_error():
    # SCALE(x) -> SCALE(x) always matches again.
    loop = Rule("loop", Pat(Op.SCALE, cap("x")), lambda g, m: g.add(Op.SCALE, (m["x"],), factor=1.0))
    with pytest.raises(RewriteError, match="fixed point"):
        rewrite(_scale_chain(1), [loop], max_sweeps=3)


def test_where_predicate_filters_nodes():
    only_small = Rule("merge_small", Pat(Op.SCALE, Pat(Op.SCALE, cap("x"), sole_use=True, name="inner",
                                                       where=lambda n: n.name == "s0")), _MERGE.build)
    out, n = rewrite(_scale_chain(3), [only_small])
    assert n == 1 and out.op_counts()["scale"] == 2  # s0+s1 merged; the merged node is not named s0
