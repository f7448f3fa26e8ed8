"""Qwen3.5 dense hybrid (llama.cpp arch `qwen35`): the qwen35moe layer stack with a dense
SwiGLU FFN in every layer."""
from ggfuse.compiler.frontends.common import hybrid_model, read_common, register_arch


@register_arch("qwen35")
def build(gf):
    hp = read_common(gf, recurrent_model=True)
    n_ff = gf.arch_key("feed_forward_length")
    hp.n_ff = int(max(n_ff) if isinstance(n_ff, list) else n_ff)
    hp.rope_sections = tuple(int(x) for x in gf.arch_key("rope.dimension_sections", [0, 0, 0, 0]))
    hp.rope_mode = "imrope"
    return hybrid_model(gf, hp, ffn="dense", head_map="tile", rope_mode="imrope")
