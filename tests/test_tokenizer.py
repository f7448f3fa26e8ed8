"""ggfuse.Tokenizer against llama.cpp: its own tokenizer tests (models/ggml-vocab-*.gguf.inp/.out)
and our strings run through llama.cpp's llama_tokenize / llama_detokenize
(tests/fixtures/make_text_fixtures.py made the references), encode and decode both."""
import json
import os
import random

import pytest

from ggfuse.errors import GGFuseError
from ggfuse.runtime.tokenizer import Tokenizer, clean_spaces
from util import FIXTURES, fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(FIXTURES, "text")
QWEN35_VOCAB = os.path.join(ROOT, "compiler", "vocab", "ggml-vocab-qwen35.gguf")
GEMMA4_VOCAB = os.path.join(TEXT, "ggml-vocab-gemma-4-pruned.gguf")
FULL_GEMMA4 = "/work/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"

with open(os.path.join(TEXT, "tokenizer_refs.json")) as _f:
    REFS = json.load(_f)
VOCABS = ("qwen35", "qwen2", "gemma-4", "tiny")


class Override:
    """A GGUF's metadata with some keys replaced (qwen2's vocab file is qwen35's with another
    tokenizer.ggml.pre; the references record that)."""

    def __init__(self, gf, **keys):
        self.gf, self.keys, self.path = gf, keys, gf.path

    def key(self, name, default=None):
        return self.keys[name] if name in self.keys else self.gf.key(name, default)


@pytest.fixture(scope="module")
def qwen35_gguf():
    from ggfuse.compiler.gguf_file import GGUFFile
    return GGUFFile(QWEN35_VOCAB)


@pytest.fixture(scope="module")
def toks(qwen35_gguf):
    """name -> Tokenizer, built on first use."""
    made = {}

    def get(name):
        if name not in made:
            if name == "qwen35":
                made[name] = Tokenizer.from_gguf(qwen35_gguf)
            elif name == "qwen2":
                over = REFS["qwen2"]["same_as"]["except"]
                made[name] = Tokenizer(Override(qwen35_gguf, **over), source=QWEN35_VOCAB)
            elif name == "gemma-4":
                made[name] = Tokenizer.from_gguf(GEMMA4_VOCAB)
            else:
                made[name] = Tokenizer.from_gguf(fixture("qwen35moe"))
        return made[name]
    return get


def llama_cpp_tests(name):
    """test-tokenizer-0's cases: inputs split at the separator line, one output line each."""
    raw = open(os.path.join(TEXT, f"ggml-vocab-{name}.gguf.inp"), "rb").read().decode("utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()
    outputs = open(os.path.join(TEXT, f"ggml-vocab-{name}.gguf.out"), encoding="utf-8").read().split("\n")
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs)]


@pytest.mark.parametrize("name", ["qwen35", "qwen2", "gemma-4"])
def test_llama_cpp_tokenizer_tests(toks, name):
    cases = llama_cpp_tests(name)
    assert len(cases) >= 40
    tok = toks(name)
    bad = [(s, tok.encode(s, add_special=False), want) for s, want in cases if tok.encode(s, add_special=False) != want]
    assert not bad, f"{len(bad)} of {len(cases)} differ, first: {bad[0]}"


def test_pre_tokenizer_is_what_the_file_says(toks):
    assert (toks("qwen35").pre, toks("qwen2").pre, toks("gemma-4").pre, toks("tiny").pre) == \
        ("qwen35", "qwen2", "gemma4", "qwen2")
    # qwen2 and qwen35 really split differently (letter runs take combining marks in qwen35)
    differ = [e["text"] for e in REFS["qwen35"]["encode"]
              if any(e[k] != q[k] for q in REFS["qwen2"]["encode"] if q["text"] == e["text"] for k in ("00",))]
    assert differ


@pytest.mark.parametrize("name", VOCABS)
def test_encode_matches_llama_cpp(toks, name):
    tok = toks(name)
    bad = []
    cases = REFS[name]["encode"]
    for e in cases:
        for key in ("00", "01", "10", "11"):
            got = tok.encode(e["text"], add_special=key[0] == "1", parse_special=key[1] == "1")
            if got != e[key]:
                bad.append((e["text"], key, got, e[key]))
    assert not bad, f"{len(bad)} of {4 * len(cases)} encodings differ, first: {bad[0]}"


