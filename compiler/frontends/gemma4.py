"""Gemma 4 (llama.cpp arch `gemma4`): the dense E2B / E4B / 31B and the MoE 26B-A4B text models.

As llama.cpp's src/models/gemma4.cpp computes them: sliding-window and full attention layers
(their own head dim, KV head count and RoPE), q/k RMSNorm with weights and v RMSNorm without,
attention scale 1, the trailing KV-shared layers reading the KV of the last own layer of their
kind, k_eq_v (no attn_v: V from the raw K projection), GELU-tanh GLUs, post-attention / post-FFN
norms, per-layer embeddings (PLE), layer_output_scale, embedding x sqrt(D), the tied LM head and a
final logit soft-cap; the MoE layers run a dense MLP and routed experts side by side from the
same residual. A sliding layer's KV state is a ring of `window` rows (ir/ops_gemma4.py), so a
long prompt does not grow it.

Every number comes from the metadata; ../../../shared/reference/gemma4-llama-cpp.md sections 1-5
list the keys and tensors with their llama.cpp sources.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from ggfuse.compiler.frontends.common import (Builder, HParams, arch_metadata, dense_ffn, embed_inputs, lm_head,
                                              register_arch)
from ggfuse.compiler.metadata import MAX_COUNT, MAX_DIM, MAX_LAYERS, REQUIRED
from ggfuse.errors import GGUFFormatError, UnsupportedError
from ggfuse.ir.graph import Value
from ggfuse.ir.ops import Op


@dataclass
class Gemma4HParams(HParams):
    """HParams plus what varies per layer in Gemma 4 (tuples of n_layer entries)."""
    sliding: tuple = ()            # True: sliding-window layer (attention.sliding_window_pattern)
    n_head_l: tuple = ()
    n_head_kv_l: tuple = ()
    n_ff_l: tuple = ()
    n_expert_used_l: tuple = ()
    kv_source: tuple = ()          # the layer whose K/V each layer attends over (itself if it has its own)
    head_dim_swa: int = 0          # attention.key_length_swa (the full layers' is head_dim_k)
    n_rot_swa: int = 0
    rope_base_swa: float = 10000.0
    n_swa: int = 0                 # sliding window: a query sees the last n_swa keys, itself included
    n_kv_shared: int = 0
    n_embd_per_layer: int = 0      # PLE width P (0: no per-layer embeddings)
    final_softcap: float = 0.0

    def to_json(self) -> dict:
        d = super().to_json()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---- hparams ---------------------------------------------------------------------------------

def read_hparams(gf) -> Gemma4HParams:
    a = gf.arch
    k = arch_metadata(gf)
    L = k.int("block_count", min=1, max=MAX_LAYERS)
    D = k.int("embedding_length", min=1, max=MAX_DIM)
    emb = gf.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != D:
        raise GGUFFormatError(gf.path, f"tensor 'token_embd.weight' has shape {emb.shape}, expected (n_vocab, {D})")
    hp = Gemma4HParams(arch=a, n_layer=L, n_embd=D, n_vocab=int(emb.shape[0]),
                       rms_eps=k.float("attention.layer_norm_rms_epsilon", min=0.0, max=1.0))

    key = k.name("attention.sliding_window_pattern")
    if k.has("attention.sliding_window_pattern") and not k.is_array("attention.sliding_window_pattern"):
        raise GGUFFormatError(gf.path, f"metadata key '{key}' is a scalar, not an array: expected one entry per "
                                       f"layer (block_count {L})")
    v = k.bool_array("attention.sliding_window_pattern")
    if len(v) != L:
        raise GGUFFormatError(gf.path, f"metadata key '{key}' has {len(v)} entries, expected one per layer "
                                       f"(block_count {L})")
    hp.sliding = tuple(v)
    hp.recurrent = tuple(False for _ in range(L))

    def layers(suffix, default=REQUIRED):
        return k.int_per_layer(suffix, L, default, exact=True, min=1, max=MAX_DIM)

    hp.n_head_l = layers("attention.head_count")
    hp.n_head_kv_l = layers("attention.head_count_kv", hp.n_head_l)
    for il, (h, hkv) in enumerate(zip(hp.n_head_l, hp.n_head_kv_l)):
        if h % hkv:
            raise GGUFFormatError(gf.path, f"metadata key '{a}.attention.head_count_kv': layer {il} has {hkv} KV "
                                           f"heads, which do not divide its {h} query heads")
    hp.n_head, hp.n_head_kv = max(hp.n_head_l), max(hp.n_head_kv_l)
    hp.n_ff_l = layers("feed_forward_length")
    hp.n_ff = max(hp.n_ff_l)

    # head dims: key_length* are the full layers', key_length_swa* the sliding layers'
    hp.head_dim_k = k.int("attention.key_length", D // hp.n_head_l[0], min=1, max=MAX_DIM)
    hp.head_dim_v = k.int("attention.value_length", hp.head_dim_k, min=1, max=MAX_DIM)
    hp.head_dim_swa = k.int("attention.key_length_swa", min=1, max=MAX_DIM)
    for kk, vk, hk, hv in (("key_length", "value_length", hp.head_dim_k, hp.head_dim_v),
                           ("key_length_swa", "value_length_swa", hp.head_dim_swa, k.int("attention.value_length_swa", min=1, max=MAX_DIM))):
        if hk != hv or hk <= 0 or hk % 2:
            raise GGUFFormatError(gf.path, f"metadata keys '{a}.attention.{kk}' ({hk}) and '{a}.attention.{vk}' "
                                           f"({hv}) must be equal, even and positive (Gemma 4 attends V with K's head dim)")
    hp.n_rot = k.int("rope.dimension_count", hp.head_dim_k)
    hp.n_rot_swa = k.int("rope.dimension_count_swa", hp.n_rot)
    for rk, n_rot, hd in (("rope.dimension_count", hp.n_rot, hp.head_dim_k),
                          ("rope.dimension_count_swa", hp.n_rot_swa, hp.head_dim_swa)):
        if not 0 < n_rot <= hd or n_rot % 2:
            raise GGUFFormatError(gf.path, f"metadata key '{a}.{rk}' is {n_rot}, expected an even count up to the head dim {hd}")
    if not all(hp.sliding) and hp.n_rot != hp.head_dim_k:
        # rope_freqs holds one factor per pair of the full head dim (gemma4.cpp:94-98)
        raise UnsupportedError(gf.path, f"metadata key '{a}.rope.dimension_count' is {hp.n_rot}: full layers that "
                                        f"rotate fewer than their {hp.head_dim_k} dims are not supported")
    hp.rope_base = k.float("rope.freq_base", 10000.0, gt=0.0)
    hp.rope_base_swa = k.float("rope.freq_base_swa", 10000.0, gt=0.0)
    scaling = k.str("rope.scaling.type", "linear")
    factor = k.float("rope.scaling.factor", 0.0, min=0.0)
    if scaling not in ("linear", "none", ""):
        raise UnsupportedError(gf.path, f"rope scaling type {scaling!r} is not supported for gemma4 (supported: linear)")
    hp.rope_freq_scale = 1.0 / factor if factor else 1.0   # full layers only; sliding layers never scale
    hp.rope_mode = "neox"
    hp.attn_scale = 1.0

    hp.n_swa = k.int("attention.sliding_window", min=1, max=MAX_DIM)
    hp.n_kv_shared = k.int("attention.shared_kv_layers", 0, min=0, max=L)
    n_own = L - hp.n_kv_shared
    if not 0 < n_own <= L:
        raise GGUFFormatError(gf.path, f"metadata key '{a}.attention.shared_kv_layers' is {hp.n_kv_shared}: "
                                       f"block_count {L} leaves no layer with its own KV cache")
    source = list(range(n_own))
    for il in range(n_own, L):
        own = [j for j in range(n_own) if hp.sliding[j] == hp.sliding[il]]
        if not own:
            kind = "sliding" if hp.sliding[il] else "full"
            raise GGUFFormatError(gf.path, f"metadata key '{a}.attention.shared_kv_layers' is {hp.n_kv_shared}: "
                                           f"{kind} layer {il} shares KV, but none of layers 0..{n_own - 1} is a "
                                           f"{kind} layer with its own")
        source.append(own[-1])  # the last own layer of its kind (HF's rule; llama.cpp's for the real models)
    hp.kv_source = tuple(source)
    for il, src in enumerate(source):
        if hp.n_head_kv_l[il] != hp.n_head_kv_l[src]:
            raise GGUFFormatError(gf.path, f"metadata key '{a}.attention.head_count_kv': layer {il} has "
                                           f"{hp.n_head_kv_l[il]} KV heads but reads the KV of layer {src}, "
                                           f"which has {hp.n_head_kv_l[src]}")
    hp.n_embd_per_layer = k.int("embedding_length_per_layer_input", min=0, max=MAX_DIM)
    hp.final_softcap = k.float("final_logit_softcapping", 0.0, min=0.0)

    if any(f"blk.{il}.ffn_gate_inp.weight" in gf.tensors for il in range(L)):
        hp.n_expert = k.int("expert_count", min=1, max=MAX_COUNT)
        used = layers("expert_used_count")
        if max(used) > hp.n_expert:
            raise GGUFFormatError(gf.path, f"metadata key '{a}.expert_used_count' ({max(used)}) must be in "
                                           f"1..expert_count ({hp.n_expert})")
        hp.n_expert_used_l = tuple(used)
        hp.n_expert_used = max(used)
        ffe = layers("expert_feed_forward_length")
        if len(set(ffe)) != 1:
            raise UnsupportedError(gf.path, f"metadata key '{a}.expert_feed_forward_length': per-layer expert "
                                            f"widths {sorted(set(ffe))} are not supported")
        hp.n_ff_exp = ffe[0]
        hp.expert_weights_norm = True
    for name in gf.tensors:  # NVFP4-style per-tensor scales of matmul weights (llama-model.cpp:1634-1700)
        if name.endswith((".scale", ".input_scale")) and not name.endswith(("ffn_gate_inp.scale", "ffn_down_exps.scale")):
            raise UnsupportedError(gf.path, f"tensor '{name}': per-tensor weight scales are not supported")
    return hp


# Tensors of the vision / audio towers and their projectors (llama.cpp's mmproj names); a file
# that carries them runs its text model, and says so once.
_MULTIMODAL_PREFIXES = ("v.", "a.", "mm.")
_NOTED: set[str] = set()


def note_multimodal(gf) -> None:
    extra = [n for n in gf.tensors if n.startswith(_MULTIMODAL_PREFIXES)]
    if extra and gf.path not in _NOTED:
        _NOTED.add(gf.path)
        print(f"ggfuse: note: {gf.path}: running the text model; its {len(extra)} vision/audio tensors "
              f"({', '.join(sorted({n.split('.')[0] + '.*' for n in extra}))}) are not used", file=sys.stderr)


# ---- blocks ----------------------------------------------------------------------------------

@dataclass
class _KV:
    """What a layer attends over: its chunk's K/V and (sliding) the rings or (full) the caches
    with the chunk appended. Layers sharing it read the same values."""
    k: Value
    v: Value
    k_state: Value             # sliding: the ring before the chunk; full: cache + chunk (KV_APPEND)
    v_state: Value
    sliding: bool


def _rope(b: Builder, x: Value, pos: Value, *, hp: Gemma4HParams, sliding: bool, name: str) -> Value:
    if sliding:
        return b.op(Op.ROPE, x, pos, name=name, n_dims=hp.n_rot_swa, freq_base=hp.rope_base_swa, freq_scale=1.0,
                    mode="neox", sections=())
    # full layers: proportional partial rotation through the rope_freqs factors (1e30: no rotation)
    ff = b.weight("rope_freqs.weight", (hp.head_dim_k // 2,))
    return b.op(Op.ROPE, x, pos, ff, name=name, n_dims=hp.n_rot, freq_base=hp.rope_base,
                freq_scale=hp.rope_freq_scale, mode="neox", sections=())


def attention(b: Builder, x: Value, *, il: int, hp: Gemma4HParams, pos: Value, kv: dict[int, _KV]) -> Value:
    p = f"blk.{il}"
    sliding = hp.sliding[il]
    D, H, Hkv = hp.n_embd, hp.n_head_l[il], hp.n_head_kv_l[il]
    hd = hp.head_dim_swa if sliding else hp.head_dim_k
    if b.has(f"{p}.attn_qkv.weight"):
        raise UnsupportedError(b.gf.path, f"tensor '{p}.attn_qkv.weight': fused QKV is not supported for gemma4 "
                                          f"(llama.cpp's converter writes attn_q / attn_k / attn_v)")
    q = b.reshape(b.matmul(x, f"{p}.attn_q.weight", H * hd, D), ("T", H, hd), name=f"{p}.q")
    q = b.norm(q, f"{p}.attn_q_norm.weight", hd, hp.rms_eps)
    q = _rope(b, q, pos, hp=hp, sliding=sliding, name=f"{p}.q_rope")
    src = hp.kv_source[il]
    if src == il:
        kr = b.matmul(x, f"{p}.attn_k.weight", Hkv * hd, D, name=f"{p}.k_raw")
        # k_eq_v: no attn_v, V is the raw K projection (before k-norm and RoPE)
        vr = b.matmul(x, f"{p}.attn_v.weight", Hkv * hd, D, name=f"{p}.v_raw") if b.has(f"{p}.attn_v.weight") else kr
        k = b.norm(b.reshape(kr, ("T", Hkv, hd)), f"{p}.attn_k_norm.weight", hd, hp.rms_eps)
        k = _rope(b, k, pos, hp=hp, sliding=sliding, name=f"{p}.k_rope")
        v = b.op(Op.RMS_NORM, b.reshape(vr, ("T", Hkv, hd)), eps=hp.rms_eps, name=f"{p}.v_norm")
        if sliding:
            rows = hp.n_swa  # >= n_swa - 1, the keys before a chunk that its queries can see
            ks = b.input(f"{p}.k_ring", kind="state", shape=(rows, Hkv, hd), state="kv_ring")
            vs = b.input(f"{p}.v_ring", kind="state", shape=(rows, Hkv, hd), state="kv_ring")
        else:
            ks = b.op(Op.KV_APPEND, b.input(f"{p}.k_cache", kind="state", shape=("P", Hkv, hd), state="kv_cache"), k,
                      name=f"{p}.k_all")
            vs = b.op(Op.KV_APPEND, b.input(f"{p}.v_cache", kind="state", shape=("P", Hkv, hd), state="kv_cache"), v,
                      name=f"{p}.v_all")
            b.g.set_output(f"{p}.k_cache", ks)
            b.g.set_output(f"{p}.v_cache", vs)
        kv[il] = _KV(k, v, ks, vs, sliding)
    # A KV-shared layer reads its source's K/V; the attn_k / attn_v / attn_k_norm the published
    # checkpoints still carry for it are unused (llama.cpp loads them as optional and ignores them).
    c = kv[src]
    meta = {"kv_source": src}  # whose K/V this layer attends over (itself, or a KV-shared layer's source)
    if c.sliding:
        o = b.g.add(Op.ATTENTION_WINDOW, (q, c.k, c.v, c.k_state, c.v_state), name=f"{p}.attn",
                    meta={**b._meta(), **meta}, window=hp.n_swa, scale=hp.attn_scale)
        if il == max(j for j, s in enumerate(hp.kv_source) if s == src):
            append_rings(b, c, after=o, src=src)
    else:
        o = b.g.add(Op.ATTENTION, (q, c.k_state, c.v_state), name=f"{p}.attn", meta={**b._meta(), **meta},
                    scale=hp.attn_scale)
    o = b.reshape(o, ("T", H * hd))
    return b.matmul(o, f"{p}.attn_output.weight", D, H * hd)


def append_rings(b: Builder, c: _KV, *, after: Value, src: int) -> None:
    """Write layer src's chunk into its rings once `after`, the last attention reading them, is
    done. Built right after it, so the schedule (node ids break ties) writes the rings there and
    the chunk's K/V die early."""
    for state, new, what in ((c.k_state, c.k, "k"), (c.v_state, c.v, "v")):
        ring = b.op(Op.KV_RING_APPEND, state, new, after, name=f"blk.{src}.{what}_ring_append")
        b.g.set_output(f"blk.{src}.{what}_ring", ring)


