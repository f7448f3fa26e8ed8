"""Shared pieces of the frontends: the registry, the graph builder, hparam reading and the
blocks every hybrid Qwen model is made of (full attention, Gated DeltaNet, MoE and dense FFN).

Frontends emit the plain form llama.cpp computes (token-recurrent delta rule, per-token expert
matmuls); fusing and chunking belong to the passes. Helpers take keyword-only arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ggfuse.compiler.metadata import MAX_COUNT, MAX_DIM, MAX_LAYERS, Metadata
from ggfuse.errors import GGUFFormatError, UnsupportedError
from ggfuse.ir.graph import Graph, Value
from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType

FRONTENDS: dict[str, Callable] = {}


def register_arch(name: str):
    """Decorator: `@register_arch("qwen35moe") def build(gf) -> Graph`."""
    def deco(fn):
        FRONTENDS[name] = fn
        return fn
    return deco


# ---- hparams ---------------------------------------------------------------------------------

@dataclass
class HParams:
    """Every number the graph needs, read from GGUF metadata (never from presets)."""
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    rms_eps: float
    # attention
    n_head: int = 0
    n_head_kv: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    n_rot: int = 0
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rope_mode: str = "neox"
    rope_sections: tuple = ()
    attn_scale: float = 0.0
    # layer kinds: True where the layer is recurrent (Gated DeltaNet)
    recurrent: tuple = ()
    # experts
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    expert_weights_scale: float = 0.0
    expert_weights_norm: bool = True
    # ssm (Gated DeltaNet)
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_dt_rank: int = 0
    ssm_n_group: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["rope_sections"] = list(self.rope_sections)
        d["recurrent"] = list(self.recurrent)
        return d


def arch_metadata(gf) -> Metadata:
    """The file's metadata, keys relative to its architecture ("qwen35moe.block_count")."""
    return Metadata(gf).scope(f"{gf.arch}.")


