"""Hostile GGUF files never escape (issue 17): each class of bad metadata, bad shapes and absurd
sizes is a one-line GGFuseError naming the file and the key or tensor, found in bounded time and
memory; and a seeded sample of tools/fuzz_gguf.py finds no crash, hang or blow-up."""
from __future__ import annotations

import os
import struct
import sys
import time
import tracemalloc

import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph, compile_gguf
from ggfuse.compiler.gguf_file import MAX_STRING_ARRAY_LEN, MAX_TENSORS, GGUFFile
from ggfuse.errors import GGFuseError, GGUFFormatError
from ggfuse.options import Options
from ggfuse.runtime.tokenizer import Tokenizer
from util import fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import fuzz_gguf as fz  # noqa: E402

I32, U32, F32, BOOL, STR, ARR = fz.I32, fz.U32, fz.F32, fz.BOOL, fz.STR, fz.ARR


def mutant(tmp_path, arch: str, *, keys=None, drop_keys=(), tensors=None, quant: str = "q4_k_m",
           name: str = "m.gguf") -> str:
    """A copy of a fixture with metadata keys set ({key: (vtype, value)}; "@" stands for the
    architecture) or dropped, and the tensor table edited by tensors(doc)."""
    doc = fz.Doc(fixture(arch, quant))
    for key, (vtype, value) in (keys or {}).items():
        key = key.replace("@", doc.arch)
        payload = fz.enc(vtype, value)
        doc.kvs = [kv for kv in doc.kvs if kv[0] != key] + [[key, vtype, payload]]
    drop = {k.replace("@", doc.arch) for k in drop_keys}
    doc.kvs = [kv for kv in doc.kvs if kv[0] not in drop]
    if tensors is not None:
        tensors(doc)
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(doc.to_bytes())
    return path


def rejects(path: str, *words: str, fn=None, cls=GGFuseError) -> str:
    fn = fn or (lambda: compile_gguf(path, target="cpu"))
    with pytest.raises(cls) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ---- metadata of the wrong type or range ------------------------------------------------------------

@pytest.mark.parametrize("arch, keys, words", [
    ("qwen35moe", {"@.block_count": (ARR, (U32, [4, 4]))},
     ["'qwen35moe.block_count'", "an array of 2", "expected an integer"]),
    ("qwen3moe", {"@.block_count": (F32, 2.0)}, ["'qwen3moe.block_count'", "the float 2.0", "expected an integer"]),
    ("qwen35moe", {"@.block_count": (U32, 0)}, ["'qwen35moe.block_count' is 0", ">= 1"]),
    ("qwen35moe", {"@.rope.dimension_sections": (I32, 11)},
     ["'qwen35moe.rope.dimension_sections'", "the integer 11", "expected an array of integers"]),
    ("qwen35", {"@.rope.dimension_sections": (ARR, (I32, [1, 2, 3, 4, 5]))},
     ["'qwen35.rope.dimension_sections' has 5 entries"]),
    ("qwen35moe", {"@.ssm.time_step_rank": (U32, 0)}, ["'qwen35moe.ssm.time_step_rank' is 0"]),
    ("qwen3next", {"@.ssm.group_count": (U32, 0)}, ["'qwen3next.ssm.group_count' is 0"]),
    ("qwen35moe", {"@.ssm.inner_size": (U32, 7)}, ["'qwen35moe.ssm.inner_size' (7)", "time_step_rank"]),
    ("qwen35moe", {"@.rope.dimension_count": (U32, 4096)}, ["'qwen35moe.rope.dimension_count' is 4096", "<="]),
    ("qwen3moe", {"@.rope.dimension_count": (I32, -4)}, ["'qwen3moe.rope.dimension_count' is -4"]),
    ("qwen3moe", {"@.rope.dimension_count": (U32, 7)}, ["'qwen3moe.rope.dimension_count' is 7", "even"]),
    ("gemma4-dense", {"@.rope.dimension_count_swa": (I32, -2)}, ["'gemma4.rope.dimension_count_swa' is -2"]),
    ("qwen3moe", {"@.attention.layer_norm_rms_epsilon": (F32, float("nan"))},
     ["'qwen3moe.attention.layer_norm_rms_epsilon' is nan", "finite"]),
    ("qwen3moe", {"@.rope.freq_base": (F32, -1.0)}, ["'qwen3moe.rope.freq_base' is -1.0", "> 0.0"]),
    ("qwen3moe", {"@.rope.scaling.type": (U32, 1)}, ["'qwen3moe.rope.scaling.type'", "expected a string"]),
    ("qwen3moe", {"@.attention.head_count_kv": (U32, 0)}, ["head_count_kv", "at least one KV head"]),
    ("qwen3moe", {"@.expert_used_count": (U32, 99)}, ["'qwen3moe.expert_used_count' is 99"]),
    ("qwen3moe", {"@.attention.head_count": (ARR, (U32, [4]))}, ["'qwen3moe.attention.head_count' has 1 entries"]),
    ("qwen35moe", {"@.attention.recurrent_layers": (ARR, (BOOL, [True]))},
     ["'qwen35moe.attention.recurrent_layers' has 1 entries"]),
    ("qwen35moe", {"@.attention.recurrent_layers": (ARR, (I32, [1, 1, 1, 0]))},
     ["'qwen35moe.attention.recurrent_layers'", "expected an array of booleans"]),
    ("qwen35", {"@.feed_forward_length": (ARR, (I32, [64]))}, ["'qwen35.feed_forward_length' has 1 entries"]),
    ("gemma4-moe", {"@.attention.head_count_kv": (ARR, (I32, [2, -1]))},
     ["'gemma4.attention.head_count_kv' has an entry that is -1"]),
    ("gemma4-dense", {"@.attention.sliding_window_pattern": (ARR, (STR, ["a", "b", "c", "d"]))},
     ["'gemma4.attention.sliding_window_pattern'", "expected an array of booleans"]),
    ("gemma4-dense", {"@.final_logit_softcapping": (STR, "10")}, ["'gemma4.final_logit_softcapping'", "a number"]),
])
def test_metadata_type_and_range(tmp_path, arch, keys, words):
    rejects(mutant(tmp_path, arch, keys=keys), *words)