def moe(b: Builder, xe: Value, xr: Value, *, il: int, hp: Gemma4HParams) -> Value:
    """Routed GELU experts as llama.cpp's build_moe_ffn runs them for Gemma 4: the router reads
    xr, the experts xe; softmax over all experts, top-k, renormalised, each expert's output times
    ffn_down_exps.scale[e] (folded into the slot weights, as HF does); gate/up fused or not."""
    p = f"blk.{il}"
    D, E, K, F = hp.n_embd, hp.n_expert, hp.n_expert_used_l[il], hp.n_ff_exp
    logits = b.matmul(xr, f"{p}.ffn_gate_inp.weight", E, D, name=f"{p}.router")
    probs = b.op(Op.SOFTMAX, logits, axis=-1, name=f"{p}.router_probs")
    ids = b.op(Op.TOPK, probs, k=K, name=f"{p}.expert_ids")
    w = b.op(Op.TAKE_ALONG, probs, ids, name=f"{p}.expert_weights")
    w = b.op(Op.DIV, w, b.op(Op.SUM, w, axis=-1, keepdims=True), name=f"{p}.expert_weights_norm")
    if b.has(f"{p}.ffn_down_exps.scale"):
        s = b.op(Op.TAKE_ALONG, b.weight(f"{p}.ffn_down_exps.scale", (E,), view=(1, E)), ids, name=f"{p}.expert_scales")
        w = b.op(Op.MUL, w, s, name=f"{p}.expert_weights_scaled")
    if b.has(f"{p}.ffn_gate_up_exps.weight"):
        gu = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_gate_up_exps.weight", (E, 2 * F, D)), xe, ids,
                  name=f"{p}.ffn_gate_up_exps")
        gate, up = b.slice(gu, 2, 0, F), b.slice(gu, 2, F, 2 * F)
    else:
        gate = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_gate_exps.weight", (E, F, D)), xe, ids, name=f"{p}.ffn_gate_exps")
        up = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_up_exps.weight", (E, F, D)), xe, ids, name=f"{p}.ffn_up_exps")
    h = b.op(Op.MUL, b.op(Op.GELU, gate), up, name=f"{p}.ffn_exps_geglu")
    y = b.op(Op.MUL_MAT_ID, b.weight(f"{p}.ffn_down_exps.weight", (E, D, F)), h, ids, name=f"{p}.ffn_down_exps")
    y = b.op(Op.MUL, y, b.reshape(w, ("T", K, 1)), name=f"{p}.ffn_exps_weighted")
    return b.op(Op.SUM, y, axis=1, keepdims=False, name=f"{p}.ffn_moe_out")


