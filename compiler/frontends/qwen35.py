"""Qwen3.5 dense hybrid (llama.cpp arch `qwen35`): the qwen35moe layer stack with a dense
SwiGLU FFN in every layer."""
from ggfuse.compiler.frontends.common import arch_metadata, hybrid_model, read_common, register_arch
from ggfuse.compiler.metadata import MAX_DIM


@register_arch("qwen35")
def build(gf):
    hp = read_common(gf, recurrent_model=True)
    md = arch_metadata(gf)
    hp.n_ff = max(md.int_per_layer("feed_forward_length", md.int("block_count"), min=1, max=MAX_DIM))
    hp.rope_sections = tuple(arch_metadata(gf).int_array("rope.dimension_sections", [0, 0, 0, 0], min_len=1,
                                                         max_len=4, min=0, max=MAX_DIM))
    hp.rope_mode = "imrope"
    return hybrid_model(gf, hp, ffn="dense", head_map="tile", rope_mode="imrope")