def test_missing_key_is_named(tmp_path):
    rejects(mutant(tmp_path, "qwen35moe", drop_keys=["@.ssm.state_size"]),
            "missing required metadata key 'qwen35moe.ssm.state_size'")


@pytest.mark.parametrize("keys, words", [
    ({"tokenizer.ggml.tokens": (U32, 7)}, ["'tokenizer.ggml.tokens'", "the integer 7", "array of strings"]),
    ({"tokenizer.ggml.tokens": (ARR, (I32, [1, 2]))}, ["'tokenizer.ggml.tokens'", "array of strings"]),
    ({"tokenizer.ggml.token_type": (STR, "x")}, ["'tokenizer.ggml.token_type'", "array of integers"]),
    ({"tokenizer.ggml.merges": (ARR, (U32, [1]))}, ["'tokenizer.ggml.merges'", "array of strings"]),
    ({"tokenizer.ggml.add_bos_token": (STR, "yes")}, ["'tokenizer.ggml.add_bos_token'", "a boolean"]),
    ({"tokenizer.ggml.eos_token_id": (F32, 1.5)}, ["'tokenizer.ggml.eos_token_id'", "an integer"]),
    ({"tokenizer.ggml.model": (ARR, (STR, ["gpt2"]))}, ["'tokenizer.ggml.model'", "a string"]),
    ({"tokenizer.chat_template": (U32, 3)}, ["'tokenizer.chat_template'", "a string"]),
])
def test_tokenizer_metadata(tmp_path, keys, words):
    path = mutant(tmp_path, "qwen35moe", keys=keys)
    rejects(path, *words, fn=lambda: Tokenizer.from_gguf(path))


def test_vocab_of_the_wrong_type(tmp_path):
    """`ggfuse run` prints the top tokens from the vocabulary: an integer there is an error, not
    an index into an int."""
    path = mutant(tmp_path, "qwen3moe", keys={"tokenizer.ggml.tokens": (U32, 7)})
    rejects(path, "'tokenizer.ggml.tokens'", fn=lambda: GGUFFile(path).vocab())


def test_infer_error_names_the_file(tmp_path, monkeypatch):
    from ggfuse.compiler import driver
    from ggfuse.ir.ops import InferError

    def bad(gf):
        raise InferError("reshape of 12 elements into (5,)")
    monkeypatch.setitem(driver.FRONTENDS, "qwen3moe", bad)
    path = fixture("qwen3moe", "q4_k_m")
    rejects(path, "qwen3moe graph does not fit", "reshape of 12", fn=lambda: build_graph(GGUFFile(path)))


# ---- shapes ---------------------------------------------------------------------------------------

def _tensor(doc, name):
    return next(t for t in doc.tis if t[0] == name)


def test_stacked_experts_with_a_trailing_one(tmp_path):
    path = mutant(tmp_path, "qwen3moe", tensors=lambda d: _tensor(d, "blk.0.ffn_gate_exps.weight")[1].append(1))
    rejects(path, "tensor 'blk.0.ffn_gate_exps.weight' has shape (1, ")