def ffn(b: Builder, h: Value, *, il: int, hp: Gemma4HParams) -> Value:
    p = f"blk.{il}"
    D = hp.n_embd
    m = dense_ffn(b, b.norm(h, f"{p}.ffn_norm.weight", D, hp.rms_eps), prefix=p, n_embd=D, n_ff=hp.n_ff_l[il],
                  act=Op.GELU)
    if not b.has(f"{p}.ffn_gate_inp.weight"):
        return m
    # MoE layer: the dense MLP and the experts side by side, each with its own norms
    m = b.norm(m, f"{p}.post_ffw_norm_1.weight", D, hp.rms_eps)
    xe = b.norm(h, f"{p}.pre_ffw_norm_2.weight", D, hp.rms_eps)
    xr = b.op(Op.SCALE, b.op(Op.RMS_NORM, h, eps=hp.rms_eps, name=f"{p}.router_norm"), factor=1.0 / math.sqrt(D))
    xr = b.op(Op.MUL, xr, b.weight(f"{p}.ffn_gate_inp.scale", (D,)), name=f"{p}.router_in")
    me = b.norm(moe(b, xe, xr, il=il, hp=hp), f"{p}.post_ffw_norm_2.weight", D, hp.rms_eps)
    return b.op(Op.ADD, m, me, name=f"{p}.ffn_moe_combined")


