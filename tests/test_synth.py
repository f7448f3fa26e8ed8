"""Tests for compiler/synth.py, the synthetic-GGUF writer.

The expected tensor tables are rebuilt here from the preset numbers and the
llama.cpp rules, written out independently of synth.py's own helpers, so a
mistake in the writer does not silently become the expectation.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quant_shape_to_byte_shape

from ggfuse.compiler import synth
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.errors import GGFuseError, UnsupportedError

# Small shapes for CPU tests: real widths, fewer layers/experts/vocab rows.
LAYERS, VOCAB, EXPERTS = 8, 1024, 16
# The expectations below are the Qwen converter's; the Gemma 4 presets have their own tests
# (tests/test_synth_gemma4.py).
QWEN_PRESETS = [n for n, p in synth.PRESETS.items() if p.arch != "gemma4"]


def small_kwargs(preset: str) -> dict:
    kw = dict(layers=LAYERS, vocab=VOCAB)
    if synth.PRESETS[preset].n_expert:
        kw["experts"] = EXPERTS
    return kw


# --------------------------------------------------------------------------
# The presets carry the published numbers
# --------------------------------------------------------------------------

def test_preset_numbers():
    p = synth.PRESETS["qwen3.5-35b-a3b"]
    assert (p.arch, p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim) == ("qwen35moe", 40, 2048, 16, 2, 256)
    assert (p.n_expert, p.n_expert_used, p.n_ff_exp, p.n_ff_shexp) == (256, 8, 512, 512)
    assert (p.ssm_k_heads, p.ssm_v_heads, p.ssm_k_dim, p.ssm_v_dim, p.ssm_conv_kernel) == (16, 32, 128, 128, 4)
    assert (p.n_vocab, p.rope_theta, p.rms_eps, p.partial_rotary) == (248320, 1e7, 1e-6, 0.25)
    assert p.mrope_sections == (11, 11, 10, 0) and p.full_attention_interval == 4
    p = synth.PRESETS["qwen3-next-80b-a3b"]
    assert (p.arch, p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim) == ("qwen3next", 48, 2048, 16, 2, 256)
    assert (p.n_expert, p.n_expert_used, p.n_ff_exp, p.n_ff_shexp, p.n_vocab) == (512, 10, 512, 512, 151936)
    assert (p.ssm_k_heads, p.ssm_v_heads, p.ssm_k_dim, p.rope_theta) == (16, 32, 128, 1e7)
    p = synth.PRESETS["qwen3-30b-a3b"]
    assert (p.arch, p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim) == ("qwen3moe", 48, 2048, 32, 4, 128)
    assert (p.n_expert, p.n_expert_used, p.n_ff_exp, p.n_vocab, p.rope_theta) == (128, 8, 768, 151936, 1e6)
    p = synth.PRESETS["qwen3.5-9b"]
    assert (p.arch, p.n_layer, p.n_embd, p.n_ff, p.n_head, p.n_head_kv) == ("qwen35", 32, 4096, 12288, 16, 4)


# --------------------------------------------------------------------------
# Independent expectation: what convert_hf_to_gguf.py + llama-quantize write
# --------------------------------------------------------------------------

T = namedtuple("T", "name ne type")


def expected_tensors(p, n_layer, n_vocab, n_expert, quant) -> list[T]:
    """(name, ggml ne, type) for every tensor, in llama-quantize's order."""
    E, hd = p.n_embd, p.head_dim
    hybrid = p.arch in ("qwen35moe", "qwen35", "qwen3next")
    qk, v = p.ssm_k_heads * p.ssm_k_dim, p.ssm_v_heads * p.ssm_v_dim

    def more_bits(i, n):
        return i < n // 8 or i >= (7 * n) // 8 or (i - n // 8) % 3 == 2

    q4 = quant == "q4_k_m"
    # type of every quantizable tensor without a special rule
    base = {"q4_k_m": "Q4_K", "q8_0": "Q8_0", "bf16": "BF16", "f32": "F32"}[quant]
    out = [T("output.weight", (E, n_vocab), "Q6_K" if q4 else base),
           T("output_norm.weight", (E,), "F32"),
           T("token_embd.weight", (E, n_vocab), base)]
    quantized = quant in ("q4_k_m", "q8_0")
    for i in range(n_layer):
        b = f"blk.{i}."
        ts = [T(b + "attn_norm.weight", (E,), "F32")]
        linear = hybrid and (i + 1) % 4 != 0
        v_type = "Q6_K" if q4 and more_bits(i, n_layer) else base
        if quantized and n_expert == 8:
            v_type = "Q8_0"
        if linear:
            ts += [T(b + "attn_qkv.weight", (E, 2 * qk + v), v_type),
                   T(b + "attn_gate.weight", (E, v), base),
                   T(b + "ssm_conv1d.weight", (4, 2 * qk + v), "F32"),
                   T(b + "ssm_dt.bias", (p.ssm_v_heads,), "F32"),
                   T(b + "ssm_a", (p.ssm_v_heads,), "F32"),
                   T(b + "ssm_norm.weight", (p.ssm_v_dim,), "F32"),
                   T(b + "ssm_out.weight", (v, E), base)]
            if p.arch == "qwen3next":
                ts.append(T(b + "ssm_ba.weight", (E, 2 * p.ssm_v_heads), base))
            else:
                ts += [T(b + "ssm_beta.weight", (E, p.ssm_v_heads), base),
                       T(b + "ssm_alpha.weight", (E, p.ssm_v_heads), base)]
        else:
            qd, kvd = p.n_head * hd, p.n_head_kv * hd
            ts += [T(b + "attn_q.weight", (E, 2 * qd if hybrid else qd), base),
                   T(b + "attn_k.weight", (E, kvd), "Q8_0" if quantized and n_expert == 8 else base),
                   T(b + "attn_v.weight", (E, kvd), v_type),
                   T(b + "attn_output.weight", (qd, E), "Q5_K" if q4 and n_expert == 8 else base),
                   T(b + "attn_q_norm.weight", (hd,), "F32"),
                   T(b + "attn_k_norm.weight", (hd,), "F32")]
        ts.append(T(b + ("post_attention_norm.weight" if hybrid else "ffn_norm.weight"), (E,), "F32"))
        down = "Q6_K" if q4 and more_bits(i, n_layer) else base
        if n_expert:
            f = p.n_ff_exp
            ts += [T(b + "ffn_gate_inp.weight", (E, n_expert), "F32"),
                   T(b + "ffn_gate_exps.weight", (E, f, n_expert), base),
                   T(b + "ffn_up_exps.weight", (E, f, n_expert), base),
                   T(b + "ffn_down_exps.weight", (f, E, n_expert), down)]
            if p.arch != "qwen3moe":
                s = p.n_ff_shexp
                ts += [T(b + "ffn_gate_inp_shexp.weight", (E,), "F32"),
                       T(b + "ffn_gate_shexp.weight", (E, s), base),
                       T(b + "ffn_up_shexp.weight", (E, s), base),
                       T(b + "ffn_down_shexp.weight", (s, E), down)]
        else:
            ts += [T(b + "ffn_gate.weight", (E, p.n_ff), base),
                   T(b + "ffn_up.weight", (E, p.n_ff), base),
                   T(b + "ffn_down.weight", (p.n_ff, E), down)]
        out += sorted(ts)
    if quant == "f32":
        out = [t._replace(type="F32") for t in out]
    return out