def test_vectors_keep_llamacpp_trailing_ones(tmp_path):
    """llama.cpp accepts a trailing ne of 1 on a norm ([D] stored as [1, D]); so do we."""
    path = mutant(tmp_path, "qwen3moe", tensors=lambda d: _tensor(d, "output_norm.weight")[1].append(1))
    build_graph(GGUFFile(path))


@pytest.mark.parametrize("missing", ["ffn_up_shexp", "ffn_gate_inp_shexp", "ffn_down_shexp"])
def test_missing_shared_expert_tensor(tmp_path, missing):
    name = f"blk.1.{missing}.weight"
    path = mutant(tmp_path, "qwen35moe", tensors=lambda d: d.tis.remove(_tensor(d, name)))
    rejects(path, f"missing tensor '{name}'", "shared expert")


@pytest.mark.parametrize("how", ["alias", "overlap"])
def test_overlapping_tensor_data(tmp_path, how):
    def edit(doc):
        a, b = doc.tis[0], doc.tis[1]
        b[3] = a[3] if how == "alias" else a[3] + doc.alignment
    path = mutant(tmp_path, "qwen3moe", tensors=edit)
    rejects(path, "share bytes", fn=lambda: GGUFFile(path))


def _poison(doc, name, value=b"\x00\x00\xc0\x7f"):
    """Write an f32 NaN (F32 tensors) into a tensor's first element."""
    t = _tensor(doc, name)
    assert t[2] == 0, "an F32 tensor"
    doc.data[t[3]:t[3] + 4] = value


def test_nan_in_a_small_tensor_by_default(tmp_path):
    path = mutant(tmp_path, "qwen3moe", quant="f32", tensors=lambda d: _poison(d, "blk.1.attn_norm.weight"))
    rejects(path, "tensor 'blk.1.attn_norm.weight' holds NaN")


def test_inf_in_a_big_tensor_with_check_tensors_all(tmp_path):
    big = "blk.0.ffn_up_exps.weight"
    path = mutant(tmp_path, "qwen3moe", quant="f32",
                  tensors=lambda d: _poison(d, big, b"\x00\x00\x80\x7f"))
    from ggfuse.compiler.check_tensors import is_small
    assert not is_small(GGUFFile(path).tensor(big))
    compile_gguf(path, target="cpu")                       # the default checks small tensors only
    rejects(path, f"tensor '{big}' holds infinite", fn=lambda: compile_gguf(path, target="cpu",
                                                                            check_tensors="all"))