@pytest.mark.parametrize("name", VOCABS)
def test_decode_matches_llama_cpp(toks, name):
    tok = toks(name)
    bad = []
    for d in REFS[name]["decode"]:
        want, want_special = bytes.fromhex(d["text"]), bytes.fromhex(d["text_special"])
        if tok.decode_bytes(d["ids"]) != want or tok.decode_bytes(d["ids"], special=True) != want_special:
            bad.append((d["ids"], tok.decode_bytes(d["ids"]), want))
        assert tok.decode(d["ids"]) == want.decode("utf-8", "replace")
    assert not bad, f"{len(bad)} of {len(REFS[name]['decode'])} decodings differ, first: {bad[0]}"


@pytest.mark.parametrize("name", VOCABS)
def test_pieces_eog_and_bos_match_llama_cpp(toks, name):
    tok, ref = toks(name), REFS[name]
    assert tok.n_vocab == ref["n_vocab"]
    assert tok.add_bos == ref["add_bos"]
    assert sorted(tok.eog_ids) == ref["eog"]
    bad = [(int(i), tok.token_to_piece(int(i)), bytes.fromhex(p)) for i, (p, p_plain) in ref["pieces"].items()
           if tok.token_to_piece(int(i)) != bytes.fromhex(p)
           or tok.token_to_piece(int(i), special=False) != bytes.fromhex(p_plain)]
    assert not bad, bad[:5]


def test_the_decode_cases_exercise_the_clean_up(toks):
    """gemma-4 cleans up spaces when decoding, the Qwen vocabularies do not: both kinds of case
    are in the references (so the decode test would catch either being wrong)."""
    assert toks("gemma-4").pretok.clean_spaces and not toks("qwen35").pretok.clean_spaces
    raw = [b"".join(toks("gemma-4").token_to_piece(i, special=False) for i in d["ids"]) for d in REFS["gemma-4"]["decode"]]
    cleaned = [bytes.fromhex(d["text"]) for d in REFS["gemma-4"]["decode"]]
    assert sum(r != c for r, c in zip(raw, cleaned)) >= 5
    assert clean_spaces(b"a , b . it 's x ' y") == b"a, b. it's x'y"


def test_special_and_user_defined_tokens(toks):
    q = toks("qwen35")
    im_start = q.token_to_id["<|im_start|>"]
    # control tokens are text unless parse_special; user-defined ones ([PAD...] here) always match
    assert im_start not in q.encode("<|im_start|>", parse_special=False)
    assert q.encode("<|im_start|>", parse_special=True) == [im_start]
    pad = q.token_to_id["[PAD151650]"]
    assert pad in q.encode("x[PAD151650]y", parse_special=False)
    assert q.decode([im_start]) == "" and q.decode([im_start], special=True) == "<|im_start|>"
    assert q.decode([pad]) == "[PAD151650]"
    assert q.is_eog(q.token_to_id["<|im_end|>"]) and q.is_eog(q.eos_id) and not q.is_eog(im_start)
    g = toks("gemma-4")
    assert g.add_bos and g.encode("hi")[0] == g.bos_id == g.token_to_id["<bos>"]
    assert g.is_eog(g.token_to_id["<turn|>"]) and not g.is_eog(g.token_to_id["</s>"])


@pytest.mark.parametrize("name", ["qwen35", "gemma-4", "tiny"])
def test_stream_decoding_equals_decode_and_never_splits_a_character(toks, name):
    tok = toks(name)
    rng = random.Random(3)
    seqs = [d["ids"] for d in REFS[name]["decode"]]
    seqs += [e["11"] for e in REFS[name]["encode"]]
    for _ in range(100):
        seqs.append([rng.randrange(tok.n_vocab) for _ in range(rng.randint(1, 30))])
    for ids in seqs:
        s = tok.stream()
        pieces = [s.push(i) for i in ids] + [s.flush()]
        full = tok.decode(ids)
        assert "".join(pieces) == full, (ids, pieces, full)
        if "\ufffd" not in full:
            assert all("\ufffd" not in p for p in pieces)


def test_stream_with_clean_up_on_its_trigger_tokens(toks):
    """Random runs of exactly the tokens the clean-up looks at (spaces, apostrophes, s/m/re/ve,
    punctuation), where holding back and settling text matter most."""
    tok = toks("gemma-4")
    pieces = ["\u2581", "'", "s", "m", "re", "ve", ",", ".", "?", "!", "a", "\u2581'", "'s", "\u2581,", "\u2581\u2581"]
    alphabet = [tok.token_to_id[p] for p in pieces if p in tok.token_to_id]
    assert len(alphabet) >= 10
    rng = random.Random(11)
    for _ in range(1500):
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 25))]
        s = tok.stream()
        assert "".join([s.push(i) for i in ids] + [s.flush()]) == tok.decode(ids), ids