def per_layer_inputs(b: Builder, hp: Gemma4HParams, tokens: Value, x0: Value) -> Value:
    """PLE prologue: the token's row of per_layer_token_embd x sqrt(P), plus per_layer_model_proj
    x0 / sqrt(D) normalised per P-slice, summed and / sqrt(2): [T, L, P]."""
    L, P, D = hp.n_layer, hp.n_embd_per_layer, hp.n_embd
    tok = b.op(Op.PLE_GATHER, b.weight("per_layer_token_embd.weight", (hp.n_vocab, L * P)), tokens,
               n_layer=L, width=P, scale=math.sqrt(P), name="per_layer_token_embd")
    proj = b.op(Op.SCALE, b.matmul(x0, "per_layer_model_proj.weight", L * P, D), factor=1.0 / math.sqrt(D))
    proj = b.norm(b.reshape(proj, ("T", L, P)), "per_layer_proj_norm.weight", P, hp.rms_eps)
    return b.op(Op.SCALE, b.op(Op.ADD, proj, tok), factor=1.0 / math.sqrt(2.0), name="per_layer_inputs")


def per_layer_embedding(b: Builder, h: Value, pl: Value, *, il: int, hp: Gemma4HParams) -> Value:
    p, P, D = f"blk.{il}", hp.n_embd_per_layer, hp.n_embd
    g = b.op(Op.GELU, b.matmul(h, f"{p}.inp_gate.weight", P, D))
    pl_il = b.reshape(b.slice(pl, 1, il, il + 1), ("T", P), name=f"{p}.per_layer_input")
    g = b.op(Op.MUL, g, pl_il, name=f"{p}.per_layer_gated")
    e = b.norm(b.matmul(g, f"{p}.proj.weight", D, P), f"{p}.post_norm.weight", D, hp.rms_eps)
    return b.op(Op.ADD, h, e, name=f"{p}.per_layer_residual")


