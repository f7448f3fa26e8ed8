"""Gemma 4 on the CPU runtime beyond tests/test_models.py (which checks the logits of both fixtures
against llama.cpp and transformers): chunkings that split the 8-token sliding window every way, a
prompt far longer than the window with the ring state staying at window rows, logits="last", and
the plan without passes against the one with them."""
import os

import numpy as np
import pytest

import ggfuse
from util import GEMMA4, fixture, refs, rel_err

pytestmark = pytest.mark.skipif(not os.path.exists(fixture("gemma4-dense")), reason="fixtures not built")


@pytest.mark.parametrize("name", GEMMA4)
def test_every_chunking_gives_the_same_logits(name):
    r = refs(name)
    tokens = r["tokens"]
    whole = ggfuse.load(fixture(name), device="cpu", chunk=512).prefill(tokens)
    assert rel_err(whole, r["hf_f64"]) < 1e-4
    for chunk in (1, 3, 8, 13):   # shorter than, equal to and longer than the window (8) and ring (8 rows)
        m = ggfuse.load(fixture(name), device="cpu", chunk=chunk)
        got = np.concatenate([m.prefill(tokens[:11]), m.prefill(tokens[11:12]), m.prefill(tokens[12:])])
        assert rel_err(got, whole) < 1e-5, chunk
        np.testing.assert_array_equal(got.argmax(-1), whole.argmax(-1))


@pytest.mark.parametrize("name", GEMMA4)
def test_long_prompt_keeps_the_rings_at_window_rows(name):
    m = ggfuse.load(fixture(name), device="cpu", chunk=512)
    hp = m.hparams
    tokens = np.random.default_rng(3).integers(0, hp["n_vocab"], 150)
    whole = m.prefill(tokens)
    for key, state in m.backend.state.items():
        rows = hp["n_swa"] if key.endswith("_ring") else len(tokens)
        assert state.shape[0] == rows, key
    m2 = ggfuse.load(fixture(name), device="cpu", chunk=19)
    assert rel_err(m2.prefill(tokens), whole) < 1e-5
    m2.reset()
    last = m2.prefill(tokens, logits="last")
    assert last.shape == (1, hp["n_vocab"]) and rel_err(last[0], whole[-1]) < 1e-5


@pytest.mark.parametrize("name", GEMMA4)
def test_plain_plan_matches_the_fused_one(name):
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.runtime.api import Model
    from ggfuse.runtime.cpu import CPUBackend
    r = refs(name)
    plain = compile_gguf(fixture(name), chunk=16, passes=[])
    fused = compile_gguf(fixture(name), chunk=16)
    assert len(fused.graph) < len(plain.graph)
    outs = []
    for plan in (plain, fused):
        from ggfuse.compiler.gguf_file import GGUFFile
        gf = GGUFFile(fixture(name))
        outs.append(Model(plan, gf, CPUBackend(plan, gf), 16).prefill(r["tokens"]))
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert rel_err(outs[0], r["llama_f32"]) < 1e-4
