"""Whole-model checks of the CPU reference runtime against llama.cpp and HF transformers.

The fixtures are tiny random models converted by llama.cpp's own converter and quantiser, with
reference logits for every position (tests/fixtures/make_fixtures.py made them). For quantised
files the exact reference is llama.cpp run on an F32 copy of that file, because llama.cpp
quantises activations inside its quantised matmuls.
"""
import os

import numpy as np
import pytest

import ggfuse
from util import MODELS, QUANTS, fixture, refs, rel_err

pytestmark = pytest.mark.skipif(not os.path.exists(fixture("qwen35moe")), reason="fixtures not built")


def _reference(arch, quant):
    r = refs(arch)
    return r, (r["llama_f32"] if quant == "f32" else r[f"llama_{quant}_deq"])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", MODELS)
def test_logits_match_llama_cpp(arch, quant):
    r, ref = _reference(arch, quant)
    m = ggfuse.load(fixture(arch, quant), device="cpu", chunk=512)
    out = m.prefill(r["tokens"])
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4, f"max diff {rel_err(out, ref):.2e} of max |logit|"
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch", MODELS)
def test_f32_logits_match_transformers(arch):
    r = refs(arch)
    m = ggfuse.load(fixture(arch, "f32"), device="cpu")
    out = m.prefill(r["tokens"])
    hf = r["hf_f64"] if "hf_f64" in r else r["hf_f32"]
    assert rel_err(out, hf) < 1e-4, f"max diff {rel_err(out, hf):.2e} of max |logit|"
    np.testing.assert_array_equal(out.argmax(-1), hf.argmax(-1))


@pytest.mark.parametrize("arch", MODELS)
def test_split_calls_and_odd_chunks_give_the_same_logits(arch):
    r = refs(arch)
    tokens = r["tokens"]
    whole = ggfuse.load(fixture(arch, "f32"), device="cpu", chunk=512).prefill(tokens)
    m = ggfuse.load(fixture(arch, "f32"), device="cpu", chunk=7)  # 7 divides no prompt here; Gemma's
    # 8-token windows cross every chunk boundary
    parts = [m.prefill(tokens[:5]), m.prefill(tokens[5:6]), m.prefill(tokens[6:])]
    split = np.concatenate(parts)
    assert rel_err(split, whole) < 1e-5
    m.reset()
    assert rel_err(m.prefill(tokens[:9]), whole[:9]) < 1e-5


@pytest.mark.parametrize("quant", ("q8_0", "q4_k_m"))
def test_distance_to_llama_cpp_on_the_quantised_file_is_reported(quant, record_property):
    """llama.cpp on the quantised file itself quantises activations too; we only report how far
    that is, and check it is in the expected few-percent range rather than a bug-sized gap."""
    for arch in MODELS:
        r, _ = _reference(arch, quant)
        out = ggfuse.load(fixture(arch, quant), device="cpu").prefill(r["tokens"])
        d = rel_err(out, r[f"llama_{quant}"])
        record_property(f"{arch}_{quant}_vs_llama_quantised", d)
        assert d < 0.25, f"{arch} {quant}: {d:.3f} of max |logit| from llama.cpp on the quantised file"


def test_last_logits_only():
    r = refs("qwen35moe")
    m = ggfuse.load(fixture("qwen35moe"), device="cpu", chunk=16)
    all_ = m.prefill(r["tokens"])
    m.reset()
    last = m.prefill(r["tokens"], logits="last")
    assert last.shape == (1, all_.shape[1])
    np.testing.assert_array_equal(last[0], all_[-1])
