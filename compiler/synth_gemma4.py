"""Synthetic stand-ins for the Gemma 4 GGUFs (compiler/synth.py writes them; these are the presets).

What convert_hf_to_gguf.py (conversion/gemma.py `Gemma4Model`, conversion/base.py) writes for the
text model of a Gemma 4 checkpoint and what llama-quantize (src/llama-quant.cpp) makes of it, as
vendored in llama-cpp-python 0.3.36: the metadata keys in the converter's order, the tensor names
and GGUF shapes that src/models/gemma4.cpp loads, and the type rules of synth._assign_types (the
tied token embedding and per_layer_token_embd take the output's Q6_K; per_layer_model_proj is
never quantized and keeps the F16 of the conversion the published files come from; rows of 704 or
2112, the 26B-A4B's expert and dense FFN, fall back to Q5_0 / Q8_0).

Where each preset's numbers come from (see the references in ../../shared/reference/gemma4-llama-cpp.md):
  gemma4-e2b      google/gemma-4-E2B-it text_config as quoted in public code (1536 wide, 35 layers,
                  8 heads, 1 KV head, head dims 256 / 512, FFN 6144 doubled on the 20 KV-shared
                  layers, PLE 256, window 512, 131072 context), and a llama.cpp load log of the
                  published gemma-4-E2B-it-Q4_K_M.gguf (the same keys; 601 tensors: the KV-shared
                  layers still carry attn_k / attn_v / attn_k_norm, unused; eos <turn|> = 106)
  gemma4-e4b      google/gemma-4-E4B-it text_config as quoted (2560, 42 layers, 8 heads, 2 KV heads,
                  FFN 10240 not doubled, 18 KV-shared layers, PLE 256, window 512, 131072)
  gemma4-31b      google/gemma-4-31B-it text_config as quoted (5376, 60 layers, 32 heads, 16 KV heads,
                  4 on the k_eq_v full layers, FFN 21504, window 1024, 262144 context, no PLE)
  gemma4-26b-a4b  the gemma4.* keys of the GGUF header llama.cpp itself ships as
                  models/ggml-vocab-gemma-4.gguf (general.architecture gemma4, 30 layers, 2816 wide,
                  16 heads, KV heads 8 / 2, FFN 2112, 128 experts, top 8, expert FFN 704, key length
                  512 / 256, window 1024, 262144 context, soft-cap 30); k_eq_v on the full layers
All four: layer_types sliding except every 5th (E2B) or 6th layer, rope_theta 1e4 sliding / 1e6
full with partial_rotary_factor 0.25 ("proportional", hence rope_freqs), rms_norm_eps 1e-6,
final_logit_softcapping 30, a 262144-token vocabulary, tied embeddings.

The tokenizer is a small stand-in laid out like Gemma 4's (specials 0-4, <|turn>/<turn|> at
105/106, "\\n" at 107, the 256 byte tokens at 238, SentencePiece-style merges, model "gemma4").
`layers=N` keeps the real model's first N layers: the sliding pattern, the FFN widths and the KV
sharing of those layers (so KV-shared layers appear only past the real model's own ones).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Gemma4Preset", "GEMMA4_PRESETS"]


@dataclass(frozen=True)
class Gemma4Preset:
    name: str
    hf_repo: str
    size_label: str
    n_layer: int                 # num_hidden_layers
    n_embd: int                  # hidden_size
    n_head: int                  # num_attention_heads
    n_head_kv: int               # num_key_value_heads (sliding layers; full ones too unless below)
    head_dim: int                # head_dim (sliding layers)
    head_dim_full: int           # global_head_dim
    n_ff: int                    # intermediate_size
    full_every: int              # layer_types: full attention at (il + 1) % full_every == 0
    sliding_window: int
    context_length: int          # max_position_embeddings
    n_head_kv_full: int | None = None    # num_global_key_value_heads (k_eq_v models)
    k_eq_v: bool = False                 # attention_k_eq_v: full layers have no attn_v
    double_wide_mlp: bool = False        # use_double_wide_mlp: FFN x2 on the KV-shared layers
    n_kv_shared: int = 0                 # num_kv_shared_layers
    n_embd_per_layer: int = 0            # hidden_size_per_layer_input (PLE)
    n_expert: int = 0
    n_expert_used: int = 0               # top_k_experts
    n_ff_exp: int = 0                    # moe_intermediate_size
    n_vocab: int = 262144
    rope_theta: float = 1_000_000.0      # full_attention
    rope_theta_swa: float = 10_000.0     # sliding_attention
    partial_rotary_full: float = 0.25
    rms_eps: float = 1e-6
    softcap: float = 30.0
    n_layer_real: int = 0                # the unshortened model's layer count (0: n_layer)
    arch: str = "gemma4"

    # ---- the structure -----------------------------------------------------------------------
    @property
    def n_own(self) -> int:
        """Layers with their own KV (the real model's first ones; layers=N keeps their count)."""
        return (self.n_layer_real or self.n_layer) - self.n_kv_shared

    @property
    def shared_kv_layers(self) -> int:
        return max(0, self.n_layer - self.n_own)

    def is_swa(self, il: int) -> bool:
        return (il + 1) % self.full_every != 0

    def head_dim_of(self, il: int) -> int:
        return self.head_dim if self.is_swa(il) else self.head_dim_full

    def kv_heads_of(self, il: int) -> int:
        return self.n_head_kv if self.is_swa(il) or not self.n_head_kv_full else self.n_head_kv_full

    def ff_of(self, il: int) -> int:
        return self.n_ff * (2 if self.double_wide_mlp and il >= self.n_own else 1)

    def reduced(self, *, layers: int | None, vocab: int | None, experts: int | None) -> "Gemma4Preset":
        """layers / vocab / experts overrides (synth._resolve checks the ranges)."""
        p = self
        if layers is not None:
            p = replace(p, n_layer=layers, n_layer_real=self.n_layer_real or self.n_layer)
        if vocab is not None:
            p = replace(p, n_vocab=vocab)
        if experts is not None:
            p = replace(p, n_expert=experts, n_expert_used=min(p.n_expert_used, experts))
        return p

    # ---- tensors -----------------------------------------------------------------------------
    def tensor_table(self) -> list:
        from ggfuse.compiler.synth import _NORM, _OUT_GAIN, TensorSpec, _sort_like_quantize, _w
        e, L, P = self.n_embd, self.n_layer, self.n_embd_per_layer
        n_rot_pairs = int(self.head_dim_full * self.partial_rotary_full) // 2
        specs = [TensorSpec("token_embd.weight", (e, self.n_vocab), ("w", 0.02)),
                 TensorSpec("output_norm.weight", (e,), _NORM)]
        if not all(self.is_swa(il) for il in range(L)):
            # the full layers' proportional RoPE: the first pairs rotate, the rest get 1e30 (llama.cpp
            # loads it with the first full layer and refuses a file whose tensors it does not load)
            specs.append(TensorSpec("rope_freqs.weight", (self.head_dim_full // 2,), ("rope_freqs", n_rot_pairs)))
        if P:
            specs += [TensorSpec("per_layer_token_embd.weight", (P * L, self.n_vocab), ("w", 0.02)),
                      TensorSpec("per_layer_model_proj.weight", (e, P * L), _w(e)),
                      TensorSpec("per_layer_proj_norm.weight", (P,), _NORM)]
        for il in range(L):
            b = f"blk.{il}."
            hd, hkv, H, f = self.head_dim_of(il), self.kv_heads_of(il), self.n_head, self.ff_of(il)
            specs += [
                TensorSpec(b + "attn_norm.weight", (e,), _NORM),
                TensorSpec(b + "attn_q.weight", (e, H * hd), _w(e)),
                # KV-shared layers keep the (unused) K/V of the checkpoint, as the published files do
                TensorSpec(b + "attn_k.weight", (e, hkv * hd), _w(e)),
                TensorSpec(b + "attn_k_norm.weight", (hd,), _NORM),
                TensorSpec(b + "attn_output.weight", (H * hd, e), _w(H * hd, _OUT_GAIN)),
                TensorSpec(b + "attn_q_norm.weight", (hd,), _NORM),
                TensorSpec(b + "post_attention_norm.weight", (e,), _NORM),
                TensorSpec(b + "layer_output_scale.weight", (1,), _NORM),
                TensorSpec(b + "ffn_norm.weight", (e,), _NORM),
                TensorSpec(b + "ffn_gate.weight", (e, f), _w(e)),
                TensorSpec(b + "ffn_up.weight", (e, f), _w(e)),
                TensorSpec(b + "ffn_down.weight", (f, e), _w(f, _OUT_GAIN)),
                TensorSpec(b + "post_ffw_norm.weight", (e,), _NORM),
            ]
            if not (self.k_eq_v and not self.is_swa(il)):
                specs.append(TensorSpec(b + "attn_v.weight", (e, hkv * hd), _w(e)))
            if self.n_expert:
                n, fe = self.n_expert, self.n_ff_exp
                specs += [
                    TensorSpec(b + "ffn_gate_inp.weight", (e, n), _w(1.0)),   # its input is rms(h) / sqrt(D)
                    TensorSpec(b + "ffn_gate_inp.scale", (e,), _NORM),
                    TensorSpec(b + "pre_ffw_norm_2.weight", (e,), _NORM),
                    TensorSpec(b + "post_ffw_norm_1.weight", (e,), _NORM),
                    TensorSpec(b + "post_ffw_norm_2.weight", (e,), _NORM),
                    TensorSpec(b + "ffn_gate_up_exps.weight", (e, 2 * fe, n), _w(e)),
                    TensorSpec(b + "ffn_down_exps.weight", (fe, e, n), _w(fe, _OUT_GAIN)),
                    TensorSpec(b + "ffn_down_exps.scale", (n,), _NORM),
                ]
            if P:
                specs += [TensorSpec(b + "inp_gate.weight", (e, P), _w(e)),
                          TensorSpec(b + "proj.weight", (P, e), _w(P, _OUT_GAIN)),
                          TensorSpec(b + "post_norm.weight", (e,), _NORM)]
        return _sort_like_quantize(specs)

    # ---- metadata ----------------------------------------------------------------------------
    def add_metadata(self, w, file_type: int, seed: int) -> None:
        """The KV pairs in the order Gemma4Model.set_gguf_parameters writes them."""
        a, L = self.arch, self.n_layer
        w.add_string("general.type", "model")
        w.add_string("general.name", f"{self.hf_repo.split('/')[1]} (ggfuse synthetic)")
        w.add_string("general.basename", self.hf_repo.split("/")[1])
        w.add_string("general.size_label", self.size_label)
        w.add_string("general.description",
                     f"ggfuse synthetic stand-in for {self.hf_repo}: real structure, random weights (seed {seed})")
        w.add_uint32(f"{a}.block_count", L)
        w.add_uint32(f"{a}.context_length", self.context_length)
        w.add_uint32(f"{a}.embedding_length", self.n_embd)
        if self.double_wide_mlp:   # written as an array when the KV-shared layers' FFN is doubled
            w.add_array(f"{a}.feed_forward_length", [self.ff_of(il) for il in range(L)])
        else:
            w.add_uint32(f"{a}.feed_forward_length", self.n_ff)
        w.add_uint32(f"{a}.attention.head_count", self.n_head)
        if self.n_head_kv_full:    # an array only where the full layers have their own count
            w.add_array(f"{a}.attention.head_count_kv", [self.kv_heads_of(il) for il in range(L)])
        else:
            w.add_uint32(f"{a}.attention.head_count_kv", self.n_head_kv)
        w.add_float32(f"{a}.rope.freq_base", self.rope_theta)
        w.add_float32(f"{a}.rope.freq_base_swa", self.rope_theta_swa)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", self.rms_eps)
        if self.n_expert:
            w.add_uint32(f"{a}.expert_count", self.n_expert)
            w.add_uint32(f"{a}.expert_used_count", self.n_expert_used)
        w.add_uint32(f"{a}.attention.key_length", self.head_dim_full)
        w.add_uint32(f"{a}.attention.value_length", self.head_dim_full)
        w.add_uint32("general.file_type", file_type)
        w.add_float32(f"{a}.final_logit_softcapping", self.softcap)
        w.add_uint32(f"{a}.attention.sliding_window", self.sliding_window)
        w.add_uint32(f"{a}.attention.shared_kv_layers", self.shared_kv_layers)
        w.add_uint32(f"{a}.embedding_length_per_layer_input", self.n_embd_per_layer)
        w.add_array(f"{a}.attention.sliding_window_pattern", [self.is_swa(il) for il in range(L)])
        w.add_uint32(f"{a}.attention.key_length_swa", self.head_dim)
        w.add_uint32(f"{a}.attention.value_length_swa", self.head_dim)
        if self.n_expert:
            w.add_uint32(f"{a}.expert_feed_forward_length", self.n_ff_exp)
        w.add_uint32(f"{a}.rope.dimension_count", self.head_dim_full)   # all dims: rope_freqs does the partial
        w.add_uint32(f"{a}.rope.dimension_count_swa", self.head_dim)
        tokens, types, merges = _vocab(self.n_vocab)
        w.add_string("tokenizer.ggml.model", "gemma4")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", [-1000.0] * len(tokens))
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", 2)
        w.add_uint32("tokenizer.ggml.eos_token_id", 106)       # <turn|> (the -it files)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
        w.add_uint32("tokenizer.ggml.padding_token_id", 0)
        w.add_uint32("tokenizer.ggml.mask_token_id", 4)
        w.add_string("tokenizer.chat_template", _CHAT_TEMPLATE)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_uint32("general.quantization_version", 2)


# ---- tokenizer -----------------------------------------------------------------------------------

_SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<|turn>", 106: "<turn|>"}
_NEWLINE, _FIRST_BYTE = 107, 238
_MERGES = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("i", "n"), ("\u2581", "a"), ("o", "n"), ("e", "r")]
_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
MIN_VOCAB = 512


def _vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) padded to n_vocab: the real layout's fixed ids, the byte
    tokens, '\u2581' and the printable ASCII characters, the merge results, then fillers."""
    NORMAL, CONTROL, BYTE = 1, 3, 6
    tokens = [_SPECIALS.get(i, f"<unused{i}>") for i in range(_FIRST_BYTE)]
    tokens[_NEWLINE] = "\n"
    types = [CONTROL if i in _SPECIALS else NORMAL for i in range(_FIRST_BYTE)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("!"), ord("~") + 1)] + [x + y for x, y in _MERGES]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    tokens += [f"tok{i}" for i in range(len(tokens), n_vocab)]
    types += [NORMAL] * (n_vocab - len(types))
    return tokens, types, [f"{x} {y}" for x, y in _MERGES]


# ---- the presets -----------------------------------------------------------------------------------

GEMMA4_PRESETS: dict[str, Gemma4Preset] = {p.name: p for p in [
    Gemma4Preset("gemma4-e2b", "google/gemma-4-E2B-it", "E2B", n_layer=35, n_embd=1536, n_head=8, n_head_kv=1,
                 head_dim=256, head_dim_full=512, n_ff=6144, double_wide_mlp=True, n_kv_shared=20,
                 n_embd_per_layer=256, full_every=5, sliding_window=512, context_length=131072),
    Gemma4Preset("gemma4-e4b", "google/gemma-4-E4B-it", "E4B", n_layer=42, n_embd=2560, n_head=8, n_head_kv=2,
                 head_dim=256, head_dim_full=512, n_ff=10240, n_kv_shared=18, n_embd_per_layer=256,
                 full_every=6, sliding_window=512, context_length=131072),
    Gemma4Preset("gemma4-31b", "google/gemma-4-31B-it", "31B", n_layer=60, n_embd=5376, n_head=32, n_head_kv=16,
                 n_head_kv_full=4, k_eq_v=True, head_dim=256, head_dim_full=512, n_ff=21504, full_every=6,
                 sliding_window=1024, context_length=262144),
    Gemma4Preset("gemma4-26b-a4b", "google/gemma-4-26B-A4B-it", "26B-A4B", n_layer=30, n_embd=2816, n_head=16,
                 n_head_kv=8, n_head_kv_full=2, k_eq_v=True, head_dim=256, head_dim_full=512, n_ff=2112,
                 n_expert=128, n_expert_used=8, n_ff_exp=704, full_every=6, sliding_window=1024,
                 context_length=262144),
]}