def expected_kv(p, n_layer, n_vocab, n_expert, quant) -> dict:
    a = p.arch
    kv = {
        "general.architecture": a,
        f"{a}.block_count": n_layer,
        f"{a}.context_length": p.context_length,
        f"{a}.embedding_length": p.n_embd,
        f"{a}.attention.head_count": p.n_head,
        f"{a}.attention.head_count_kv": p.n_head_kv,
        f"{a}.attention.key_length": p.head_dim,
        f"{a}.attention.value_length": p.head_dim,
        f"{a}.rope.freq_base": p.rope_theta,
        f"{a}.attention.layer_norm_rms_epsilon": p.rms_eps,
        "general.file_type": {"f32": 0, "bf16": 32, "q8_0": 7, "q4_k_m": 15}[quant],
        "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen35" if a in ("qwen35", "qwen35moe") else "qwen2",
    }
    if n_expert:
        kv[f"{a}.expert_count"] = n_expert
        kv[f"{a}.expert_used_count"] = min(p.n_expert_used, n_expert)
        kv[f"{a}.expert_feed_forward_length"] = p.n_ff_exp
    if a in ("qwen35moe", "qwen3next"):
        kv[f"{a}.expert_shared_feed_forward_length"] = p.n_ff_shexp
    if a in ("qwen35", "qwen3next", "qwen3moe"):
        kv[f"{a}.feed_forward_length"] = p.n_ff
    if a in ("qwen35", "qwen35moe", "qwen3next"):
        kv.update({
            f"{a}.ssm.conv_kernel": 4, f"{a}.ssm.state_size": 128, f"{a}.ssm.group_count": 16,
            f"{a}.ssm.time_step_rank": 32, f"{a}.ssm.inner_size": 4096,
            f"{a}.full_attention_interval": 4, f"{a}.rope.dimension_count": 64,
        })
    if a in ("qwen35", "qwen35moe"):
        kv[f"{a}.rope.dimension_sections"] = [11, 11, 10, 0]
        kv[f"{a}.attention.recurrent_layers"] = [(i + 1) % 4 != 0 for i in range(n_layer)]
    return kv


