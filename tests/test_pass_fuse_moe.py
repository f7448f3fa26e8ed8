"""fuse_moe: structure on every architecture's real graph and on `moe_ffn` variants the fixtures
lack (merged gate_up, scaled or unnormalised weights), and logits unchanged."""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.frontends.common import Builder, HParams, moe_ffn
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.interpret import interpret
from ggfuse.ir.ops import Op
from ggfuse.ir.serialize import dumps
from ggfuse.ir.verify import verify
from ggfuse.passes import fuse_moe
from util import ARCHS, fixture, rel_err, run_graph

MOE = {"qwen35moe": True, "qwen3next": True, "qwen3moe": False}  # arch -> has a shared expert
GONE = (Op.TOPK, Op.MUL_MAT_ID, Op.TAKE_ALONG, Op.SOFTMAX)


@functools.lru_cache(maxsize=None)
def _load(arch: str, quant: str = "f32"):
    path = fixture(arch, quant)
    if not os.path.exists(path):
        pytest.skip(f"fixture {path} not built yet")
    gf = GGUFFile(path)
    return gf, build_graph(gf)


def _check_fused(g, out, *, n_layers: int, shared: bool, merged: bool = False):
    verify(out)
    for op in GONE:
        assert not out.by_op(op), f"{op.value} left after fuse_moe"
    routes, gemms = out.by_op(Op.MOE_ROUTE), out.by_op(Op.MOE_GROUPED_GEMM)
    assert len(routes) == len(gemms) == n_layers
    for r, m in zip(routes, gemms):
        assert len(r.outputs) == (5 if shared else 4)
        assert m.attrs.shared == shared and m.attrs.merged_gate_up == merged and m.attrs.tile == 16
        assert m.inputs[1:4] == tuple(r.value(i) for i in (1, 2, 3))  # routed by its own layer's router
        assert m.inputs[0] == r.inputs[0]
    if shared:  # the shared expert's dense matmuls and gate went in too
        assert len(out.by_op(Op.MATMUL)) == len(g.by_op(Op.MATMUL)) - 5 * n_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_structure(arch):
    _, g = _load(arch)
    before = dumps(g)
    n_moe = len(g.by_op(Op.TOPK))
    assert n_moe == (g.meta["hparams"]["n_layer"] if arch in MOE else 0)
    res = fuse_moe.run(g)
    assert dumps(g) == before, "the pass mutated its input graph"
    assert res.changed == (arch in MOE)
    _check_fused(g, res.graph, n_layers=n_moe, shared=MOE.get(arch, False))
    assert not fuse_moe.run(res.graph).changed  # nothing left to fuse


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", list(MOE))
def test_logits_unchanged(arch, quant):
    gf, g = _load(arch, quant)
    tokens = np.random.default_rng(7).integers(0, g.meta["hparams"]["n_vocab"], size=40)
    plain = run_graph(g, gf, tokens, chunk=16)  # 16 does not divide 40: state is carried
    fused = run_graph(fuse_moe.run(g).graph, gf, tokens, chunk=16)
    assert rel_err(fused, plain) <= 1e-5


# ---- moe_ffn variants, on a synthetic GGUF ---------------------------------------------------

D, E, K, F, FS = 32, 6, 2, 12, 20


class _FakeGGUF:
    """Just what the frontend Builder reads: tensor names and shapes."""

    path = "<synthetic>"

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.tensors = {n: SimpleNamespace(name=n, shape=a.shape, type_name="F32") for n, a in arrays.items()}

    def tensor(self, name, shape=None):
        return self.tensors[name]


