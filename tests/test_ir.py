"""IR unit tests: symbolic dims, shape rules, verifier, serialisation, printers, interpreter."""
import numpy as np
import pytest

from ggfuse.ir import Graph, Op, TensorType, DType
from ggfuse.ir.interpret import interpret
from ggfuse.ir.ops import InferError
from ggfuse.ir.printer import to_dot, to_text
from ggfuse.ir.serialize import dumps, loads
from ggfuse.ir.types import dim_add, dim_eval, dim_mul, nbytes_of
from ggfuse.ir.verify import VerifyError, verify


def test_symbolic_dims():
    assert dim_add("P", "T") == "P+T"
    assert dim_add("T", "P") == "P+T"
    assert dim_add("T", 3) == "T+3"
    assert dim_add(2, 3) == 5
    assert dim_mul("T", 8) == "8*T"
    assert dim_eval("8*T+P+2", {"T": 3, "P": 10}) == 36
    with pytest.raises(KeyError):
        dim_eval("T", {})
    assert TensorType(("T", 4)).nbytes({"T": 3}) == 48
    assert nbytes_of(DType.Q4_K, 512) == 288
    assert nbytes_of(DType.Q8_0, 64) == 68


def small_graph():
    g = Graph("small")
    x = g.add(Op.INPUT, key="x", kind="activation", shape=("T", 8), dtype="f32")
    s = g.add(Op.INPUT, key="s", kind="state", state="kv_cache", shape=("P", 8), dtype="f32")
    w = g.add(Op.WEIGHT, tensor="w", shape=(4, 8), dtype="f32")
    y = g.add(Op.MATMUL, [x, w], name="proj")
    z = g.add(Op.SILU, [y])
    cat = g.add(Op.CONCAT, [s, x], axis=0)
    g.set_output("out", z)
    g.set_output("s", cat)
    return g


def test_shape_inference_and_errors():
    g = small_graph()
    assert g.type_of(g.outputs["out"]) == TensorType(("T", 4))
    assert g.type_of(g.outputs["s"]).shape == ("P+T", 8)
    w = g.add(Op.WEIGHT, tensor="w2", shape=(4, 7), dtype="f32")
    with pytest.raises(InferError, match="inner dims"):
        g.add(Op.MATMUL, [g.outputs["out"], w])
    with pytest.raises(InferError, match="takes"):
        g.add(Op.SILU, [])


def test_verify_catches_bad_types_and_missing_state_output():
    g = small_graph()
    verify(g)
    n = g.node(g.outputs["out"].node)
    g.replace_node(n.id, outputs=(TensorType(("T", 5)),))
    with pytest.raises(VerifyError, match="rule gives"):
        verify(g)
    g2 = small_graph()
    del g2.outputs["s"]
    with pytest.raises(VerifyError, match="state 's'"):
        verify(g2)


def test_serialise_roundtrip_is_deterministic():
    g = small_graph()
    s = dumps(g)
    g2 = loads(s)
    assert dumps(g2) == s
    verify(g2)
    assert [n.op for n in g2.topo()] == [n.op for n in g.topo()]


def test_printers():
    g = small_graph()
    text = to_text(g)
    assert "matmul(%0, %2)" in text and "# proj" in text and "output out" in text
    dot = to_dot(g)
    assert dot.startswith('digraph "small"') and "->" in dot


def test_interpreter_matches_numpy_and_copy_is_independent():
    g = small_graph()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    s = rng.standard_normal((2, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    out = interpret(g, {"x": x, "s": s}, lambda n: w, {"T": 3, "P": 2})
    y = x @ w.T
    np.testing.assert_allclose(out["out"], y / (1 + np.exp(-y)), rtol=1e-6)
    np.testing.assert_array_equal(out["s"], np.concatenate([s, x]))
    with pytest.raises(ValueError, match="shape"):
        interpret(g, {"x": x, "s": s}, lambda n: w, {"T": 4, "P": 2})
    g2 = g.copy()
    g2.set_meta(0, seen=True)
    assert "seen" not in g.node(0).meta
    g2.replace_uses(g2.outputs["out"], g2.outputs["out"])
    assert g2.dce() == 0


def test_replace_uses_and_dce():
    g = small_graph()
    y = g.node(g.outputs["out"].node).inputs[0]
    z2 = g.add(Op.SIGMOID, [y])
    g.replace_uses(g.outputs["out"], z2)
    assert g.outputs["out"] == z2
    assert g.dce() == 1  # the old SILU
    verify(g)