def test_nan_logits_are_one_line_not_sampled(tmp_path, capsys):
    """A NaN the default check does not read (a big expert weight) makes the logits NaN: `ggfuse
    run` and generation stop with one line naming the file instead of printing or sampling them."""
    import ggfuse
    from ggfuse.compiler import cli
    from ggfuse.runtime.generate import check_finite
    big = "blk.0.ffn_up_exps.weight"
    path = mutant(tmp_path, "qwen3moe", quant="f32", tensors=lambda d: _poison(d, big, b"\x00\x00\xc0\x7f"))
    m = ggfuse.load(path, device="cpu", chunk=16)
    logits = m.prefill(list(range(1, 9)), logits="last")[-1]
    if np.isfinite(logits).all():
        pytest.skip("the poisoned element met no token here")
    rejects(path, "NaN or Inf", "--check-tensors all", fn=lambda: check_finite(m, logits))
    assert cli.main(["run", path, "--tokens", ",".join(map(str, range(1, 9))), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "NaN or Inf" in err[-1] and path in err[-1]


def test_nan_scale_in_a_quantised_block(tmp_path):
    def edit(doc):
        t = _tensor(doc, "blk.0.attn_q.weight")
        assert t[2] in (8, 12, 14)                             # Q8_0 / Q4_K / Q6_K: an f16 scale
        at = t[3] + (0 if t[2] in (8, 12) else 208)            # Q6_K keeps d after its 208 bytes
        doc.data[at:at + 2] = b"\x00\x7e"
    path = mutant(tmp_path, "qwen3moe", quant="q8_0", tensors=edit)
    rejects(path, "'blk.0.attn_q.weight' holds NaN", fn=lambda: compile_gguf(path, target="cpu",
                                                                             check_tensors="all"))


def test_check_tensors_option():
    assert Options().check_tensors == "small" and Options.make(check_tensors="ALL").check_tensors == "all"
    with pytest.raises(GGFuseError, match="option check_tensors: 'some' is not one of small, all"):
        Options.make(check_tensors="some")
    plan = compile_gguf(fixture("qwen3moe", "q4_k_m"), target="cpu", check_tensors="all")
    assert plan.options["check_tensors"] == "all"


# ---- resources: bounded by the file, no Python object per element ------------------------------------

def _write_sparse(path, head: bytes, tail_zeros: int) -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + tail_zeros)         # zeros: empty strings, without writing them


def _header(n_tensors, kvs: list[bytes], more: int = 0) -> bytes:
    """Header and metadata; `more`: entries that the caller writes after these."""
    return struct.pack("<IIQQ", fz.GGUF_MAGIC, 3, n_tensors, len(kvs) + more) + b"".join(kvs)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _timed(fn):
    t0 = time.perf_counter()
    try:
        fn()
    except GGFuseError as e:
        return time.perf_counter() - t0, e
    return time.perf_counter() - t0, None


def test_2_24_empty_strings(tmp_path):
    """The issue's 135 MB file: 2^24 empty strings (88 s and 6.2 GB before): refused at once."""
    n = 1 << 24
    path = str(tmp_path / "strings.gguf")
    _write_sparse(path, _header(0, [_kv("general.architecture", STR, fz.enc(STR, "qwen3moe"))], more=1)
                  + struct.pack("<Q", 4) + b"toks" + struct.pack("<IIQ", ARR, STR, n), 8 * n)
    dt, err = _timed(lambda: GGUFFile(path))
    assert err is not None and dt < 1.0
    assert f"claims {n} STRING items" in str(err) and str(err).startswith(path)


def test_strings_under_the_limit_open_quickly(tmp_path):
    n = MAX_STRING_ARRAY_LEN
    path = str(tmp_path / "strings.gguf")
    _write_sparse(path, _header(0, [_kv("general.architecture", STR, fz.enc(STR, "qwen3moe"))], more=1)
                  + struct.pack("<Q", 4) + b"toks" + struct.pack("<IIQ", ARR, STR, n), 8 * n)
    dt, err = _timed(lambda: GGUFFile(path))
    assert err is None and dt < 10.0, dt               # ~0.3 s on an idle core


def test_numeric_array_is_not_boxed(tmp_path):
    n = 1 << 24
    path = str(tmp_path / "ints.gguf")
    _write_sparse(path, _header(0, [_kv("general.architecture", STR, fz.enc(STR, "qwen3moe"))], more=1)
                  + struct.pack("<Q", 4) + b"ints" + struct.pack("<IIQ", ARR, U32, n), 4 * n)
    tracemalloc.start()
    try:
        gf = GGUFFile(path)
        raw = gf.raw_value("ints")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(raw, np.ndarray) and raw.shape == (n,) and peak < 8 << 20, peak


def _many_tensors(path, n):
    names = [f"t{i}".encode() for i in range(n)]
    table = b"".join(struct.pack("<Q", len(nm)) + nm + struct.pack("<IQIQ", 1, 8, 0, 32 * i)
                     for i, nm in enumerate(names))
    head = _header(n, [_kv("general.architecture", STR, fz.enc(STR, "qwen3moe"))]) + table
    head += b"\0" * (-len(head) % 32)
    _write_sparse(path, head, 32 * n)


def test_2_19_one_element_tensors(tmp_path):
    """2^19 tiny tensors (16 s and 1 GB before): over the tensor-count limit, refused at once."""
    path = str(tmp_path / "tensors.gguf")
    _many_tensors(path, 1 << 19)
    dt, err = _timed(lambda: GGUFFile(path))
    assert err is not None and dt < 1.0 and "more than the sanity limit" in str(err), (dt, err)


def test_tensors_under_the_limit_open_quickly(tmp_path):
    path = str(tmp_path / "tensors.gguf")
    _many_tensors(path, MAX_TENSORS)
    dt, err = _timed(lambda: GGUFFile(path))
    assert err is None and dt < 10.0, (dt, err)        # ~1 s on an idle core


def test_nested_arrays_are_refused(tmp_path):
    path = str(tmp_path / "nested.gguf")
    with open(path, "wb") as f:
        f.write(_header(0, [_kv("general.architecture", STR, fz.enc(STR, "qwen3moe")),
                            _kv("x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U32, 0))]))
    rejects(path, "nested arrays", fn=lambda: GGUFFile(path), cls=GGUFFormatError)


# ---- the fuzzer, a seeded sample ---------------------------------------------------------------------

def test_fuzz_sample():
    """A few hundred mutants of the shipped fixtures (tools/fuzz_gguf.py runs >= 10^4)."""
    results = fz.campaign(range(240), seed=1717, workers=2, timeout=30, mem_mb=2048)
    summary = fz.summarize(results)
    bad = [r for r in results if r["outcome"] in fz.FAILURES]
    assert not bad, bad[:5]
    assert summary["clean"] > 100 and summary["ok"] > 20, summary
