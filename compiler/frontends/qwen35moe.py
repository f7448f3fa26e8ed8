"""Qwen3.5 / Qwen3.6 MoE (llama.cpp arch `qwen35moe`): 3 Gated DeltaNet layers + 1 gated
full-attention layer per block of `full_attention_interval`, routed softmax top-k experts plus
a sigmoid-gated shared expert, interleaved multi-section RoPE on the first n_rot dims."""
from ggfuse.compiler.frontends.common import arch_metadata, hybrid_model, read_common, read_experts, register_arch
from ggfuse.compiler.metadata import MAX_DIM


@register_arch("qwen35moe")
def build(gf):
    hp = read_common(gf, recurrent_model=True)
    read_experts(gf, hp)
    hp.rope_sections = tuple(arch_metadata(gf).int_array("rope.dimension_sections", [0, 0, 0, 0], min_len=1,
                                                         max_len=4, min=0, max=MAX_DIM))
    hp.rope_mode = "imrope"
    return hybrid_model(gf, hp, ffn="moe", head_map="tile", rope_mode="imrope")
