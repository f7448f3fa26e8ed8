"""Qwen3-Next (llama.cpp arch `qwen3next`): the hybrid stack with NEOX RoPE, beta/alpha
projected together per key head (`ssm_ba`), and value heads reading key heads interleaved
(llama.cpp repeats q/k with repeat_interleave semantics for this arch)."""
from ggfuse.compiler.frontends.common import hybrid_model, read_common, read_experts, register_arch


@register_arch("qwen3next")
def build(gf):
    hp = read_common(gf, recurrent_model=True)
    read_experts(gf, hp)
    hp.rope_mode = "neox"
    return hybrid_model(gf, hp, ffn="moe", head_map="interleave", rope_mode="neox")