def read_common(gf, *, recurrent_model: bool) -> HParams:
    arch = gf.arch
    k = arch_metadata(gf)
    n_layer_all = k.int("block_count", min=1, max=MAX_LAYERS)
    n_nextn = k.int("nextn_predict_layers", 0, min=0, max=n_layer_all - 1)
    n_layer = n_layer_all - n_nextn  # MTP blocks are not run by prefill
    n_embd = k.int("embedding_length", min=1, max=MAX_DIM)
    emb = gf.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise GGUFFormatError(gf.path, f"tensor 'token_embd.weight' has shape {emb.shape}, expected (n_vocab, {n_embd})")
    hp = HParams(arch=arch, n_layer=n_layer, n_embd=n_embd, n_vocab=int(emb.shape[0]),
                 rms_eps=k.float("attention.layer_norm_rms_epsilon", min=0.0, max=1.0))
    heads = k.int_per_layer("attention.head_count", n_layer_all, min=0, max=MAX_COUNT)
    heads_kv = k.int_per_layer("attention.head_count_kv", n_layer_all, heads, min=0, max=MAX_COUNT)
    hp.n_head = int(max(heads))
    hp.n_head_kv = int(max(heads_kv))
    if hp.n_head < 1 or hp.n_head_kv < 1 or hp.n_head % hp.n_head_kv:
        raise GGUFFormatError(gf.path, f"metadata keys '{arch}.attention.head_count' ({hp.n_head}) and "
                                       f"'{arch}.attention.head_count_kv' ({hp.n_head_kv}): expected at least one "
                                       f"KV head, dividing the query heads")
    hp.head_dim_k = k.int("attention.key_length", n_embd // hp.n_head, min=1, max=MAX_DIM)
    hp.head_dim_v = k.int("attention.value_length", hp.head_dim_k, min=1, max=MAX_DIM)
    hp.n_rot = k.int("rope.dimension_count", hp.head_dim_k, min=2, max=hp.head_dim_k)
    if hp.n_rot % 2:
        raise k.fail("rope.dimension_count", f"is {hp.n_rot}, expected an even count (RoPE rotates pairs)")
    hp.rope_base = k.float("rope.freq_base", 10000.0, gt=0.0)
    hp.attn_scale = k.float("attention.scale", 0.0, min=0.0)
    scaling = k.str("rope.scaling.type", "none")
    if scaling == "linear":
        hp.rope_freq_scale = 1.0 / k.float("rope.scaling.factor", gt=0.0)
    elif scaling not in ("none", ""):
        raise UnsupportedError(gf.path, f"rope scaling type {scaling!r} is not supported (supported: none, linear)")
    if recurrent_model:
        if k.has("attention.recurrent_layers"):
            rec = k.bool_per_layer("attention.recurrent_layers", n_layer_all)
            hp.recurrent = tuple(rec[:n_layer])
        else:
            interval = k.int("full_attention_interval", 4, min=1, max=MAX_LAYERS)
            hp.recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))
        hp.ssm_d_conv = k.int("ssm.conv_kernel", min=1, max=1 << 10)
        hp.ssm_d_inner = k.int("ssm.inner_size", min=1, max=MAX_DIM)
        hp.ssm_d_state = k.int("ssm.state_size", min=1, max=MAX_DIM)
        hp.ssm_dt_rank = k.int("ssm.time_step_rank", min=1, max=MAX_COUNT)
        hp.ssm_n_group = k.int("ssm.group_count", min=1, max=MAX_COUNT)
        if hp.ssm_dt_rank % hp.ssm_n_group:
            raise GGUFFormatError(gf.path, f"metadata key '{arch}.ssm.time_step_rank' ({hp.ssm_dt_rank}) is not a "
                                           f"multiple of '{arch}.ssm.group_count' ({hp.ssm_n_group})")
        if hp.ssm_d_inner % hp.ssm_dt_rank:
            raise GGUFFormatError(gf.path, f"metadata key '{arch}.ssm.inner_size' ({hp.ssm_d_inner}) is not a "
                                           f"multiple of '{arch}.ssm.time_step_rank' ({hp.ssm_dt_rank})")
    else:
        hp.recurrent = tuple(False for _ in range(n_layer))
    return hp


def read_experts(gf, hp: HParams) -> None:
    k = arch_metadata(gf)
    n_all = k.int("block_count", min=1, max=MAX_LAYERS)
    hp.n_expert = k.int("expert_count", min=1, max=MAX_COUNT)
    hp.n_expert_used = k.int("expert_used_count", min=1, max=hp.n_expert)
    hp.n_ff = max(k.int_per_layer("feed_forward_length", n_all, 0, min=0, max=MAX_DIM))
    ffe = max(k.int_per_layer("expert_feed_forward_length", n_all, 0, min=0, max=MAX_DIM))
    hp.n_ff_exp = ffe if ffe else hp.n_ff // hp.n_expert_used
    if hp.n_ff_exp < 1:
        raise k.fail("expert_feed_forward_length", f"is missing or 0 and feed_forward_length ({hp.n_ff}) / "
                                                   f"expert_used_count ({hp.n_expert_used}) gives no expert width")
    hp.n_ff_shexp = k.int("expert_shared_feed_forward_length", 0, min=0, max=MAX_DIM) or hp.n_ff
    hp.expert_weights_scale = k.float("expert_weights_scale", 0.0, min=0.0)
    gating = k.int("expert_gating_func", 1)
    if gating != 1:  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise UnsupportedError(gf.path, f"expert_gating_func {gating} is not supported for {hp.arch} (supported: 1 = softmax)")


