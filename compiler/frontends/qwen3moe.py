"""Qwen3-MoE (llama.cpp arch `qwen3moe`): a plain transformer; attention with q/k RMS norm and
NEOX RoPE, then routed softmax top-k experts (no shared expert)."""
from ggfuse.compiler.frontends.common import (Builder, attention_block, embed_inputs, lm_head, moe_ffn,
                                              read_common, read_experts, register_arch)
from ggfuse.ir.ops import Op


@register_arch("qwen3moe")
def build(gf):
    hp = read_common(gf, recurrent_model=False)
    read_experts(gf, hp)
    hp.rope_mode = "neox"
    b = Builder(gf, hp.arch)
    h, pos = embed_inputs(b, hp)
    for il in range(hp.n_layer):
        b.layer = il
        p = f"blk.{il}"
        xn = b.norm(h, f"{p}.attn_norm.weight", hp.n_embd, hp.rms_eps)
        a = attention_block(b, xn, il=il, hp=hp, pos=pos, gated=False, rope_mode="neox")
        h = b.op(Op.ADD, a, h, name=f"{p}.attn_residual")
        xn = b.norm(h, f"{p}.ffn_norm.weight", hp.n_embd, hp.rms_eps)
        f = moe_ffn(b, xn, il=il, hp=hp, shared=False)
        h = b.op(Op.ADD, f, h, name=f"{p}.ffn_residual")
    lm_head(b, h, hp)
    b.g.meta["hparams"] = hp.to_json()
    return b.g
