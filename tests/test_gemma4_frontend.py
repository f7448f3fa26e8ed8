"""The Gemma 4 frontend: every hyperparameter from the metadata, the graph's structure (sliding
rings, KV-shared layers reading their source's values, k_eq_v, PLE, soft-cap), the note for
multimodal files, and a one-line error naming the file and the key for each kind of bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.frontends import FRONTENDS
from ggfuse.compiler.frontends import gemma4 as g4
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError
from ggfuse.ir.ops import Op
from ggfuse.ir.verify import verify
from util import GEMMA4, fixture

pytestmark = pytest.mark.skipif(not os.path.exists(fixture("gemma4-dense")), reason="fixtures not built")


def _graph(name):
    gf = GGUFFile(fixture(name))
    return gf, build_graph(gf)


def test_registered():
    assert FRONTENDS["gemma4"] is g4.build


@pytest.mark.parametrize("name", GEMMA4)
def test_hparams_come_from_metadata(name):
    gf, g = _graph(name)
    hp, k = g.meta["hparams"], gf.arch_key
    L = k("block_count")
    assert hp["arch"] == gf.arch == "gemma4" and hp["n_layer"] == L and hp["n_embd"] == k("embedding_length")
    assert hp["sliding"] == list(k("attention.sliding_window_pattern"))
    kv = k("attention.head_count_kv")
    assert hp["n_head_kv_l"] == (kv if isinstance(kv, list) else [kv] * L)
    ff = k("feed_forward_length")
    assert hp["n_ff_l"] == (ff if isinstance(ff, list) else [ff] * L)
    assert hp["n_head_l"] == [k("attention.head_count")] * L
    assert (hp["head_dim_k"], hp["head_dim_swa"]) == (k("attention.key_length"), k("attention.key_length_swa"))
    assert (hp["n_rot"], hp["n_rot_swa"]) == (k("rope.dimension_count"), k("rope.dimension_count_swa"))
    assert hp["rope_base"] == pytest.approx(k("rope.freq_base"))
    assert hp["rope_base_swa"] == pytest.approx(k("rope.freq_base_swa"))
    assert hp["n_swa"] == k("attention.sliding_window") and hp["attn_scale"] == 1.0
    assert hp["n_kv_shared"] == k("attention.shared_kv_layers")
    assert hp["n_embd_per_layer"] == k("embedding_length_per_layer_input")
    assert hp["final_softcap"] == pytest.approx(k("final_logit_softcapping"))
    assert hp["rms_eps"] == pytest.approx(k("attention.layer_norm_rms_epsilon"))
    assert hp["n_vocab"] == gf.tensor("token_embd.weight").shape[0]
    if name == "gemma4-moe":
        assert (hp["n_expert"], hp["n_expert_used"], hp["n_ff_exp"]) == (
            k("expert_count"), k("expert_used_count"), k("expert_feed_forward_length"))


def test_fixture_configs_are_what_the_tests_claim():
    # the dense fixture: 2 own layers (sliding, full), 2 KV-shared ones with the double-wide MLP;
    # the MoE fixture: k_eq_v full layer with fewer KV heads
    _, g = _graph("gemma4-dense")
    hp = g.meta["hparams"]
    assert hp["sliding"] == [True, False, True, False] and hp["kv_source"] == [0, 1, 0, 1]
    assert hp["n_ff_l"] == [32, 32, 64, 64] and hp["head_dim_swa"] != hp["head_dim_k"]
    assert hp["n_embd_per_layer"] > 0
    _, g = _graph("gemma4-moe")
    hp = g.meta["hparams"]
    assert hp["n_head_kv_l"] == [2, 1] and hp["kv_source"] == [0, 1] and hp["n_expert"] == 4


@pytest.mark.parametrize("name", GEMMA4)
def test_graph_structure(name):
    gf, g = _graph(name)
    verify(g)
    hp = g.meta["hparams"]
    L, sliding, src = hp["n_layer"], hp["sliding"], hp["kv_source"]
    own_swa = [il for il in range(L) if src[il] == il and sliding[il]]
    own_full = [il for il in range(L) if src[il] == il and not sliding[il]]
    assert len(g.by_op(Op.ATTENTION_WINDOW)) == sum(sliding) and len(g.by_op(Op.ATTENTION)) == L - sum(sliding)
    assert len(g.by_op(Op.KV_RING_APPEND)) == 2 * len(own_swa) and len(g.by_op(Op.KV_APPEND)) == 2 * len(own_full)
    # state: fixed-size rings for the sliding layers, growing caches for the full ones, none for shared layers
    states = g.states()
    want = {}
    for il in own_swa:
        for kv in "kv":
            want[f"blk.{il}.{kv}_ring"] = (hp["n_swa"], hp["n_head_kv_l"][il], hp["head_dim_swa"])
    for il in own_full:
        for kv in "kv":
            want[f"blk.{il}.{kv}_cache"] = ("P", hp["n_head_kv_l"][il], hp["head_dim_k"])
    assert {k: n.outputs[0].shape for k, n in states.items()} == want
    assert set(g.outputs) == set(states) | {"logits"}
    # a KV-shared layer attends over its source layer's values, and the source's ring append waits for it
    by_name = {n.name: n for n in g.nodes()}
    for il in range(L):
        if src[il] != il:
            mine, theirs = by_name[f"blk.{il}.attn"], by_name[f"blk.{src[il]}.attn"]
            assert mine.inputs[1:] == theirs.inputs[1:]
            assert not any(w.attrs.tensor.startswith(f"blk.{il}.attn_k") for w in g.weights())
    order = {n.id: i for i, n in enumerate(g.topo())}
    for il in own_swa:
        last = max(j for j in range(L) if src[j] == il)
        reader = by_name[f"blk.{last}.attn"]
        for kv in "kv":
            append = by_name[f"blk.{il}.{kv}_ring_append"]
            assert append.inputs[2] == reader.out
            # scheduled right behind its last reader, so the chunk's K/V need not outlive it
            assert 0 < order[append.id] - order[reader.id] <= 2
    for il in range(L):
        assert by_name[f"blk.{il}.attn"].meta["kv_source"] == src[il]
    # the full layers' RoPE reads rope_freqs, the sliding layers' none
    for n in g.by_op(Op.ROPE):
        il = int(n.name.split(".")[1])
        assert (len(n.inputs) == 3) == (not sliding[il])
        assert n.attrs.freq_base == (hp["rope_base_swa"] if sliding[il] else hp["rope_base"])
    assert len(g.by_op(Op.PLE_GATHER)) == (1 if hp["n_embd_per_layer"] else 0)
    (cap,) = g.by_op(Op.SOFTCAP)
    assert g.outputs["logits"] == cap.out and cap.attrs.cap == hp["final_softcap"]
    assert g.type_of(cap.out).shape == ("T", hp["n_vocab"])
    n_glu = L * (2 if hp["n_expert"] else 1) + (L if hp["n_embd_per_layer"] else 0)   # MLP, experts, PLE gate
    assert len(g.by_op(Op.GELU)) == n_glu
    assert not any(n.op.value in ("moe_route", "norm_add", "ffn_geglu") for n in g.nodes())   # the plain form


def test_k_eq_v_reads_v_from_the_raw_k_projection():
    gf, g = _graph("gemma4-moe")
    hp = g.meta["hparams"]
    by_name = {n.name: n for n in g.nodes()}
    for il in range(hp["n_layer"]):
        v_norm = by_name[f"blk.{il}.v_norm"]
        assert len(v_norm.inputs) == 1                      # no weight
        raw = g.node(g.node(v_norm.inputs[0].node).inputs[0].node)
        has_v = f"blk.{il}.attn_v.weight" in gf.tensors
        assert raw.name == (f"blk.{il}.v_raw" if has_v else f"blk.{il}.k_raw")
        assert has_v == hp["sliding"][il]                   # the fixture drops attn_v on the full layer


def test_multimodal_tensors_are_noted_once(tmp_path, capsys):
    path = _rewrite(tmp_path / "mm.gguf", "gemma4-moe", add_tensors={
        "v.patch_embd.weight": np.zeros((4, 8), np.float32), "mm.input_projection.weight": np.zeros((8, 8), np.float32)})
    g4._NOTED.discard(str(path))
    build_graph(GGUFFile(path))
    build_graph(GGUFFile(path))
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "running the text model" in err and "v.*" in err and "mm.*" in err
    build_graph(GGUFFile(fixture("gemma4-moe")))
    assert "note" not in capsys.readouterr().err


# ---- bad input ---------------------------------------------------------------------------------

def _rewrite(dst, name, *, set_keys=None, drop_keys=(), drop_tensors=(), add_tensors=None):
    """A copy of fixture `name` (F32) with some metadata or tensors changed."""
    src = fixture(name)
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "gemma4")
    set_keys = dict(set_keys or {})
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop_keys or f.name in set_keys:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for key, value in set_keys.items():
        if isinstance(value, list):
            sub = gguf.GGUFValueType.BOOL if isinstance(value[0], bool) else gguf.GGUFValueType.INT32
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(int(d) for d in reversed(t.shape))))
    for n, a in (add_tensors or {}).items():
        w.add_tensor(n, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


K = "gemma4."
BAD = {
    "missing-window": ("gemma4-dense", dict(drop_keys=[K + "attention.sliding_window"]),
                       GGUFFormatError, "missing required metadata key 'gemma4.attention.sliding_window'"),
    "missing-pattern": ("gemma4-dense", dict(drop_keys=[K + "attention.sliding_window_pattern"]),
                        GGUFFormatError, "'gemma4.attention.sliding_window_pattern'"),
    "missing-ple-width": ("gemma4-moe", dict(drop_keys=[K + "embedding_length_per_layer_input"]),
                          GGUFFormatError, "'gemma4.embedding_length_per_layer_input'"),
    "missing-swa-head-dim": ("gemma4-moe", dict(drop_keys=[K + "attention.key_length_swa"]),
                             GGUFFormatError, "'gemma4.attention.key_length_swa'"),
    "missing-tensor": ("gemma4-dense", dict(drop_tensors=["blk.2.attn_q_norm.weight"]),
                       GGUFFormatError, "missing tensor 'blk.2.attn_q_norm.weight'"),
    "missing-rope-freqs": ("gemma4-moe", dict(drop_tensors=["rope_freqs.weight"]),
                           GGUFFormatError, "missing tensor 'rope_freqs.weight'"),
    "missing-ple-table": ("gemma4-dense", dict(drop_tensors=["per_layer_token_embd.weight"]),
                          GGUFFormatError, "missing tensor 'per_layer_token_embd.weight'"),
    "pattern-short": ("gemma4-dense", dict(set_keys={K + "attention.sliding_window_pattern": [True, False, True]}),
                      GGUFFormatError, "'gemma4.attention.sliding_window_pattern' has 3 entries, expected one per layer (block_count 4)"),
    "pattern-long": ("gemma4-moe", dict(set_keys={K + "attention.sliding_window_pattern": [True, False, True]}),
                     GGUFFormatError, "has 3 entries"),
    "pattern-scalar": ("gemma4-moe", dict(set_keys={K + "attention.sliding_window_pattern": 1}),
                       GGUFFormatError, "a scalar, not an array"),
    "kv-heads-length": ("gemma4-moe", dict(set_keys={K + "attention.head_count_kv": [2, 1, 1]}),
                        GGUFFormatError, "'gemma4.attention.head_count_kv' has 3 entries, expected 2"),
    "ffn-length": ("gemma4-dense", dict(set_keys={K + "feed_forward_length": [32, 32, 64]}),
                   GGUFFormatError, "'gemma4.feed_forward_length' has 3 entries, expected 4"),
    "kv-heads-divide": ("gemma4-moe", dict(set_keys={K + "attention.head_count_kv": [3, 1]}),
                        GGUFFormatError, "'gemma4.attention.head_count_kv': layer 0 has 3 KV heads"),
    "sharing-all": ("gemma4-dense", dict(set_keys={K + "attention.shared_kv_layers": 4}),
                    GGUFFormatError, "'gemma4.attention.shared_kv_layers' is 4: block_count 4 leaves no layer"),
    "sharing-past": ("gemma4-dense", dict(set_keys={K + "attention.shared_kv_layers": 9}),
                     GGUFFormatError, "'gemma4.attention.shared_kv_layers' is 9"),
    "sharing-no-own-kind": ("gemma4-dense", dict(set_keys={K + "attention.shared_kv_layers": 3}),
                            GGUFFormatError, "full layer 1 shares KV, but none of layers 0..0 is a full layer"),
    "fewer-shared-layers": ("gemma4-dense", dict(set_keys={K + "attention.shared_kv_layers": 1}),
                            GGUFFormatError, "missing tensor 'blk.2.attn_k.weight'"),
    "pattern-vs-tensors": ("gemma4-moe", dict(set_keys={K + "attention.sliding_window_pattern": [True, True]}),
                           GGUFFormatError, "tensor 'blk.1.attn_q.weight' has shape"),
    "window-zero": ("gemma4-moe", dict(set_keys={K + "attention.sliding_window": 0}),
                    GGUFFormatError, "'gemma4.attention.sliding_window' is 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_file_and_key(tmp_path, case):
    name, kw, err_type, msg = BAD[case]
    path = _rewrite(tmp_path / f"{case}.gguf", name, **kw)
    with pytest.raises(err_type) as e:
        build_graph(GGUFFile(path))
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path) + ": ") and msg in text, text


def test_bad_input_through_the_cli_exits_2(tmp_path):
    path = _rewrite(tmp_path / "bad.gguf", "gemma4-dense", set_keys={K + "attention.sliding_window_pattern": [True]})
    p = subprocess.run([sys.executable, "-m", "ggfuse.compiler.cli", "compile", str(path)], capture_output=True,
                       text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "sliding_window_pattern" in lines[0] and str(path) in lines[0]


def test_shared_layers_own_kv_weights_are_ignored(tmp_path):
    # the published E2B / E4B files still carry attn_k / attn_v / attn_k_norm for the KV-shared layers
    extra = {"blk.3.attn_k.weight": np.ones((64, 256), np.float32), "blk.3.attn_v.weight": np.ones((64, 256), np.float32),
             "blk.3.attn_k_norm.weight": np.ones(64, np.float32)}
    path = _rewrite(tmp_path / "extra.gguf", "gemma4-dense", add_tensors=extra)
    g = build_graph(GGUFFile(path))
    assert not any(w.attrs.tensor.startswith("blk.3.attn_k") or w.attrs.tensor.startswith("blk.3.attn_v")
                   for w in g.weights())
    from util import refs, rel_err
    import ggfuse
    r = refs("gemma4-dense")
    assert rel_err(ggfuse.load(str(path), device="cpu").prefill(r["tokens"]), r["llama_f32"]) < 1e-4


def test_unsupported_weight_scales_are_refused(tmp_path):
    path = _rewrite(tmp_path / "nvfp4.gguf", "gemma4-moe", add_tensors={"blk.0.attn_q.scale": np.ones(1, np.float32)})
    with pytest.raises(UnsupportedError, match="blk.0.attn_q.scale"):
        build_graph(GGUFFile(path))
    assert issubclass(UnsupportedError, GGFuseError)