def _synthetic(*, merged: bool, shared: bool, norm: bool = True, scale: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    p = "blk.0"
    arrays = {f"{p}.ffn_gate_inp.weight": w(E, D), f"{p}.ffn_down_exps.weight": w(E, D, F)}
    if merged:
        arrays[f"{p}.ffn_gate_up_exps.weight"] = w(E, 2 * F, D)
    else:
        arrays.update({f"{p}.ffn_gate_exps.weight": w(E, F, D), f"{p}.ffn_up_exps.weight": w(E, F, D)})
    if shared:
        arrays.update({f"{p}.ffn_gate_shexp.weight": w(FS, D), f"{p}.ffn_up_shexp.weight": w(FS, D),
                       f"{p}.ffn_down_shexp.weight": w(D, FS), f"{p}.ffn_gate_inp_shexp.weight": w(D)})
    gf = _FakeGGUF(arrays)
    hp = HParams(arch="synthetic", n_layer=1, n_embd=D, n_vocab=0, rms_eps=1e-6, n_expert=E, n_expert_used=K,
                 n_ff_exp=F, n_ff_shexp=FS, expert_weights_norm=norm, expert_weights_scale=scale)
    b = Builder(gf, "synthetic")
    x = b.input("x", kind="activation", shape=("T", D))
    b.g.set_output("y", moe_ffn(b, x, il=0, hp=hp, shared=shared))
    return b.g, gf


def _run(g, gf, x):
    weight = lambda n: gf.arrays[n.attrs.tensor].reshape(n.attrs.shape)
    return interpret(g, {"x": x}, weight, {"T": len(x)})["y"]


@pytest.mark.parametrize("merged", [False, True], ids=["split", "merged"])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("norm,scale", [(True, 0.0), (False, 2.5)], ids=["norm", "scaled"])
def test_moe_ffn_variants(merged, shared, norm, scale):
    g, gf = _synthetic(merged=merged, shared=shared, norm=norm, scale=scale)
    res = fuse_moe.run(g)
    assert res.changed
    _check_fused(g, res.graph, n_layers=1, shared=shared, merged=merged)
    route = res.graph.by_op(Op.MOE_ROUTE)[0]
    assert (route.attrs.norm, route.attrs.scale, route.attrs.k) == (norm, scale, K)
    assert len(res.graph) == len(res.graph.weights()) + 3  # input, route, grouped GEMM: nothing else
    for T in (1, 19):
        x = np.random.default_rng(T).standard_normal((T, D)).astype(np.float32)
        want = _run(g, gf, x)
        np.testing.assert_allclose(_run(res.graph, gf, x), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_tile_sets_padding():
    g, _ = _synthetic(merged=False, shared=False)
    route = fuse_moe.run(g, tile=64).graph.by_op(Op.MOE_ROUTE)[0]
    assert route.attrs.tile == 64 and route.outputs[2].shape == (f"{K}*T+{E * 63}",)


def test_leaves_layer_whose_probs_are_read_elsewhere():
    g, _ = _synthetic(merged=False, shared=True)
    probs = g.by_op(Op.SOFTMAX)[0]
    g.set_output("router_probs", probs.out)
    res = fuse_moe.run(g)
    assert not res.changed and not res.graph.by_op(Op.MOE_ROUTE)
    verify(res.graph)
    assert "graph output" in res.graph.by_op(Op.TOPK)[0].meta["fuse_moe"]
    assert "fuse_moe" not in g.by_op(Op.TOPK)[0].meta  # meta went to the copy only


def test_routed_sum_read_twice_keeps_shared_expert_apart():
    """If the routed sum has a second reader, the shared expert's add cannot absorb it."""
    g, gf = _synthetic(merged=False, shared=True)
    total = next(n for n in g.by_op(Op.SUM) if n.attrs.axis == 1)
    g.set_output("routed", total.out)
    res = fuse_moe.run(g)
    gemm = res.graph.by_op(Op.MOE_GROUPED_GEMM)[0]
    assert res.changed and not gemm.attrs.shared and res.graph.outputs["routed"] == gemm.out
    verify(res.graph)
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    np.testing.assert_allclose(_run(res.graph, gf, x), _run(g, gf, x), rtol=1e-6, atol=1e-7)


# ---- Gemma 4: router input of its own, per-expert scale, GELU experts, dense MLP beside -------

def test_gemma4_structure_and_logits():
    gf, g = _load("gemma4-moe")
    res = fuse_moe.run(g)
    out = res.graph
    verify(out)
    L = g.meta["hparams"]["n_layer"]
    assert res.changed and all(not out.by_op(op) for op in GONE)
    routes, gemms = out.by_op(Op.MOE_ROUTE), out.by_op(Op.MOE_GROUPED_GEMM)
    assert len(routes) == len(gemms) == L
    for il, (r, m) in enumerate(zip(routes, gemms)):
        assert r.attrs.expert_scale and r.attrs.gating == "softmax" and r.attrs.norm and len(r.outputs) == 4
        assert out.node(r.inputs[2].node).attrs.tensor == f"blk.{il}.ffn_down_exps.scale"
        assert out.node(r.inputs[0].node).name == f"blk.{il}.router_in"       # rms(h) / sqrt(D) * scale
        assert out.node(m.inputs[0].node).name == f"blk.{il}.pre_ffw_norm_2"  # the experts' own norm
        assert m.attrs.act == "gelu" and m.attrs.merged_gate_up and not m.attrs.shared
        assert m.inputs[1:4] == tuple(r.value(i) for i in (1, 2, 3))
    # the dense MLP beside the experts stays as it was
    assert len(out.by_op(Op.MATMUL)) == len(g.by_op(Op.MATMUL)) - L
    assert not fuse_moe.run(out).changed
    for quant in ("f32", "q4_k_m"):
        gf, g = _load("gemma4-moe", quant)
        tokens = np.random.default_rng(7).integers(0, g.meta["hparams"]["n_vocab"], size=40)
        plain = run_graph(g, gf, tokens, chunk=16)
        assert rel_err(run_graph(fuse_moe.run(g).graph, gf, tokens, chunk=16), plain) <= 1e-5


def _gemma_synthetic(*, merged: bool, expert_scale: bool, seed: int = 0):
    from ggfuse.compiler.frontends import gemma4
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    p = "blk.0"
    arrays = {f"{p}.ffn_gate_inp.weight": w(E, D), f"{p}.ffn_down_exps.weight": w(E, D, F)}
    if merged:
        arrays[f"{p}.ffn_gate_up_exps.weight"] = w(E, 2 * F, D)
    else:
        arrays.update({f"{p}.ffn_gate_exps.weight": w(E, F, D), f"{p}.ffn_up_exps.weight": w(E, F, D)})
    if expert_scale:
        arrays[f"{p}.ffn_down_exps.scale"] = np.abs(w(E)) + 0.5
    gf = _FakeGGUF(arrays)
    hp = gemma4.Gemma4HParams(arch="gemma4", n_layer=1, n_embd=D, n_vocab=0, rms_eps=1e-6, n_expert=E,
                              n_expert_used=K, n_expert_used_l=(K,), n_ff_exp=F)
    b = Builder(gf, "synthetic")
    xe = b.input("x", kind="activation", shape=("T", D))
    xr = b.op(Op.SCALE, xe, factor=0.5)   # the router reads another value than the experts
    b.g.set_output("y", gemma4.moe(b, xe, xr, il=0, hp=hp))
    return b.g, gf


@pytest.mark.parametrize("merged", [False, True], ids=["split", "merged"])
@pytest.mark.parametrize("expert_scale", [False, True], ids=["unscaled", "expert-scale"])
def test_gemma4_moe_variants(merged, expert_scale):
    g, gf = _gemma_synthetic(merged=merged, expert_scale=expert_scale)
    res = fuse_moe.run(g)
    assert res.changed
    out = res.graph
    verify(out)
    (route,), (gemm,) = out.by_op(Op.MOE_ROUTE), out.by_op(Op.MOE_GROUPED_GEMM)
    assert bool(route.attrs.get("expert_scale", False)) == expert_scale and len(route.inputs) == 2 + expert_scale
    assert gemm.attrs.act == "gelu" and gemm.attrs.merged_gate_up == merged
    assert out.node(route.inputs[0].node).op == Op.SCALE and out.node(gemm.inputs[0].node).op == Op.INPUT
    assert len(out) == len(out.weights()) + 4  # input, router scale, route, grouped GEMM
    for T in (1, 19):
        x = np.random.default_rng(T).standard_normal((T, D)).astype(np.float32)
        want = _run(g, gf, x)
        np.testing.assert_allclose(_run(out, gf, x), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_gemma4_expert_scale_read_elsewhere_stays_plain():
    g, _ = _gemma_synthetic(merged=True, expert_scale=True)
    take = next(n for n in g.by_op(Op.TAKE_ALONG) if n.name.endswith("expert_scales"))
    g.set_output("scales", take.out)
    res = fuse_moe.run(g)
    assert not res.changed and "graph output" in res.graph.by_op(Op.TOPK)[0].meta["fuse_moe"]
