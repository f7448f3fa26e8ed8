"""passes/fuse_elementwise.py on the plain graphs of every architecture: which fused nodes exist
afterwards (counts from the hparams), and logits with and without the pass."""
from __future__ import annotations

import os

import numpy as np
import pytest
from util import ARCHS, GEMMA4, fixture, rel_err, run_graph

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.ops import Op
from ggfuse.ir.printer import to_text
from ggfuse.ir.verify import verify
from ggfuse.passes import fuse_elementwise, fuse_moe

GATED_ATTENTION = {"qwen35moe", "qwen35", "qwen3next"}  # hybrid models gate attention output
DENSE_FFN = {"qwen35"}
# How many nodes one fusion saves: the ops it replaces minus the one it makes.
SAVES = {Op.ADD_RMS_NORM: 1, Op.NORM_ROPE: 1, Op.SIGMOID_MUL: 1, Op.GATED_RMS_NORM: 2, Op.FFN_SWIGLU: 3}


def _load(arch):
    path = fixture(arch, "f32")
    if not os.path.exists(path):
        pytest.skip(f"fixture {path} not built")
    gf = GGUFFile(path)
    return gf, build_graph(gf)


def _expected(arch, g) -> dict:
    hp = g.meta["hparams"]
    n_layer = hp["n_layer"]
    n_attn = sum(not r for r in hp["recurrent"])
    weights = {n.attrs.tensor for n in g.weights()}
    n_shared = sum(f"blk.{il}.ffn_up_shexp.weight" in weights for il in range(n_layer))
    n_dense = n_layer if arch in DENSE_FFN else 0
    return {
        # each layer: attention residual -> post-attention norm, FFN residual -> next layer's
        # attention norm (or the output norm after the last layer)
        Op.ADD_RMS_NORM: 2 * n_layer,
        Op.NORM_ROPE: 2 * n_attn,  # q and k
        Op.SIGMOID_MUL: (n_attn if arch in GATED_ATTENTION else 0) + n_shared,
        Op.GATED_RMS_NORM: n_layer - n_attn,
        Op.FFN_SWIGLU: n_dense + n_shared,
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_structure(arch):
    _, g = _load(arch)
    before = to_text(g)
    res = fuse_elementwise.run(g)
    out = res.graph
    verify(out)
    assert res.changed and to_text(g) == before  # the input graph is left as it was
    want = _expected(arch, g)
    assert {op: len(out.by_op(op)) for op in want} == want
    assert len(g) - len(out) == sum(SAVES[op] * n for op, n in want.items())
    # Every RMSNorm follows a residual add, a q/k head or the DeltaNet output, except the first
    # layer's, which reads the embedding; no RoPE is left unfused.
    assert [n.name for n in out.by_op(Op.RMS_NORM)] == ["blk.0.attn_norm"]
    assert not out.by_op(Op.ROPE)
    assert out.outputs.keys() == g.outputs.keys()
    assert not fuse_elementwise.run(out).changed  # a fixed point


@pytest.mark.parametrize("arch", ARCHS)
def test_numbers(arch):
    gf, g = _load(arch)
    tokens = np.random.default_rng(1).integers(0, g.meta["hparams"]["n_vocab"], 40)
    want = run_graph(g, gf, tokens, chunk=16)  # 16 does not divide 40: state carried across chunks
    got = run_graph(fuse_elementwise.run(g).graph, gf, tokens, chunk=16)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_after_fuse_moe(arch):
    # In the pipeline fuse_moe runs first and may absorb the shared expert with its gate; the
    # attention, norm and DeltaNet fusions do not depend on it.
    _, g = _load(arch)
    out = fuse_elementwise.run(fuse_moe.run(g).graph).graph
    verify(out)
    want = _expected(arch, g)
    for op in (Op.ADD_RMS_NORM, Op.NORM_ROPE, Op.GATED_RMS_NORM):
        assert len(out.by_op(op)) == want[op]
    assert [n.name for n in out.by_op(Op.RMS_NORM)] == ["blk.0.attn_norm"]


# ---- Gemma 4 -----------------------------------------------------------------------------------

def _gemma_expected(g, *, moe_fused: bool) -> dict:
    hp = g.meta["hparams"]
    L, ple = hp["n_layer"], bool(hp["n_embd_per_layer"])
    n_own = sum(s == il for il, s in enumerate(hp["kv_source"]))
    n_moe = L if hp["n_expert"] else 0
    return {
        Op.NORM_ROPE: L + n_own,                       # q of every layer, k of the layers with their own
        Op.FFN_GEGLU: L,                               # the dense MLP (beside the experts in MoE layers)
        Op.GELU_MUL: (L if ple else 0) + (0 if moe_fused else n_moe),   # PLE gate; unfused experts
        # post-attention residual + pre-FFN norm in every layer; the layer output (scaled) + the
        # next layer's attention norm between layers
        Op.NORM_ADD_NORM: 2 * L - 1,
        # the FFN residual where PLE reads it, the last layer's output, the PLE prologue's sum;
        # the dense+experts combine of the MoE layers
        Op.NORM_ADD: (L + 2 if ple else 1) + n_moe,
    }


@pytest.mark.parametrize("name", GEMMA4)
def test_gemma4_structure(name):
    _, g = _load(name)
    before = to_text(g)
    out = fuse_elementwise.run(g).graph
    verify(out)
    assert to_text(g) == before
    want = _gemma_expected(g, moe_fused=False)
    assert {op: len(out.by_op(op)) for op in want} == want
    hp = g.meta["hparams"]
    own = [il for il, s in enumerate(hp["kv_source"]) if s == il]
    left = ["blk.0.attn_norm"] + [f"blk.{il}.v_norm" for il in own] + ["output_norm"]
    if hp["n_expert"]:
        left += [f"blk.{il}.{n}" for il in range(hp["n_layer"]) for n in ("pre_ffw_norm_2", "router_norm",
                                                                          "post_ffw_norm_2")]
    assert sorted(n.name for n in out.by_op(Op.RMS_NORM)) == sorted(left)
    assert not out.by_op(Op.ROPE) and not out.by_op(Op.ADD_RMS_NORM)
    # the scaled residual sums carry the layer's output scale in
    scaled = [n for n in out.by_op(Op.NORM_ADD) + out.by_op(Op.NORM_ADD_NORM)
              if any(out.node(v.node).op == Op.WEIGHT and "layer_output_scale" in out.node(v.node).attrs.tensor
                     for v in n.inputs)]
    assert len(scaled) == hp["n_layer"]
    assert not fuse_elementwise.run(out).changed


@pytest.mark.parametrize("name", GEMMA4)
@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
def test_gemma4_numbers(name, quant):
    gf, g = _load_q(name, quant)
    tokens = np.random.default_rng(1).integers(0, g.meta["hparams"]["n_vocab"], 40)
    want = run_graph(g, gf, tokens, chunk=16)
    assert rel_err(run_graph(fuse_elementwise.run(g).graph, gf, tokens, chunk=16), want) < 1e-5
    both = fuse_elementwise.run(fuse_moe.run(g).graph).graph
    verify(both)
    assert rel_err(run_graph(both, gf, tokens, chunk=16), want) < 1e-5


def test_gemma4_after_fuse_moe():
    _, g = _load("gemma4-moe")
    out = fuse_elementwise.run(fuse_moe.run(g).graph).graph
    want = _gemma_expected(g, moe_fused=True)
    assert {op: len(out.by_op(op)) for op in want} == want


def _load_q(name, quant):
    path = fixture(name, quant)
    if not os.path.exists(path):
        pytest.skip(f"fixture {path} not built")
    gf = GGUFFile(path)
    return gf, build_graph(gf)
