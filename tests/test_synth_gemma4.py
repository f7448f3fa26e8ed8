"""The Gemma 4 synth presets (compiler/synth_gemma4.py): their numbers, tensor tables and type mixes
rebuilt here from the published configs and llama.cpp's rules (independently of the writer), the
E2B table against the published Q4_K_M file's, files written and read back, ggfuse compiling every
preset at full depth and running a few tokens on layer-reduced files, and (where llama-cpp-python
is installed) llama.cpp loading and running them, with logits close to ggfuse's."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
from gguf import GGUFReader

import ggfuse
from ggfuse.compiler import synth
from ggfuse.compiler.driver import build_graph, compile_gguf
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.errors import UnsupportedError
from ggfuse.ir.ops import Op

GEMMA = [n for n, p in synth.PRESETS.items() if p.arch == "gemma4"]
VOCAB, EXPERTS = 1024, 16
T = namedtuple("T", "name ne type")


def test_presets_are_registered_with_their_numbers():
    assert GEMMA == ["gemma4-e2b", "gemma4-e4b", "gemma4-31b", "gemma4-26b-a4b"]
    p = synth.PRESETS["gemma4-e2b"]
    assert (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim, p.head_dim_full) == (35, 1536, 8, 1, 256, 512)
    assert (p.n_ff, p.double_wide_mlp, p.n_kv_shared, p.n_embd_per_layer, p.sliding_window) == (6144, True, 20, 256, 512)
    assert (p.full_every, p.context_length, p.n_vocab, p.k_eq_v) == (5, 131072, 262144, False)
    p = synth.PRESETS["gemma4-e4b"]
    assert (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.n_ff, p.double_wide_mlp) == (42, 2560, 8, 2, 10240, False)
    assert (p.n_kv_shared, p.n_embd_per_layer, p.sliding_window, p.full_every) == (18, 256, 512, 6)
    p = synth.PRESETS["gemma4-31b"]
    assert (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.n_head_kv_full, p.n_ff) == (60, 5376, 32, 16, 4, 21504)
    assert (p.k_eq_v, p.n_kv_shared, p.n_embd_per_layer, p.sliding_window, p.context_length) == (True, 0, 0, 1024, 262144)
    p = synth.PRESETS["gemma4-26b-a4b"]
    assert (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.n_head_kv_full, p.n_ff) == (30, 2816, 16, 8, 2, 2112)
    assert (p.n_expert, p.n_expert_used, p.n_ff_exp, p.k_eq_v, p.sliding_window) == (128, 8, 704, True, 1024)
    for name in GEMMA:
        p = synth.PRESETS[name]
        assert (p.rope_theta, p.rope_theta_swa, p.partial_rotary_full, p.rms_eps, p.softcap) == (1e6, 1e4, 0.25, 1e-6, 30.0)


def _sparse_kv(tmp_path, preset, **kw) -> dict:
    """The metadata of a written file (sparse: header and tensor table only)."""
    path = tmp_path / f"{preset}-kv.gguf"
    synth.write_synth(preset, "q4_k_m", path, sparse=True, progress=False, **kw)
    gf = GGUFFile(path)
    kv = {k: gf.key(k) for k in gf.keys() if not k.startswith("tokenizer.")}
    gf.close()
    return kv


# llama.cpp ships the real 26B-A4B's GGUF header (no tensors) as its gemma-4 tokenizer test file
LLAMA_CPP_VOCAB = os.environ.get("GGFUSE_LLAMA_CPP_DIR", "/work/llama_cpp_python-0.3.36/vendor/llama.cpp") + \
    "/models/ggml-vocab-gemma-4.gguf"


@pytest.mark.slow   # opening the header parses its 514906 merges (half a minute)
@pytest.mark.skipif(not os.path.exists(LLAMA_CPP_VOCAB), reason="llama.cpp source tree not here")
def test_26b_a4b_matches_the_header_llama_cpp_ships(tmp_path):
    r = GGUFFile(LLAMA_CPP_VOCAB)
    ours = _sparse_kv(tmp_path, "gemma4-26b-a4b", vocab=VOCAB)
    for key in r.keys():
        if key.startswith("gemma4."):
            want = r.key(key)
            assert ours[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert {k for k in ours if k.startswith("gemma4.")} == {k for k in r.keys() if k.startswith("gemma4.")}


# ---- the tables, rebuilt from the rules ----------------------------------------------------------

def expected_tensors(p, n_layer, n_vocab, n_expert, quant):
    """(name, ggml ne, type) in llama-quantize's order, for convert_hf_to_gguf (from an F16 conversion)
    followed by llama-quantize of the first n_layer layers of preset p."""
    E, P, H = p.n_embd, p.n_embd_per_layer, p.n_head
    base = {"q4_k_m": "Q4_K", "q8_0": "Q8_0", "bf16": "BF16", "f32": "F32"}[quant]
    q4, quantized = quant == "q4_k_m", quant in ("q4_k_m", "q8_0")
    n_own = p.n_layer - p.n_kv_shared
    swa = [(il + 1) % p.full_every != 0 for il in range(n_layer)]
    hd = [p.head_dim if s else p.head_dim_full for s in swa]
    hkv = [p.n_head_kv if s or not p.n_head_kv_full else p.n_head_kv_full for s in swa]
    ff = [p.n_ff * (2 if p.double_wide_mlp and il >= n_own else 1) for il in range(n_layer)]
    has_v = [s or not p.k_eq_v for s in swa]
    n_v = sum(has_v)

    def more_bits(i, n):
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def fit(t, ne0):   # llama-quantize's fallback for rows that are not a multiple of 256
        if quantized and t in ("Q4_K", "Q6_K") and ne0 % 256:
            return {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[t]
        return t

    embd = fit("Q6_K", E) if q4 else base    # tied: the token embeddings take the output's type
    glob = [T("token_embd.weight", (E, n_vocab), embd), T("output_norm.weight", (E,), "F32")]
    if not all(swa):
        glob.append(T("rope_freqs.weight", (p.head_dim_full // 2,), "F32"))
    if P:
        glob += [T("per_layer_token_embd.weight", (P * n_layer, n_vocab), fit("Q6_K", P * n_layer) if q4 else base),
                 T("per_layer_model_proj.weight", (E, P * n_layer), "F16" if quantized else base),
                 T("per_layer_proj_norm.weight", (P,), "F32")]
    out = sorted(glob)
    i_v = 0
    for il in range(n_layer):
        b, d = f"blk.{il}.", hd[il]
        down = fit("Q6_K" if q4 and more_bits(il, n_layer) else base, ff[il])
        ts = [T(b + "attn_norm.weight", (E,), "F32"), T(b + "attn_q.weight", (E, H * d), fit(base, E)),
              T(b + "attn_k.weight", (E, hkv[il] * d), fit(base, E)), T(b + "attn_k_norm.weight", (d,), "F32"),
              T(b + "attn_output.weight", (H * d, E), fit(base, H * d)), T(b + "attn_q_norm.weight", (d,), "F32"),
              T(b + "post_attention_norm.weight", (E,), "F32"), T(b + "layer_output_scale.weight", (1,), "F32"),
              T(b + "ffn_norm.weight", (E,), "F32"), T(b + "ffn_gate.weight", (E, ff[il]), fit(base, E)),
              T(b + "ffn_up.weight", (E, ff[il]), fit(base, E)), T(b + "ffn_down.weight", (ff[il], E), down),
              T(b + "post_ffw_norm.weight", (E,), "F32")]
        if has_v[il]:
            ts.append(T(b + "attn_v.weight", (E, hkv[il] * d), fit("Q6_K" if q4 and more_bits(i_v, n_v) else base, E)))
            i_v += 1
        if n_expert:
            fe = p.n_ff_exp
            down_exps = fit("Q6_K" if q4 and more_bits(il, n_layer) else base, fe)
            ts += [T(b + "ffn_gate_inp.weight", (E, n_expert), "F32"), T(b + "ffn_gate_inp.scale", (E,), "F32"),
                   T(b + "pre_ffw_norm_2.weight", (E,), "F32"), T(b + "post_ffw_norm_1.weight", (E,), "F32"),
                   T(b + "post_ffw_norm_2.weight", (E,), "F32"),
                   T(b + "ffn_gate_up_exps.weight", (E, 2 * fe, n_expert), fit(base, E)),
                   T(b + "ffn_down_exps.weight", (fe, E, n_expert), down_exps),
                   T(b + "ffn_down_exps.scale", (n_expert,), "F32")]
        if P:
            ts += [T(b + "inp_gate.weight", (E, P), fit(base, E)), T(b + "proj.weight", (P, E), fit(base, P)),
                   T(b + "post_norm.weight", (E,), "F32")]
        out += sorted(ts)
    if quant == "f32":
        out = [t._replace(type="F32") for t in out]
    return out


@pytest.mark.parametrize("preset", GEMMA)
def test_full_size_tables(preset):
    p = synth.PRESETS[preset]
    for quant in ("q4_k_m", "q8_0"):
        d = synth.describe(preset, quant)
        assert [T(n, tuple(ne), t) for n, ne, t in d["tensors"]] == expected_tensors(p, p.n_layer, p.n_vocab,
                                                                                     p.n_expert, quant)


def test_e2b_matches_the_published_q4_k_m():
    """A llama.cpp load log of the published gemma-4-E2B-it-Q4_K_M.gguf: 601 tensors, 4.65 B
    parameters, these 17 tensors in every layer (the KV-shared ones keep their K/V) and 6 others."""
    d = synth.describe("gemma4-e2b", "q4_k_m")
    assert d["n_tensors"] == 601 and round(d["n_params"] / 1e9, 2) == 4.65
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "post_attention_norm", "layer_output_scale", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
                 "post_ffw_norm", "inp_gate", "proj", "post_norm"}
    names = [n for n, _, _ in d["tensors"]]
    for il in (0, 14, 15, 34):
        assert {n.split(".")[2] for n in names if n.startswith(f"blk.{il}.")} == per_layer
    assert {n for n in names if not n.startswith("blk.")} == {
        "token_embd.weight", "per_layer_token_embd.weight", "per_layer_model_proj.weight",
        "per_layer_proj_norm.weight", "output_norm.weight", "rope_freqs.weight"}
    # the 26B-A4B's 704-row experts and 2112-row dense FFN are 32-block types, as the issue says
    types = {t for n, _, t in synth.describe("gemma4-26b-a4b", "q4_k_m")["tensors"] if "ffn_down" in n and "scale" not in n}
    assert types == {"Q5_0", "Q8_0"}


def test_layers_keep_the_real_first_layers(tmp_path):
    p = synth.PRESETS["gemma4-e2b"]
    d = synth.describe("gemma4-e2b", "q4_k_m", layers=17, vocab=VOCAB)
    assert [T(n, tuple(ne), t) for n, ne, t in d["tensors"]] == expected_tensors(p, 17, VOCAB, 0, "q4_k_m")
    kv = _sparse_kv(tmp_path, "gemma4-e2b", layers=17, vocab=VOCAB)
    assert kv["gemma4.attention.shared_kv_layers"] == 2          # layers 15 and 16 share, as in the real model
    assert kv["gemma4.feed_forward_length"] == [6144] * 15 + [12288] * 2
    with pytest.raises(UnsupportedError, match="layers must be in 1..35"):
        synth.describe("gemma4-e2b", "q4_k_m", layers=36)
    with pytest.raises(UnsupportedError, match="dense"):
        synth.describe("gemma4-31b", "q4_k_m", experts=4)


# ---- files ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_depth(tmp_path_factory):
    """Every preset at full depth and real shapes but a 1024-token vocabulary (the real one takes
    half a minute to parse), header and tensor table only (sparse data)."""
    d = tmp_path_factory.mktemp("gemma4-full")
    out = {}
    for name in GEMMA:
        out[name] = d / f"{name}.gguf"
        synth.write_synth(name, "q4_k_m", out[name], sparse=True, progress=False, vocab=VOCAB)
    return out


@pytest.mark.parametrize("preset", GEMMA)
def test_full_depth_file_reads_back_and_compiles(full_depth, preset):
    p = synth.PRESETS[preset]
    path = full_depth[preset]
    r = GGUFReader(path)
    assert [T(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors] == \
        expected_tensors(p, p.n_layer, VOCAB, p.n_expert, "q4_k_m")
    gf = GGUFFile(path)
    assert gf.vocab()[106] == "<turn|>" and gf.key("tokenizer.ggml.eos_token_id") == 106
    assert gf.key("tokenizer.ggml.model") == "gemma4" and len(gf.vocab()) == VOCAB
    g = build_graph(gf)
    hp = g.meta["hparams"]
    L, n_own = p.n_layer, p.n_layer - p.n_kv_shared
    assert hp["sliding"] == [(il + 1) % p.full_every != 0 for il in range(L)]
    last_own = {kind: max(il for il in range(n_own) if hp["sliding"][il] == kind) for kind in (True, False)}
    assert hp["kv_source"] == [il if il < n_own else last_own[hp["sliding"][il]] for il in range(L)]
    if preset == "gemma4-e2b":   # llama.cpp's reuse map: sliding -> 13, full -> 14
        assert set(hp["kv_source"][15:]) == {13, 14}
    assert len(g.by_op(Op.ATTENTION_WINDOW)) == sum(hp["sliding"])
    plan = compile_gguf(str(path), chunk=512, gf=gf)
    assert plan.stats["flops_per_chunk"] > 0
    if p.n_expert:
        assert len(plan.graph.by_op(Op.MOE_ROUTE)) == L
    gf.close()


def test_rope_freqs_and_vocab_of_a_written_file(tmp_path):
    path = tmp_path / "e2b.gguf"
    synth.write_synth("gemma4-e2b", "q8_0", path, layers=5, vocab=VOCAB, progress=False)   # layer 4 is full
    gf = GGUFFile(path)
    ff = gf.dequantize("rope_freqs.weight")
    assert ff.shape == (256,) and (ff[:64] == 1.0).all() and (ff[64:] == np.float32(1e30)).all()
    toks = gf.vocab()
    assert len(toks) == len(set(toks)) == VOCAB
    assert toks[:5] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] and toks[107] == "\n"
    assert toks[238] == "<0x00>" and toks[493] == "<0xFF>"
    for n in ("per_layer_model_proj.weight", "blk.0.attn_q.weight", "per_layer_token_embd.weight"):
        x = gf.dequantize(n)
        assert np.isfinite(x).all() and 0.2 / np.sqrt(x.shape[-1]) < x.std() < 1.5 / np.sqrt(x.shape[-1]) or \
            n == "per_layer_token_embd.weight", n
    assert gf.tensor("per_layer_model_proj.weight").type_name == "F16"


# layer-reduced files with real data, as small as still says something: the numpy runtime
# dequantises every weight (~40 M values/s), so the E2B's first full layer (layer 4) is the only
# one run at real width here; the fixtures cover the others at small width
RUN_LAYERS = {"gemma4-e2b": 5, "gemma4-e4b": 2, "gemma4-31b": 1, "gemma4-26b-a4b": 2}
TOKENS = [2, 5, 77, 300, 9, 400]


def _reduced(tmp_path, preset, layers, experts=4):
    kw = dict(layers=layers, vocab=VOCAB)
    if synth.PRESETS[preset].n_expert:
        kw["experts"] = experts
    path = tmp_path / f"{preset}.gguf"
    synth.write_synth(preset, "q4_k_m", path, progress=False, **kw)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preset", GEMMA)
def test_cpu_runs_a_few_tokens(tmp_path, preset):
    path = _reduced(tmp_path, preset, RUN_LAYERS[preset])
    m = ggfuse.load(str(path), device="cpu", chunk=4)    # 4 splits the prompt: state carried over
    out = m.prefill(TOKENS)
    assert out.shape == (len(TOKENS), VOCAB) and np.isfinite(out).all()
    assert 0.05 < out.std() < 30 and np.abs(out).max() <= 30.0    # the soft-cap bounds them
    # llama.cpp's KV reuse map wants two layers with their own KV (llama-model.cpp:2782)
    if importlib.util.find_spec("llama_cpp") is not None and RUN_LAYERS[preset] >= 2:
        ref = _llama_logits(path, TOKENS)
        assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.95   # llama.cpp quantises activations
        assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


LLAMA_RUN = r"""
import sys, numpy as np, llama_cpp
path, out_path, toks = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params(); mp.n_gpu_layers = 0; mp.use_extra_bufts = False
model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
assert model, "load failed"
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = 64; cp.n_batch = 64; cp.n_ubatch = 64; cp.n_seq_max = 1; cp.n_threads = 2; cp.n_threads_batch = 2
cp.type_k = 0; cp.type_v = 0
ctx = llama_cpp.llama_init_from_model(model, cp)
batch = llama_cpp.llama_batch_init(len(toks), 0, 1)
for i, t in enumerate(toks):
    batch.token[i] = t; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1
batch.n_tokens = len(toks)
assert llama_cpp.llama_decode(ctx, batch) == 0
nv = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
np.save(out_path, np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(nv,)).copy()
                            for i in range(len(toks))]))
"""


def _llama_logits(path, tokens):
    """llama.cpp's logits in a subprocess (a fault there must not take the test run down)."""
    out = str(path) + ".npy"
    r = subprocess.run([sys.executable, "-c", LLAMA_RUN, str(path), out, ",".join(map(str, tokens))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("preset", GEMMA)
def test_llama_cpp_loads_and_runs(tmp_path, preset):
    # with its first full-attention layer (layer 4 or 5)
    path = _reduced(tmp_path, preset, synth.PRESETS[preset].full_every, experts=EXPERTS)
    logits = _llama_logits(path, TOKENS)
    assert logits.shape == (len(TOKENS), VOCAB) and np.isfinite(logits).all() and 0.05 < logits.std() < 30