# --------------------------------------------------------------------------
# Full-size tables (nothing written)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_full_size_table(preset):
    p = synth.PRESETS[preset]
    d = synth.describe(preset, "q4_k_m")
    exp = expected_tensors(p, p.n_layer, p.n_vocab, p.n_expert, "q4_k_m")
    assert [T(n, tuple(ne), t) for n, ne, t in d["tensors"]] == exp
    sizes = {"Q4_K": (256, 144), "Q6_K": (256, 210), "F32": (1, 4)}
    assert d["tensor_bytes"] == sum(int(np.prod(t.ne)) // sizes[t.type][0] * sizes[t.type][1] for t in exp)


def test_full_size_35b_matches_real_files():
    d = synth.describe("qwen3.5-35b-a3b", "q4_k_m")
    # Published Qwen3.5-35B-A3B Q4_K_M GGUFs: 733 tensors (no MTP block), ~20-22 GB.
    assert d["n_tensors"] == 733
    assert 20e9 < d["tensor_bytes"] < 22e9
    assert set(d["types"]) == {"Q4_K", "Q6_K", "F32"}
    assert 34.5e9 < d["n_params"] < 35e9


# --------------------------------------------------------------------------
# Shortened files on disk
# --------------------------------------------------------------------------

def _types_ok(t: T, x: np.ndarray) -> None:
    assert np.isfinite(x).all(), t.name
    if t.name.endswith("_norm.weight"):
        assert abs(float(x.mean()) - 1.0) < 0.05, t.name
    elif t.name.endswith("ssm_a"):
        assert (x < 0).all() and x.min() >= -16.0001, t.name
    elif t.name.endswith(".weight") and "conv1d" not in t.name:
        fan_in = t.ne[0]
        std = float(x.std())
        # token_embd 0.02, residual outputs 0.5/sqrt(fan_in), the rest 1/sqrt(fan_in)
        assert 0.3 / np.sqrt(fan_in) < std < 1.2 / np.sqrt(fan_in) or t.name == "token_embd.weight", (t.name, std)
        assert abs(float(x.mean())) < 0.1 * std, t.name


@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0", "bf16"])
@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_write_shortened(tmp_path, preset, quant):
    p = synth.PRESETS[preset]
    # 8 layers where the per-layer Q6_K pattern matters, otherwise 4 (still one
    # full-attention layer) to keep the bigger bf16 / q8_0 files quick.
    n_layer = LAYERS if quant == "q4_k_m" else 4
    kw = {**small_kwargs(preset), "layers": n_layer}
    path = tmp_path / "m.gguf"
    s = synth.write_synth(preset, quant, path, progress=False, **kw)
    n_expert = kw.get("experts", 0)
    exp = expected_tensors(p, n_layer, VOCAB, n_expert, quant)

    # gguf's own reader
    r = GGUFReader(path)
    got = [T(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors]
    assert got == exp
    assert s["n_tensors"] == len(exp) and s["bytes"] == path.stat().st_size

    # ggfuse's reader: metadata and tensor table
    g = GGUFFile(path)
    for key, want in expected_kv(p, n_layer, VOCAB, n_expert, quant).items():
        got_v = g.key(key)
        if isinstance(want, float):
            assert got_v == pytest.approx(want, rel=1e-6), key
        else:
            assert got_v == want, key
    assert {n: (t.ne, t.type_name) for n, t in g.tensors.items()} == {t.name: (t.ne, t.type) for t in exp}
    toks = g.vocab()
    assert len(toks) == VOCAB and len(set(toks)) == VOCAB
    assert toks[g.key("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert len(g.key("tokenizer.ggml.token_type")) == VOCAB

    if quant == "q4_k_m":
        # Q6_K exactly where llama-quantize puts it: output, and attn_v/attn_qkv
        # and ffn_down* of layers 0, 3, 6, 7 (use_more_bits for 8 layers).
        q6 = {t.name for t in exp if t.type == "Q6_K"}
        assert "output.weight" in q6
        for i in (0, 3, 6, 7):
            assert any(n.startswith(f"blk.{i}.ffn_down") for n in q6)
            assert any(n.startswith(f"blk.{i}.attn_v") or n.startswith(f"blk.{i}.attn_qkv") for n in q6)
        assert not any(n.startswith(("blk.1.", "blk.2.", "blk.4.", "blk.5.")) for n in q6)
        assert {t.type for t in exp} == {"Q4_K", "Q6_K", "F32"}

    # dequantized data: finite, sane mean/std (every tensor of layers 0 and 3,
    # the first rows of each: plenty of values, and quick)
    for t in exp:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) not in (0, 3):
            continue
        _types_ok(t, _first_rows(g, t.name, 64))
    g.close()


def _first_rows(g: GGUFFile, name: str, n: int) -> np.ndarray:
    info = g.tensor(name)
    qt = GGMLQuantizationType(info.ggml_type)
    rows = g.raw(name).reshape(quant_shape_to_byte_shape(info.shape, qt))
    rows = rows.reshape(-1, rows.shape[-1])[:n]
    return dequantize(rows, qt)


def test_quant_blocks_have_intended_std():
    """Directly generated blocks dequantize (with gguf's reference code) to the std asked for."""
    QT = GGMLQuantizationType
    for qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.Q5_1):
        blocks = synth._gen_blocks(np.random.default_rng(0), qt, 4096, 0.01)
        x = dequantize(blocks, qt)
        assert np.isfinite(x).all()
        assert abs(x.std() - 0.01) < 0.0005, qt.name
        assert abs(x.mean()) < 0.001, qt.name


def test_layers_keep_hybrid_pattern(tmp_path):
    d = synth.describe("qwen3.5-35b-a3b", "q4_k_m", layers=4, vocab=VOCAB, experts=EXPERTS)
    names = [n for n, _, _ in d["tensors"]]
    assert "blk.3.attn_q.weight" in names and "blk.0.attn_qkv.weight" in names
    assert "blk.3.attn_qkv.weight" not in names


def test_experts_8_rules():
    # llama-quantize special-cases 8-expert models (attn_v/attn_k -> Q8_0, attn_output -> Q5_K).
    p = synth.PRESETS["qwen3-30b-a3b"]
    d = synth.describe("qwen3-30b-a3b", "q4_k_m", layers=LAYERS, vocab=VOCAB, experts=8)
    assert [T(n, tuple(ne), t) for n, ne, t in d["tensors"]] == expected_tensors(p, LAYERS, VOCAB, 8, "q4_k_m")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic(tmp_path):
    kw = dict(layers=4, vocab=VOCAB, experts=EXPERTS, progress=False)
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", a, seed=7, **kw)
    synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", b, seed=7, **kw)
    synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", c, seed=8, **kw)
    assert _sha(a) == _sha(b) != _sha(c)
    # a tensor depends only on (seed, name): a shorter file has the same layer 0
    d = tmp_path / "d.gguf"
    synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", d, seed=7, **{**kw, "layers": 2})
    ga, gd = GGUFFile(a), GGUFFile(d)
    assert np.array_equal(ga.raw("blk.0.ffn_up_exps.weight"), gd.raw("blk.0.ffn_up_exps.weight"))


def test_progress_output(tmp_path, capsys):
    seen = []
    synth.write_synth("qwen3-30b-a3b", "q8_0", tmp_path / "m.gguf", layers=1, vocab=VOCAB, experts=EXPERTS,
                      progress=True, progress_cb=lambda done, total: seen.append((done, total)))
    err = capsys.readouterr().err
    assert "synth m.gguf" in err and "MB/s" in err
    assert seen and seen[-1][0] == seen[-1][1]


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(UnsupportedError, match=r"unknown preset 'nope' \(available: .*qwen3.5-35b-a3b"):
        synth.write_synth("nope", "q4_k_m", tmp_path / "x.gguf")
    with pytest.raises(UnsupportedError, match="unknown quant 'q3_k'"):
        synth.write_synth("qwen3-30b-a3b", "q3_k", tmp_path / "x.gguf")
    with pytest.raises(UnsupportedError, match="layers"):
        synth.describe("qwen3-30b-a3b", "q4_k_m", layers=49)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "big.gguf"
    with pytest.raises(GGFuseError, match="not enough disk space") as ei:
        synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", out)
    assert ei.value.path == str(out)
    need = int(re.search(r"needs (\d+) bytes", str(ei.value)).group(1))
    assert need >= synth.describe("qwen3.5-35b-a3b", "q4_k_m")["tensor_bytes"]
    assert not out.exists()


def test_cli(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    synth.add_synth_parser(ap.add_subparsers())
    out = tmp_path / "m.gguf"
    args = ap.parse_args(["synth", "--preset", "qwen3-next-80b-a3b", "--quant", "q8_0", "-o", str(out),
                          "--layers", "4", "--seed", "3", "--vocab", str(VOCAB), "--experts", str(EXPERTS), "--quiet"])
    assert args.fn(args) == 0
    assert "qwen3next 4 layers" in capsys.readouterr().out
    assert GGUFFile(out).arch_key("block_count") == 4


# --------------------------------------------------------------------------
# A real tokenizer: the files take text
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tokenizer():
    from ggfuse.runtime.tokenizer import Tokenizer
    return Tokenizer.from_gguf(synth.QWEN_VOCAB)


@pytest.mark.parametrize("preset, pre, template", [("qwen3.5-35b-a3b", "qwen35", "Qwen3.5-4B.jinja"),
                                                   ("qwen3-30b-a3b", "qwen2", "Qwen-Qwen3-0.6B.jinja")])
def test_full_vocab_is_llama_cpp_qwen_vocab(tmp_path, qwen_tokenizer, preset, pre, template):
    from ggfuse.runtime.tokenizer import Tokenizer
    path = tmp_path / "m.gguf"
    synth.write_synth(preset, "q4_k_m", path, layers=1, sparse=True, progress=False)
    tok = Tokenizer.from_gguf(path)
    p = synth.PRESETS[preset]
    assert tok.n_vocab == p.n_vocab and tok.pre == pre and not tok.add_bos
    assert tok.tokens[:qwen_tokenizer.n_vocab] == qwen_tokenizer.tokens
    assert all(t.startswith("[PAD") for t in tok.tokens[qwen_tokenizer.n_vocab:])
    text = "Hello world, 你好! <|im_start|>user"
    assert tok.encode(text, parse_special=True) == qwen_tokenizer.encode(text, parse_special=True)
    assert tok.tokens[tok.eos_id] == "<|im_end|>" and tok.is_eog(tok.eos_id)
    with open(f"{synth.VOCAB_DIR}/{template}", encoding="utf-8") as f:
        assert tok.chat_template == f.read()


def test_small_vocab_is_a_consistent_cut(tmp_path):
    from ggfuse.runtime.tokenizer import Tokenizer
    path = tmp_path / "m.gguf"
    synth.write_synth("qwen3.5-35b-a3b", "q4_k_m", path, layers=1, vocab=VOCAB, experts=4, progress=False)
    tok = Tokenizer.from_gguf(path)   # every merge names tokens of the cut vocabulary
    assert tok.n_vocab == VOCAB and tok.tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = "def main():\n    print('hi there')  # 日本語"
    ids = tok.encode(text)
    assert max(ids) < VOCAB and len(ids) < len(text.encode()) and tok.decode(ids) == text
    import ggfuse
    m = ggfuse.load(str(path), device="cpu")
    assert len(m.generate("Hello", 3)) <= 3 and isinstance("".join(m.stream("Hello", 3)), str)


def test_tokenizer_from_another_gguf(tmp_path):
    from ggfuse.runtime.tokenizer import Tokenizer
    src = Path(__file__).parent / "fixtures" / "qwen35moe" / "f32.gguf"
    path = tmp_path / "m.gguf"
    synth.write_synth("qwen3-30b-a3b", "q8_0", path, layers=1, vocab=VOCAB, experts=4, progress=False,
                      tokenizer_from=src)
    tok, tiny = Tokenizer.from_gguf(path), Tokenizer.from_gguf(src)
    assert tok.tokens[:tiny.n_vocab] == tiny.tokens and tok.encode("Hello world") == tiny.encode("Hello world")
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model is None"):
        bare = tmp_path / "bare.gguf"
        import gguf
        w = gguf.GGUFWriter(str(bare), "qwen3moe")
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        synth.write_synth("qwen3-30b-a3b", "q8_0", tmp_path / "x.gguf", layers=1, vocab=VOCAB, experts=4,
                          progress=False, tokenizer_from=bare)


# --------------------------------------------------------------------------
# llama.cpp itself loads the files
# --------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_llama_cpp_runs(tmp_path, preset):
    import llama_cpp

    path = tmp_path / "m.gguf"
    kw = {**small_kwargs(preset), "layers": 4}
    synth.write_synth(preset, "q4_k_m", path, progress=False, **kw)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    toks = [5, 77, 300, 9, 400]
    llm.eval(toks)
    logits = np.array(llm.scores[: len(toks)])
    assert np.isfinite(logits).all()
    assert 0.2 < logits.std() < 10.0