def test_stream_holds_back_a_character_until_complete(toks):
    tok = toks("tiny")   # byte tokens: id = byte value + ... (GPT-2 alphabet)
    ids = tok.encode("日本", add_special=False)
    assert len(ids) == 6, ids   # three bytes each, no merges in this vocabulary
    s = tok.stream()
    assert [s.push(i) for i in ids] == ["", "", "日", "", "", "本"]


@pytest.mark.skipif(not os.path.exists(FULL_GEMMA4), reason="llama.cpp's full Gemma 4 vocab is not here")
def test_the_pruned_gemma_vocab_tokenizes_the_test_strings_like_the_full_one(toks):
    full = Tokenizer.from_gguf(FULL_GEMMA4)
    pruned = toks("gemma-4")
    for e in REFS["gemma-4"]["encode"]:
        assert full.encode(e["text"], parse_special=True) == pruned.encode(e["text"], parse_special=True) == e["11"]


def test_model_tokenizer_is_the_gguf_one():
    import ggfuse
    m = ggfuse.load(fixture("qwen35moe"), device="cpu")
    assert isinstance(m.tokenizer, ggfuse.Tokenizer) and m.tokenizer is m.tokenizer
    assert m.tokenizer.n_vocab == m.n_vocab == 320
    assert m.tokenizer.encode("Hello") == Tokenizer.from_gguf(fixture("qwen35moe")).encode("Hello")


# ---- bad input: one-line errors naming the file and the key -----------------------------------------

BASE = {
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
    "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3,
}


@pytest.mark.parametrize("change, words", [
    ({"tokenizer.ggml.model": None}, ["tokenizer.ggml.model", "missing"]),
    ({"tokenizer.ggml.model": "llama"}, ["tokenizer model 'llama'", "not supported", "gpt2"]),
    ({"tokenizer.ggml.pre": "llama-bpe"}, ["pre-tokenizer 'llama-bpe'", "not supported", "qwen35"]),
    ({"tokenizer.ggml.pre": None}, ["tokenizer.ggml.pre", "missing"]),
    ({"tokenizer.ggml.tokens": None}, ["tokenizer.ggml.tokens", "missing"]),
    ({"tokenizer.ggml.tokens": ["a", "b", "ab", "a"]}, ["'a' twice"]),
    ({"tokenizer.ggml.token_type": [1, 1]}, ["token_type", "2 entries for 4 tokens"]),
    ({"tokenizer.ggml.merges": None}, ["tokenizer.ggml.merges", "missing"]),
    ({"tokenizer.ggml.merges": ["a b", "b c"]}, ["merge 1", "'c'", "not in tokenizer.ggml.tokens"]),
    ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 99}, ["add_bos_token", "no BOS"]),
    ({"tokenizer.ggml.token_type": [1, 1, 6, 3]}, ["token 2", "BYTE", "<0xXX>"]),
])
def test_bad_metadata_is_a_one_line_error(change, words):
    meta = {**BASE, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(GGFuseError) as e:
        Tokenizer(meta, source="bad.gguf")
    msg = str(e.value)
    assert msg.startswith("bad.gguf: ") and "\n" not in msg and all(w in msg for w in words), msg


def test_tiny_vocab_and_bad_calls():
    tok = Tokenizer(BASE, source="t.gguf")
    assert tok.encode("abab") == [2, 2] and tok.decode([2, 3, 0]) == "aba"
    assert tok.bos_id is None and not tok.add_bos   # gpt2's default BOS id 11 is outside this vocabulary
    with pytest.raises(GGFuseError, match="token id 7 is outside the vocabulary 0..3"):
        tok.decode([0, 7])
    with pytest.raises(GGFuseError, match="takes a str"):
        tok.encode(b"ab")
    with pytest.raises(GGFuseError, match="not valid Unicode"):
        tok.encode("a\ud800b")


def test_from_gguf_errors(tmp_path):
    with pytest.raises(GGFuseError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    import gguf
    p = tmp_path / "novocab.gguf"
    w = gguf.GGUFWriter(str(p), "qwen35moe")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGFuseError) as e:
        Tokenizer.from_gguf(p)
    assert str(e.value) == f"{p}: no tokenizer: metadata key 'tokenizer.ggml.model' is missing"