@register_arch("gemma4")
def build(gf):
    hp = read_hparams(gf)
    note_multimodal(gf)
    b = Builder(gf, hp.arch)
    D = hp.n_embd
    emb, pos = embed_inputs(b, hp)
    h = b.op(Op.SCALE, emb, factor=float(np.float32(math.sqrt(D))), name="token_embd_scaled")
    tokens = b.g.inputs()["tokens"].out
    pl = per_layer_inputs(b, hp, tokens, h) if hp.n_embd_per_layer else None
    kv: dict[int, _KV] = {}
    for il in range(hp.n_layer):
        b.layer = il
        p = f"blk.{il}"
        o = attention(b, b.norm(h, f"{p}.attn_norm.weight", D, hp.rms_eps), il=il, hp=hp, pos=pos, kv=kv)
        h = b.op(Op.ADD, b.norm(o, f"{p}.post_attention_norm.weight", D, hp.rms_eps), h, name=f"{p}.attn_residual")
        f = ffn(b, h, il=il, hp=hp)
        h = b.op(Op.ADD, b.norm(f, f"{p}.post_ffw_norm.weight", D, hp.rms_eps), h, name=f"{p}.ffn_residual")
        if pl is not None:
            h = per_layer_embedding(b, h, pl, il=il, hp=hp)
        if b.has(f"{p}.layer_output_scale.weight"):
            h = b.op(Op.MUL, h, b.weight(f"{p}.layer_output_scale.weight", (1,)), name=f"{p}.out_scaled")
    lm_head(b, h, hp, softcap=hp.final_softcap)
    b.g.meta["hparams"] = hp.to_json()
    return b.g