def _squeeze(shape) -> tuple:
    shape = tuple(int(d) for d in shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def shape_matches(found: tuple, expected: tuple) -> bool:
    """llama.cpp's rule (trailing ne of 1 count as absent: (1, D) is a (D,) vector), except that a
    tensor may not carry more dimensions than declared once it is 3-D: a stacked expert tensor
    [E, F, D] stored as [1, E, F, D] would be read with E = 1 by everything that indexes experts."""
    if len(expected) >= 3 and len(found) != len(expected):
        return False
    return _squeeze(found) == _squeeze(expected)


# ---- the builder -----------------------------------------------------------------------------

class Builder:
    """A Graph plus the GGUF file it reads weights from; checks every weight's shape.

    `layer` is the index of the layer being built (None outside the layer stack): every node
    added carries it as meta["layer"], so later stages never parse it out of names."""

    def __init__(self, gf, name: str):
        self.gf = gf
        self.g = Graph(name)
        self.layer: int | None = None

    def _meta(self) -> dict:
        return {} if self.layer is None else {"layer": self.layer}

    def has(self, tensor: str) -> bool:
        return tensor in self.gf.tensors

    def weight(self, tensor: str, shape: tuple, *, view: tuple | None = None) -> Value:
        """A GGUF tensor (numpy-order `shape`, checked against the file), optionally viewed
        with another shape of the same size (a 1-D gate vector as a [1, D] matrix)."""
        info = self.gf.tensor(tensor)
        if not shape_matches(info.shape, tuple(shape)):
            self.gf.tensor(tensor, tuple(shape))  # raises the shape-mismatch error
        dtype = DType.from_ggml(info.type_name)
        return self.g.add(Op.WEIGHT, name=tensor, tensor=tensor, shape=tuple(view or shape),
                          dtype=dtype.value, ggml_type=info.type_name, meta=self._meta())

    def input(self, key: str, *, kind: str, shape: tuple, dtype: str = "f32", state: str | None = None) -> Value:
        """A graph input: tokens, positions, or (kind "state") carried state of kind `state`
        (ir/ops.py STATE_KINDS: kv_cache, conv_window, recurrent_state)."""
        extra = {"state": state} if kind == "state" else {}
        return self.g.add(Op.INPUT, name=key, key=key, kind=kind, shape=tuple(shape), dtype=dtype,
                          meta=self._meta(), **extra)

    def op(self, op: Op, *inputs: Value, name: str = "", **attrs):
        return self.g.add(op, inputs, name=name, meta=self._meta(), **attrs)

    # small conveniences
    def matmul(self, x, tensor, out_dim, in_dim, name=None):
        return self.op(Op.MATMUL, x, self.weight(tensor, (out_dim, in_dim)), name=name or tensor.rsplit(".", 1)[0])

    def norm(self, x, tensor, dim, eps, name=None):
        return self.op(Op.RMS_NORM, x, self.weight(tensor, (dim,)), eps=eps, name=name or tensor.rsplit(".", 1)[0])

    def reshape(self, x, shape, name=""):
        return self.op(Op.RESHAPE, x, shape=tuple(shape), name=name)

    def slice(self, x, axis, start, stop, name=""):
        return self.op(Op.SLICE, x, axis=axis, start=start, stop=stop, name=name)


# ---- blocks ----------------------------------------------------------------------------------

def attention_block(b: Builder, x: Value, *, il: int, hp: HParams, pos: Value, gated: bool,
                    rope_mode: str) -> Value:
    """Full attention with q/k RMS norm, (partial) RoPE, GQA, a KV cache carried as state and,
    for the hybrid Qwen models, a sigmoid output gate packed beside each query head."""
    p = f"blk.{il}"
    D, H, Hkv, hd, hv = hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
    nq = H * hd * (2 if gated else 1)
    if b.has(f"{p}.attn_qkv.weight"):
        qkv = b.matmul(x, f"{p}.attn_qkv.weight", nq + Hkv * hd + Hkv * hv, D)
        qf = b.slice(qkv, -1, 0, nq, name=f"{p}.q_full")
        k = b.slice(qkv, -1, nq, nq + Hkv * hd, name=f"{p}.k")
        v = b.slice(qkv, -1, nq + Hkv * hd, nq + Hkv * hd + Hkv * hv, name=f"{p}.v")
    else:
        qf = b.matmul(x, f"{p}.attn_q.weight", nq, D)
        k = b.matmul(x, f"{p}.attn_k.weight", Hkv * hd, D)
        v = b.matmul(x, f"{p}.attn_v.weight", Hkv * hv, D)
    for bias, width in (("q", nq), ("k", Hkv * hd), ("v", Hkv * hv)):
        if b.has(f"{p}.attn_{bias}.bias"):
            raise UnsupportedError(b.gf.path, f"tensor '{p}.attn_{bias}.bias': attention biases are not supported for {hp.arch}")
    if gated:
        qf = b.reshape(qf, ("T", H, 2 * hd), name=f"{p}.q_gate")
        q = b.slice(qf, 2, 0, hd, name=f"{p}.q")
        gate = b.reshape(b.slice(qf, 2, hd, 2 * hd), ("T", H * hd), name=f"{p}.attn_gate")
    else:
        q = b.reshape(qf, ("T", H, hd), name=f"{p}.q")
    k = b.reshape(k, ("T", Hkv, hd))
    v = b.reshape(v, ("T", Hkv, hv), name=f"{p}.v")
    q = b.norm(q, f"{p}.attn_q_norm.weight", hd, hp.rms_eps)
    k = b.norm(k, f"{p}.attn_k_norm.weight", hd, hp.rms_eps)
    rope = dict(n_dims=hp.n_rot, freq_base=hp.rope_base, freq_scale=hp.rope_freq_scale, mode=rope_mode,
                sections=tuple(hp.rope_sections))
    q = b.op(Op.ROPE, q, pos, name=f"{p}.q_rope", **rope)
    k = b.op(Op.ROPE, k, pos, name=f"{p}.k_rope", **rope)
    k_cache = b.input(f"{p}.k_cache", kind="state", shape=("P", Hkv, hd), state="kv_cache")
    v_cache = b.input(f"{p}.v_cache", kind="state", shape=("P", Hkv, hv), state="kv_cache")
    k_all = b.op(Op.KV_APPEND, k_cache, k, name=f"{p}.k_all")
    v_all = b.op(Op.KV_APPEND, v_cache, v, name=f"{p}.v_all")
    b.g.set_output(f"{p}.k_cache", k_all)
    b.g.set_output(f"{p}.v_cache", v_all)
    scale = hp.attn_scale if hp.attn_scale else 1.0 / math.sqrt(hd)
    o = b.op(Op.ATTENTION, q, k_all, v_all, scale=scale, name=f"{p}.attn")
    o = b.reshape(o, ("T", H * hv))
    if gated:
        o = b.op(Op.MUL, o, b.op(Op.SIGMOID, gate), name=f"{p}.attn_gated")
    return b.matmul(o, f"{p}.attn_output.weight", D, H * hv)


def deltanet_block(b: Builder, x: Value, *, il: int, hp: HParams, head_map: str) -> Value:
    """Gated DeltaNet: projections, short causal conv with carried window, l2-normalised q/k,
    the token-recurrent gated delta rule with carried state, gated RMS norm, out projection.

    head_map: how value heads read key heads when there are fewer key heads: "tile" (h % Hk,
    Qwen3.5 after the converter's V-head reordering) or "interleave" (h // (Hv/Hk), Qwen3-Next).
    """
    p = f"blk.{il}"
    D = hp.n_embd
    dk, Hk, Hv = hp.ssm_d_state, hp.ssm_n_group, hp.ssm_dt_rank
    dv = hp.ssm_d_inner // Hv
    key_dim, value_dim = dk * Hk, dv * Hv
    conv_dim = 2 * key_dim + value_dim
    r = Hv // Hk
    if b.has(f"{p}.attn_qkv.weight"):
        qkv = b.matmul(x, f"{p}.attn_qkv.weight", conv_dim, D, name=f"{p}.qkv_mixed")
        z = b.matmul(x, f"{p}.attn_gate.weight", value_dim, D, name=f"{p}.z")
    elif b.has(f"{p}.ssm_in.weight"):  # legacy Qwen3-Next files: q, k, v, z interleaved per key head
        m = b.matmul(x, f"{p}.ssm_in.weight", 2 * key_dim + 2 * value_dim, D, name=f"{p}.qkvz_mixed")
        m = b.reshape(m, ("T", Hk, 2 * dk + 2 * r * dv))
        parts = []
        off = 0
        for width, flat in ((dk, key_dim), (dk, key_dim), (r * dv, value_dim), (r * dv, value_dim)):
            parts.append(b.reshape(b.slice(m, 2, off, off + width), ("T", flat)))
            off += width
        qkv = b.op(Op.CONCAT, parts[0], parts[1], parts[2], axis=1, name=f"{p}.qkv_mixed")
        z = parts[3]
    else:
        raise GGUFFormatError(b.gf.path, f"missing tensor '{p}.attn_qkv.weight' (or legacy '{p}.ssm_in.weight')")

    if b.has(f"{p}.ssm_ba.weight"):  # Qwen3-Next: beta and alpha interleaved per key head
        ba = b.matmul(x, f"{p}.ssm_ba.weight", 2 * Hv, D, name=f"{p}.ba")
        ba = b.reshape(ba, ("T", Hk, 2 * r))
        beta_lin = b.reshape(b.slice(ba, 2, 0, r), ("T", Hv), name=f"{p}.beta_lin")
        alpha = b.reshape(b.slice(ba, 2, r, 2 * r), ("T", Hv), name=f"{p}.alpha")
    else:
        beta_lin = b.matmul(x, f"{p}.ssm_beta.weight", Hv, D, name=f"{p}.beta_lin")
        alpha = b.matmul(x, f"{p}.ssm_alpha.weight", Hv, D, name=f"{p}.alpha")
    beta = b.op(Op.SIGMOID, beta_lin, name=f"{p}.beta")
    a = b.op(Op.ADD, alpha, b.weight(f"{p}.ssm_dt.bias", (Hv,)))
    g = b.op(Op.MUL, b.op(Op.SOFTPLUS, a), b.weight(f"{p}.ssm_a", (Hv,)), name=f"{p}.gate")  # ssm_a = -exp(A_log)

    conv_state = b.input(f"{p}.conv_state", kind="state", shape=(hp.ssm_d_conv - 1, conv_dim), state="conv_window")
    conv, conv_new = b.op(Op.SSM_CONV, qkv, conv_state, b.weight(f"{p}.ssm_conv1d.weight", (conv_dim, hp.ssm_d_conv)),
                          name=f"{p}.conv")
    b.g.set_output(f"{p}.conv_state", conv_new)
    conv = b.op(Op.SILU, conv, name=f"{p}.conv_silu")
    q = b.reshape(b.slice(conv, 1, 0, key_dim), ("T", Hk, dk), name=f"{p}.q")
    k = b.reshape(b.slice(conv, 1, key_dim, 2 * key_dim), ("T", Hk, dk), name=f"{p}.k")
    v = b.reshape(b.slice(conv, 1, 2 * key_dim, conv_dim), ("T", Hv, dv), name=f"{p}.v")
    q = b.op(Op.L2_NORM, q, eps=hp.rms_eps, name=f"{p}.q_l2")
    k = b.op(Op.L2_NORM, k, eps=hp.rms_eps, name=f"{p}.k_l2")
    state = b.input(f"{p}.ssm_state", kind="state", shape=(Hv, dk, dv), state="recurrent_state")
    o, s_new = b.op(Op.GATED_DELTA_RULE, q, k, v, g, beta, state, scale=1.0 / math.sqrt(dk), head_map=head_map,
                    name=f"{p}.delta_rule")
    b.g.set_output(f"{p}.ssm_state", s_new)
    o = b.norm(o, f"{p}.ssm_norm.weight", dv, hp.rms_eps, name=f"{p}.ssm_norm")
    zs = b.op(Op.SILU, b.reshape(z, ("T", Hv, dv)))
    o = b.reshape(b.op(Op.MUL, o, zs, name=f"{p}.gated_norm"), ("T", value_dim))
    return b.matmul(o, f"{p}.ssm_out.weight", D, value_dim)


def dense_ffn(b: Builder, x: Value, *, prefix: str, n_embd: int, n_ff: int, suffix: str = "",
              act: Op = Op.SILU) -> Value:
    """Gated FFN: down(act(gate x) * up x); SwiGLU by default, GELU-tanh for Gemma."""
    gate = b.matmul(x, f"{prefix}.ffn_gate{suffix}.weight", n_ff, n_embd)
    up = b.matmul(x, f"{prefix}.ffn_up{suffix}.weight", n_ff, n_embd)
    glu = "ffn_swiglu" if act == Op.SILU else f"ffn_{act.value}_glu"
    h = b.op(Op.MUL, b.op(act, gate), up, name=f"{prefix}.{glu}{suffix}")
    return b.matmul(h, f"{prefix}.ffn_down{suffix}.weight", n_embd, n_ff)


def moe_ffn(b: Builder, x: Value, *, il: int, hp: HParams, shared: bool) -> Value:
    """Routed experts as llama.cpp's build_moe_ffn computes them (softmax, top-k, renormalise,
    per-token expert matmuls, weighted sum), plus an optional sigmoid-gated shared expert."""
    p = f"blk.{il}"
    D, E, K, F = hp.n_embd, hp.n_expert, hp.n_expert_used, hp.n_ff_exp
    logits = b.matmul(x, f"{p}.ffn_gate_inp.weight", E, D, name=f"{p}.router")
    probs = b.op(Op.SOFTMAX, logits, axis=-1, name=f"{p}.router_probs")
    ids = b.op(Op.TOPK, probs, k=K, name=f"{p}.expert_ids")
    w = b.op(Op.TAKE_ALONG, probs, ids, name=f"{p}.expert_weights")
    if hp.expert_weights_norm:
        w = b.op(Op.DIV, w, b.op(Op.SUM, w, axis=-1, keepdims=True), name=f"{p}.expert_weights_norm")
    if hp.expert_weights_scale not in (0.0, 1.0):
        w = b.op(Op.SCALE, w, factor=hp.expert_weights_scale)
    if b.has(f"{p}.ffn_gate_up_exps.weight"):
        gu = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_gate_up_exps.weight", (E, 2 * F, D)), x, ids, name=f"{p}.ffn_gate_up_exps")
        gate = b.slice(gu, 2, 0, F)
        up = b.slice(gu, 2, F, 2 * F)
    else:
        gate = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_gate_exps.weight", (E, F, D)), x, ids, name=f"{p}.ffn_gate_exps")
        up = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_up_exps.weight", (E, F, D)), x, ids, name=f"{p}.ffn_up_exps")
    h = b.op(Op.MUL, b.op(Op.SILU, gate), up, name=f"{p}.ffn_exps_swiglu")
    y = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_down_exps.weight", (E, D, F)), h, ids, name=f"{p}.ffn_down_exps")
    y = b.op(Op.MUL, y, b.reshape(w, ("T", K, 1)), name=f"{p}.ffn_exps_weighted")
    out = b.op(Op.SUM, y, axis=1, keepdims=False, name=f"{p}.ffn_moe_out")
    if shared:
        sh = dense_ffn(b, x, prefix=p, n_embd=D, n_ff=hp.n_ff_shexp, suffix="_shexp")
        sg = b.op(Op.MATMUL, x, b.weight(f"{p}.ffn_gate_inp_shexp.weight", (D,), view=(1, D)), name=f"{p}.shexp_gate")
        sh = b.op(Op.MUL, sh, b.op(Op.SIGMOID, sg), name=f"{p}.ffn_shexp_gated")
        out = b.op(Op.ADD, out, sh, name=f"{p}.ffn_out")
    return out


SHARED_EXPERT_TENSORS = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


def has_shared_expert(gf, hp: HParams) -> bool:
    """Whether the model has a shared expert: then every layer must have all four of its tensors
    (llama.cpp requires them; silently dropping one layer's shared expert would change the output)."""
    names = [f"blk.{il}.{t}.weight" for il in range(hp.n_layer) for t in SHARED_EXPERT_TENSORS]
    present = [n in gf.tensors for n in names]
    if not any(present):
        return False
    missing = next(n for n, ok in zip(names, present) if not ok) if not all(present) else None
    if missing:
        raise GGUFFormatError(gf.path, f"missing tensor '{missing}' (the model has a shared expert: every layer "
                                       f"needs {', '.join(SHARED_EXPERT_TENSORS)})")
    return True


def embed_inputs(b: Builder, hp: HParams) -> tuple[Value, Value]:
    tokens = b.input("tokens", kind="tokens", shape=("T",), dtype="i32")
    pos = b.input("positions", kind="positions", shape=("T",), dtype="i32")
    emb = b.op(Op.GET_ROWS, b.weight("token_embd.weight", (hp.n_vocab, hp.n_embd)), tokens, name="token_embd")
    return emb, pos


def lm_head(b: Builder, h: Value, hp: HParams, *, softcap: float = 0.0) -> None:
    """Output norm and head; softcap > 0: logits = softcap * tanh(logits / softcap) (Gemma)."""
    b.layer = None
    h = b.norm(h, "output_norm.weight", hp.n_embd, hp.rms_eps, name="output_norm")
    head = "output.weight" if b.has("output.weight") else "token_embd.weight"  # tied embeddings
    logits = b.op(Op.LM_HEAD, h, b.weight(head, (hp.n_vocab, hp.n_embd)), name="lm_head")
    if softcap:
        logits = b.op(Op.SOFTCAP, logits, cap=float(softcap), name="logits_softcap")
    b.g.set_output("logits", logits)


def hybrid_model(gf, hp: HParams, *, ffn: str, head_map: str, rope_mode: str) -> Graph:
    """The Qwen3.5 / Qwen3-Next layer stack: pre-norm mixer (DeltaNet or gated attention),
    residual, post-attention norm, FFN (MoE + shared expert, or dense), residual."""
    b = Builder(gf, hp.arch)
    shared = ffn == "moe" and has_shared_expert(gf, hp)
    h, pos = embed_inputs(b, hp)
    for il in range(hp.n_layer):
        b.layer = il
        p = f"blk.{il}"
        xn = b.norm(h, f"{p}.attn_norm.weight", hp.n_embd, hp.rms_eps)
        if hp.recurrent[il]:
            a = deltanet_block(b, xn, il=il, hp=hp, head_map=head_map)
        else:
            a = attention_block(b, xn, il=il, hp=hp, pos=pos, gated=True, rope_mode=rope_mode)
        h = b.op(Op.ADD, a, h, name=f"{p}.attn_residual")
        xn = b.norm(h, f"{p}.post_attention_norm.weight", hp.n_embd, hp.rms_eps)
        if ffn == "moe":
            f = moe_ffn(b, xn, il=il, hp=hp, shared=shared)
        else:
            f = dense_ffn(b, xn, prefix=p, n_embd=hp.n_embd, n_ff=hp.n_ff)
        h = b.op(Op.ADD, f, h, name=f"{p}.ffn_residual")
    lm_head(b, h, hp)
    b.g.meta["hparams"] = hp.to_json()
    return b.g
