"""Frontends: every hyperparameter comes from the GGUF metadata; graphs have the right shape."""
import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.frontends import FRONTENDS
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.ops import Op
from ggfuse.ir.verify import verify
from util import ARCHS, fixture


@pytest.mark.parametrize("arch", ARCHS)
def test_hparams_come_from_metadata(arch):
    gf = GGUFFile(fixture(arch))
    g = build_graph(gf)
    hp = g.meta["hparams"]
    k = gf.arch_key
    assert hp["arch"] == arch == gf.arch
    assert hp["n_embd"] == k("embedding_length")
    assert hp["n_head"] == k("attention.head_count") and hp["n_head_kv"] == k("attention.head_count_kv")
    assert hp["rms_eps"] == pytest.approx(k("attention.layer_norm_rms_epsilon"))
    assert hp["rope_base"] == pytest.approx(k("rope.freq_base"))
    assert hp["n_rot"] == k("rope.dimension_count", hp["head_dim_k"])
    assert hp["n_vocab"] == gf.tensor("token_embd.weight").shape[0]
    if arch != "qwen35":
        assert hp["n_expert"] == k("expert_count") and hp["n_expert_used"] == k("expert_used_count")
    if arch != "qwen3moe":
        assert hp["ssm_d_state"] == k("ssm.state_size") and hp["ssm_dt_rank"] == k("ssm.time_step_rank")
        rec = k("attention.recurrent_layers")
        assert hp["recurrent"] == [bool(x) for x in rec[: hp["n_layer"]]]


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_structure(arch):
    g = build_graph(GGUFFile(fixture(arch)))
    verify(g)
    hp = g.meta["hparams"]
    n_rec = sum(hp["recurrent"])
    n_att = hp["n_layer"] - n_rec
    assert len(g.by_op(Op.GATED_DELTA_RULE)) == n_rec
    assert len(g.by_op(Op.SSM_CONV)) == n_rec
    assert len(g.by_op(Op.ATTENTION)) == n_att
    n_moe = hp["n_layer"] if hp["n_expert"] else 0
    assert len(g.by_op(Op.TOPK)) == n_moe
    assert len(g.by_op(Op.MUL_MAT_ID)) == 3 * n_moe
    states = g.states()
    assert len(states) == 2 * n_att + 2 * n_rec
    assert set(g.outputs) == set(states) | {"logits"}
    assert g.type_of(g.outputs["logits"]).shape == ("T", hp["n_vocab"])
    # the plain form: no fused or chunked ops from the passes
    assert not any(n.op.value in ("moe_route", "chunk_gated_delta_rule", "add_rms_norm") for n in g.nodes())


def test_hybrid_layer_pattern_follows_full_attention_interval(tmp_path):
    """Without the recurrent-layers array the pattern comes from full_attention_interval."""
    import gguf
    src = GGUFFile(fixture("qwen35moe"))
    r = gguf.GGUFReader(src.path)
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "qwen35moe")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "qwen35moe.attention.recurrent_layers"):
            continue
        if f.name == "qwen35moe.full_attention_interval":
            w.add_uint32(f.name, 2)
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(src.dequantize(t.name)))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    from ggfuse.errors import GGUFFormatError
    # interval 2 makes layer 1 an attention layer, whose tensors the file does not have
    with pytest.raises(GGUFFormatError, match="blk.1.attn_q"):
        build_graph(GGUFFile(str(p)))


def test_registry_has_the_four_architectures():
    assert {"qwen35moe", "qwen35", "qwen3next", "qwen3moe"} <= set(FRONTENDS)
