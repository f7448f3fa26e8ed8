"""rewrite_deltanet_chunked: structure on every architecture's real graph, and logits unchanged."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.ops import Op
from ggfuse.ir.serialize import dumps
from ggfuse.ir.verify import verify
from ggfuse.passes import rewrite_deltanet_chunked
from util import ARCHS, fixture, rel_err, run_graph

HYBRID = ("qwen35moe", "qwen35", "qwen3next")


@functools.lru_cache(maxsize=None)
def _load(arch: str):
    path = fixture(arch, "f32")
    if not os.path.exists(path):
        pytest.skip(f"fixture {path} not built yet")
    gf = GGUFFile(path)
    return gf, build_graph(gf)


@pytest.mark.parametrize("arch", ARCHS)
def test_structure(arch):
    _, g = _load(arch)
    before = dumps(g)
    n_deltanet = sum(g.meta["hparams"]["recurrent"])
    res = rewrite_deltanet_chunked.run(g, chunk=16)
    out = res.graph
    verify(out)
    assert dumps(g) == before, "the pass mutated its input graph"
    assert res.changed == (n_deltanet > 0)
    assert not out.by_op(Op.GATED_DELTA_RULE)
    chunked = out.by_op(Op.CHUNK_GATED_DELTA_RULE)
    assert len(chunked) == n_deltanet
    for n in chunked:
        assert n.attrs.chunk == 16 and {"scale", "head_map"} <= set(n.attrs)
    # Every DeltaNet conv fed only its SiLU: all are fused, the SiLUs are gone, the window
    # state still reaches the graph output.
    assert not out.by_op(Op.SSM_CONV)
    convs = out.by_op(Op.SSM_CONV_SILU)
    assert len(convs) == n_deltanet
    assert len(out.by_op(Op.SILU)) == len(g.by_op(Op.SILU)) - n_deltanet
    for n in convs:
        window = out.node(n.inputs[1].node).attrs.key
        assert out.outputs[window] == n.value(1)
        assert all(u.op != Op.SILU for u, _ in out.uses_of(n.value(0)))
    # Running it again finds nothing to do.
    assert not rewrite_deltanet_chunked.run(out).changed


def test_default_chunk_is_64():
    _, g = _load("qwen35")
    (n,) = rewrite_deltanet_chunked.run(g).graph.by_op(Op.CHUNK_GATED_DELTA_RULE)
    assert n.attrs.chunk == 64


@functools.lru_cache(maxsize=None)
def _baseline(arch: str, run_chunk: int) -> np.ndarray:
    gf, g = _load(arch)
    return run_graph(g, gf, _tokens(g), run_chunk)


def _tokens(g) -> np.ndarray:
    return np.random.default_rng(0).integers(0, g.meta["hparams"]["n_vocab"], 41)


# (ggfuse chunk, DeltaNet chunk): 41 tokens run as 16+16+9 with DeltaNet chunks of 16 (the
# last one short), of 6 (dividing neither), of 64 (longer than any run chunk); and the whole
# prompt at once with DeltaNet chunks 16+16+9.
CHUNKS = [pytest.param(r, c, id=f"run{r}-dn{c}") for r, c in [(16, 16), (16, 6), (16, 64), (41, 16)]]


@pytest.mark.parametrize("run_chunk,dn_chunk", CHUNKS)
@pytest.mark.parametrize("arch", HYBRID)
def test_logits_unchanged(arch, run_chunk, dn_chunk):
    gf, g = _load(arch)
    out = rewrite_deltanet_chunked.run(g, chunk=dn_chunk).graph
    got = run_graph(out, gf, _tokens(g), run_chunk)
    assert rel_err(got, _baseline(arch, run_chunk)) < 1e-5


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen35", "qwen3next"])
def test_gates_fused_one_per_deltanet_layer(arch):
    from ggfuse.compiler.driver import build_graph
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.ir.ops import Op
    from ggfuse.passes import rewrite_deltanet_chunked
    from util import fixture
    g = build_graph(GGUFFile(fixture(arch)))
    out = rewrite_deltanet_chunked.run(g).graph
    n_rec = sum(g.meta["hparams"]["recurrent"])
    assert len(out.by_op(Op.DELTANET_GATES)) == n_rec
    assert not out.by_op(Op.SOFTPLUS)
    for n in out.by_op(Op.CHUNK_GATED_DELTA_RULE):
        assert out.node(n.inputs[3].node).op == Op.DELTANET_GATES
        assert n.inputs[3].node == n.inputs[4].node
