"""Synthetic stand-ins for real Qwen and Gemma 4 GGUF checkpoints.

Real checkpoints cannot be downloaded where ggfuse is developed, so this
module writes GGUF files with the *structure* of the real thing -- the
metadata keys, tensor names, GGUF shapes and ggml types that llama.cpp's
``convert_hf_to_gguf.py`` followed by ``llama-quantize`` would produce -- and
random but well-scaled weights. The tokenizer is a real one, so that the files take text:
llama.cpp's vocab-only GGUF of the Qwen family (compiler/vocab/ggml-vocab-qwen35.gguf, padded
with UNUSED [PAD<id>] rows to the preset's vocab size) and the model's chat template.

Sources: llama.cpp as vendored in llama-cpp-python 0.3.36
(``conversion/qwen.py`` and ``conversion/base.py`` for the keys and the
tensors the converter keeps in F32, ``src/llama-quant.cpp`` for the
Q4_K_M / Q8_0 type rules and the tensor order of a quantized file,
``src/models/*.cpp`` for the tensor shapes) and the models' published HF
configs. See ``PRESETS`` for the numbers; the Gemma 4 presets live in
``compiler/synth_gemma4.py`` with their own sources.

Quantized tensors are not quantized from float data: random *valid* blocks
are generated directly (random quants and sub-block scales, a super-block
scale chosen for the wanted std), which is what makes writing ~20 GB take
minutes instead of hours. Everything is deterministic given ``seed``: a
tensor's bytes depend only on (seed, name, shape, ggml type), so a shortened
file's layers match the full model's first layers wherever the quant mix
gives them the same type.

Not modelled: the MTP (next-token-prediction) block. The current converter
exports it by default (block_count 41 and nextn_predict_layers for
Qwen3.5-35B-A3B), but the GGUFs people actually run were made without it
(e.g. 733 tensors, block_count 40 for Qwen3.5-35B-A3B Q4_K_M), so the presets
follow those.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, TokenType
from gguf.constants import GGML_QUANT_SIZES

from ggfuse.compiler.synth_gemma4 import GEMMA4_PRESETS
from ggfuse.errors import GGFuseError, UnsupportedError

__all__ = ["PRESETS", "QUANTS", "Preset", "write_synth", "describe", "add_synth_parser", "synth_main"]


# --------------------------------------------------------------------------
# Presets: the HF config numbers of the real models
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    arch: str                   # GGUF general.architecture
    hf_repo: str
    size_label: str
    n_layer: int                # num_hidden_layers (MTP block not counted, see module notes)
    n_embd: int                 # hidden_size
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int                # vocab_size (embedding rows, padded)
    context_length: int         # max_position_embeddings
    rope_theta: float
    rms_eps: float
    n_ff: int | None = None                 # intermediate_size (dense FFN); None: key not in config
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int | None = None             # moe_intermediate_size
    n_ff_shexp: int | None = None           # shared_expert_intermediate_size
    partial_rotary: float | None = None     # hybrid archs: rope.dimension_count = head_dim * this
    mrope_sections: tuple[int, ...] | None = None
    full_attention_interval: int | None = None   # hybrid archs: every Nth layer is full attention
    write_layer_types: bool = False         # config.json has layer_types -> attention.recurrent_layers
    ssm_conv_kernel: int = 0                # linear_conv_kernel_dim
    ssm_k_heads: int = 0                    # linear_num_key_heads
    ssm_v_heads: int = 0                    # linear_num_value_heads
    ssm_k_dim: int = 0                      # linear_key_head_dim
    ssm_v_dim: int = 0                      # linear_value_head_dim
    tokenizer_pre: str = "qwen2"
    chat_template: str = "Qwen-Qwen3-0.6B.jinja"   # in compiler/vocab/

    @property
    def hybrid(self) -> bool:
        return self.full_attention_interval is not None

    def is_recurrent(self, il: int) -> bool:
        """Gated DeltaNet layer? (llama.cpp's rule: full attention iff (il+1) % interval == 0)."""
        return self.hybrid and (il + 1) % self.full_attention_interval != 0


_QWEN35_LINEAR = dict(
    partial_rotary=0.25, full_attention_interval=4, ssm_conv_kernel=4,
    ssm_k_heads=16, ssm_v_heads=32, ssm_k_dim=128, ssm_v_dim=128,
)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    # Qwen/Qwen3.5-35B-A3B (text_config). 40 layers = 10 x (3 DeltaNet + 1 attention).
    Preset("qwen3.5-35b-a3b", "qwen35moe", "Qwen/Qwen3.5-35B-A3B", "35B-A3B",
           n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
           n_vocab=248320, context_length=262144,
           rope_theta=10_000_000.0, rms_eps=1e-6,
           n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512,
           mrope_sections=(11, 11, 10, 0), write_layer_types=True, tokenizer_pre="qwen35",
           chat_template="Qwen3.5-4B.jinja",
           **_QWEN35_LINEAR),
    # Qwen/Qwen3.5-9B: the largest dense Qwen3.5 that llama.cpp names (qwen35.cpp:
    # 32 layers & n_embd != 2560 -> 9B); published model card numbers.
    Preset("qwen3.5-9b", "qwen35", "Qwen/Qwen3.5-9B", "9B",
           n_layer=32, n_embd=4096, n_head=16, n_head_kv=4, head_dim=256,
           n_vocab=248320, context_length=262144,
           rope_theta=10_000_000.0, rms_eps=1e-6, n_ff=12288,
           mrope_sections=(11, 11, 10, 0), write_layer_types=True, tokenizer_pre="qwen35",
           chat_template="Qwen3.5-4B.jinja",
           **_QWEN35_LINEAR),
    # Qwen/Qwen3-Next-80B-A3B-Instruct. 48 layers = 12 x (3 DeltaNet + 1 attention).
    Preset("qwen3-next-80b-a3b", "qwen3next", "Qwen/Qwen3-Next-80B-A3B-Instruct", "80B-A3B",
           n_layer=48, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
           n_vocab=151936, context_length=262144,
           rope_theta=10_000_000.0, rms_eps=1e-6, n_ff=5120,
           n_expert=512, n_expert_used=10, n_ff_exp=512, n_ff_shexp=512,
           **_QWEN35_LINEAR),
    # Qwen/Qwen3-30B-A3B.
    Preset("qwen3-30b-a3b", "qwen3moe", "Qwen/Qwen3-30B-A3B", "30B-A3B",
           n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
           n_vocab=151936, context_length=40960,
           rope_theta=1_000_000.0, rms_eps=1e-6, n_ff=6144,
           n_expert=128, n_expert_used=8, n_ff_exp=768),
]}

PRESETS.update(GEMMA4_PRESETS)

# quant name -> (general.file_type, default type of quantizable tensors)
QUANTS: dict[str, tuple[int, QT]] = {
    "f32": (0, QT.F32),       # LLAMA_FTYPE_ALL_F32
    "bf16": (32, QT.BF16),    # LLAMA_FTYPE_MOSTLY_BF16
    "q8_0": (7, QT.Q8_0),     # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_k_m": (15, QT.Q4_K),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnsupportedError(None, f"unknown preset '{name}' (available: {', '.join(PRESETS)})")
    return PRESETS[name]


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UnsupportedError(None, f"unknown quant '{quant}' (available: {', '.join(QUANTS)})")


# --------------------------------------------------------------------------
# Tensor table
# --------------------------------------------------------------------------

# How a tensor's values are drawn (see _gen_f32): ("w", std) for weights,
# or one of the special initialisers for the small F32 tensors.
@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]         # ggml order (ne[0] = row length)
    init: tuple
    ggml_type: QT = QT.F32

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block * size


def _w(fan_in: int, gain: float = 1.0) -> tuple:
    return ("w", gain / np.sqrt(fan_in))


# Residual-branch outputs get a smaller gain so that the residual stream of a
# 40-48 layer stack grows slowly (RMSNorm before every block does the rest).
_OUT_GAIN = 0.5
_NORM = ("norm",)


def _layer_tensors(p: Preset, il: int) -> Iterator[TensorSpec]:
    e, b = p.n_embd, f"blk.{il}."
    yield TensorSpec(b + "attn_norm.weight", (e,), _NORM)
    if p.is_recurrent(il):
        # Gated DeltaNet. ggml shapes from qwen35*.cpp / qwen3next.cpp.
        key_dim, value_dim = p.ssm_k_heads * p.ssm_k_dim, p.ssm_v_heads * p.ssm_v_dim
        conv_dim = 2 * key_dim + value_dim
        yield TensorSpec(b + "attn_qkv.weight", (e, conv_dim), _w(e))
        yield TensorSpec(b + "attn_gate.weight", (e, value_dim), _w(e))
        yield TensorSpec(b + "ssm_conv1d.weight", (p.ssm_conv_kernel, conv_dim), ("conv",))
        yield TensorSpec(b + "ssm_dt.bias", (p.ssm_v_heads,), ("dt_bias",))
        yield TensorSpec(b + "ssm_a", (p.ssm_v_heads,), ("ssm_a",))
        if p.arch == "qwen3next":
            # Qwen3-Next keeps in_proj_ba fused (beta and alpha per value head).
            yield TensorSpec(b + "ssm_ba.weight", (e, 2 * p.ssm_v_heads), _w(e))
        else:
            yield TensorSpec(b + "ssm_beta.weight", (e, p.ssm_v_heads), _w(e))
            yield TensorSpec(b + "ssm_alpha.weight", (e, p.ssm_v_heads), _w(e))
        yield TensorSpec(b + "ssm_norm.weight", (p.ssm_v_dim,), _NORM)
        yield TensorSpec(b + "ssm_out.weight", (value_dim, e), _w(value_dim, _OUT_GAIN))
    else:
        q_dim, kv_dim = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
        # Hybrid archs have gated attention: attn_q holds query and gate rows.
        yield TensorSpec(b + "attn_q.weight", (e, q_dim * (2 if p.hybrid else 1)), _w(e))
        yield TensorSpec(b + "attn_k.weight", (e, kv_dim), _w(e))
        yield TensorSpec(b + "attn_v.weight", (e, kv_dim), _w(e))
        yield TensorSpec(b + "attn_output.weight", (q_dim, e), _w(q_dim, _OUT_GAIN))
        yield TensorSpec(b + "attn_q_norm.weight", (p.head_dim,), _NORM)
        yield TensorSpec(b + "attn_k_norm.weight", (p.head_dim,), _NORM)
    # Qwen3.5/Next name the pre-FFN norm post_attention_norm, Qwen3 ffn_norm.
    yield TensorSpec(b + ("post_attention_norm.weight" if p.hybrid else "ffn_norm.weight"), (e,), _NORM)
    if p.n_expert:
        n, f = p.n_expert, p.n_ff_exp
        # Router in F32, std 1/sqrt(e): logits ~N(0,1), so routing spreads over experts.
        yield TensorSpec(b + "ffn_gate_inp.weight", (e, n), _w(e))
        yield TensorSpec(b + "ffn_gate_exps.weight", (e, f, n), _w(e))
        yield TensorSpec(b + "ffn_up_exps.weight", (e, f, n), _w(e))
        yield TensorSpec(b + "ffn_down_exps.weight", (f, e, n), _w(f, _OUT_GAIN))
        if p.n_ff_shexp:
            s = p.n_ff_shexp
            yield TensorSpec(b + "ffn_gate_inp_shexp.weight", (e,), _w(e))
            yield TensorSpec(b + "ffn_gate_shexp.weight", (e, s), _w(e))
            yield TensorSpec(b + "ffn_up_shexp.weight", (e, s), _w(e))
            yield TensorSpec(b + "ffn_down_shexp.weight", (s, e), _w(s, _OUT_GAIN))
    else:
        yield TensorSpec(b + "ffn_gate.weight", (e, p.n_ff), _w(e))
        yield TensorSpec(b + "ffn_up.weight", (e, p.n_ff), _w(e))
        yield TensorSpec(b + "ffn_down.weight", (p.n_ff, e), _w(p.n_ff, _OUT_GAIN))


def _tensor_table(p: Preset) -> list[TensorSpec]:
    specs = [
        TensorSpec("token_embd.weight", (p.n_embd, p.n_vocab), ("w", 0.02)),
        TensorSpec("output_norm.weight", (p.n_embd,), _NORM),
        TensorSpec("output.weight", (p.n_embd, p.n_vocab), _w(p.n_embd)),
    ]
    for il in range(p.n_layer):
        specs.extend(_layer_tensors(p, il))
    return _sort_like_quantize(specs)


def _sort_like_quantize(specs: list[TensorSpec]) -> list[TensorSpec]:
    """llama-quantize writes tensors in llama_model_loader's weights_map order:
    by layer (non-layer tensors first), then by name."""
    def key(s: TensorSpec):
        layer = int(s.name.split(".")[1]) if s.name.startswith("blk.") else -1
        return (layer, s.name)
    return sorted(specs, key=key)


# --------------------------------------------------------------------------
# ggml type selection (llama-quant.cpp rules, for the mixes we write)
# --------------------------------------------------------------------------

def _stays_float(s: TensorSpec) -> bool:
    """Tensors that neither the converter nor llama-quantize quantize: 1-D,
    norms, names not ending in 'weight' (ssm_a, ssm_dt.bias), the expert
    router and the conv1d kernel. The converter stores all of these as F32."""
    n = s.name
    return (len(s.ne) < 2 or not n.endswith("weight") or n.endswith("_norm.weight")
            or "ffn_gate_inp" in n or "ssm_conv1d" in n)


def _use_more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: first and last eighth of the layers, and every third in between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Q4_K/Q5_K/Q6_K need rows of 256, llama-quantize falls back to these.
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _assign_types(specs: list[TensorSpec], p: Preset, quant: str) -> list[TensorSpec]:
    _, default = QUANTS[quant]
    if quant in ("f32", "bf16"):
        # Converter output: everything not kept in F32 gets the file's type.
        return [replace(s, ggml_type=QT.F32 if _stays_float(s) else default) for s in specs]

    n_layer = p.n_layer
    tied = not any(s.name == "output.weight" for s in specs)
    n_attn_v = sum(1 for s in specs if s.name.endswith(("attn_v.weight", "attn_qkv.weight")))
    i_attn_v = i_ffn_down = 0
    out = []
    for s in specs:
        n, t = s.name, default
        if _stays_float(s):
            out.append(replace(s, ggml_type=QT.F32))
            continue
        layer = int(n.split(".")[1]) if n.startswith("blk.") else -1
        if n == "output.weight" or (tied and n in ("token_embd.weight", "per_layer_token_embd.weight")):
            # per_layer_token_embd (Gemma 4) counts as a token embedding (tensor_get_category)
            t = QT.Q8_0 if s.ne[0] % 256 else (QT.Q6_K if t != QT.Q8_0 else t)
        elif "per_layer_model_proj" in n:
            # never quantized (tensor_allows_quantization): it keeps the F16 of the conversion
            out.append(replace(s, ggml_type=QT.F16))
            continue
        elif n == "token_embd.weight":
            pass  # Q4_K_M and Q8_0 leave the token embedding at the default type
        elif n.endswith(("attn_v.weight", "attn_qkv.weight")):
            # attn_qkv counts as attn_v (category_is_attn_v), so the DeltaNet
            # in-projection gets the attn_v treatment.
            if quant == "q4_k_m" and _use_more_bits(i_attn_v, n_attn_v):
                t = QT.Q6_K
            if p.n_expert == 8:
                t = QT.Q8_0
            i_attn_v += 1
        elif n.endswith("attn_k.weight"):
            if p.n_expert == 8:
                t = QT.Q8_0
        elif "ffn_down" in n:
            # MoE models: layer from the name; dense: a running count (one per layer).
            i_layer = layer if max(1, p.n_expert) > 1 else i_ffn_down
            if quant == "q4_k_m" and _use_more_bits(i_layer, n_layer):
                t = QT.Q6_K
            i_ffn_down += 1
        elif n.endswith("attn_output.weight"):
            if quant == "q4_k_m" and p.n_expert == 8:
                t = QT.Q5_K
        block = GGML_QUANT_SIZES[t][0]
        if s.ne[0] % block:
            t = _FALLBACK.get(t, t)
            if s.ne[0] % GGML_QUANT_SIZES[t][0]:
                t = QT.F16
        out.append(replace(s, ggml_type=t))
    return out


# --------------------------------------------------------------------------
# Random data generators
# --------------------------------------------------------------------------

# Bytes generated per step; fixed, so the output does not depend on anything
# but (seed, name).
_CHUNK = 16 << 20


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64DXSM([seed, zlib.crc32(name.encode())]))


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # random_raw is the fastest way numpy has to make random bits (~1 GB/s).
    words = rng.bit_generator.random_raw((n + 7) // 8)
    return words.view(np.uint8)[:n]


def _f16_bytes(x: float, n: int) -> np.ndarray:
    return np.full(n, x, dtype=np.float16).view(np.uint8).reshape(n, 2)


# std of one dequantized value per unit of the block's f16 scale `d`, for
# uniformly random quants and sub-block scales (see _gen_blocks):
#   K-quants with sc == m (6-bit, uniform 0..63, E[sc^2] = 1333.5):
#     Q4_K: E[(q-7.5)^2] = 21.25 ; Q5_K: E[(q-15.5)^2] = 85.25
#   Q6_K: int8 scales (E[s^2] = 5461.5) * E[(q-32)^2] = 341.5
#   Q8_0: E[q^2] = 5461.5 ; Q5_0: E[(q-16)^2] = 85.5 ; Q5_1 like Q5_K's 85.25
_UNIT_STD = {
    QT.Q4_K: np.sqrt(1333.5 * 21.25), QT.Q5_K: np.sqrt(1333.5 * 85.25),
    QT.Q6_K: np.sqrt(5461.5 * 341.5), QT.Q8_0: np.sqrt(5461.5),
    QT.Q5_0: np.sqrt(85.5), QT.Q5_1: np.sqrt(85.25),
}


def _gen_blocks(rng: np.random.Generator, t: QT, n_blocks: int, std: float) -> np.ndarray:
    """n_blocks random but valid blocks of type t whose dequantized values have
    mean ~0 and the given std. Block layouts: ggml-common.h."""
    size = GGML_QUANT_SIZES[t][1]
    b = _random_bytes(rng, n_blocks * size).reshape(n_blocks, size)
    d = float(np.float16(std / _UNIT_STD[t]))
    if t in (QT.Q4_K, QT.Q5_K):
        # d, dmin (f16), 12 bytes of packed 6-bit (scale, min) pairs, quants.
        # Making every min equal its scale and dmin = (q_max/2) * d centres each
        # sub-block on zero: x = d*sc*q - dmin*m = d*sc*(q - q_max/2).
        half = 7.5 if t == QT.Q4_K else 15.5
        b[:, 0:2] = _f16_bytes(d, n_blocks)
        b[:, 2:4] = _f16_bytes(half * d, n_blocks)
        b[:, 8:12] = b[:, 4:8]                 # mins 0-3 (+ high bits of 4-7) = scales'
        b[:, 12:16] = (b[:, 12:16] & 0x0F) * 0x11  # low nibbles of scales/mins 4-7 equal
    elif t == QT.Q6_K:
        b[:, 208:210] = _f16_bytes(d, n_blocks)    # ql, qh, int8 scales[16], d
    elif t == QT.Q8_0:
        b[:, 0:2] = _f16_bytes(d, n_blocks)
    elif t == QT.Q5_0:
        b[:, 0:2] = _f16_bytes(d, n_blocks)
    elif t == QT.Q5_1:
        b[:, 0:2] = _f16_bytes(d, n_blocks)
        b[:, 2:4] = _f16_bytes(-15.5 * d, n_blocks)  # m: x = d*q + m
    else:
        raise UnsupportedError(None, f"synth cannot generate ggml type {t.name}")
    return b


def _gen_f32(rng: np.random.Generator, init: tuple, n: int) -> np.ndarray:
    kind = init[0]
    if kind == "w":
        # Uniform with the wanted std: the shape of the distribution does not
        # matter here, and int16 bits -> float is ~4x faster than standard_normal.
        scale = np.float32(init[1] * np.sqrt(3.0) / 32768.0)
        return _random_bytes(rng, 2 * n).view(np.int16).astype(np.float32) * scale
    if kind == "norm":
        # RMSNorm weights ~1 (the converter already stores Qwen3.5/Next norms +1).
        return 1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)
    if kind == "ssm_a":
        # Stored as -exp(A_log), A_log = log(U(1, 16)) as in the HF init.
        return -rng.uniform(1.0, 16.0, n).astype(np.float32)
    if kind == "dt_bias":
        return (0.1 * rng.standard_normal(n)).astype(np.float32)
    if kind == "conv":
        return (0.3 * rng.standard_normal(n)).astype(np.float32)
    if kind == "rope_freqs":
        # Gemma 4 proportional RoPE (conversion/gemma.py): 1 for the rotated pairs, 1e30 for the rest
        return np.where(np.arange(n) < init[1], 1.0, 1e30).astype(np.float32)
    raise AssertionError(kind)


def _tensor_chunks(s: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes, in pieces of at most ~_CHUNK bytes."""
    rng = _rng(seed, s.name)
    t = s.ggml_type
    if t in (QT.F32, QT.F16, QT.BF16):
        per = _CHUNK // 4
        for start in range(0, s.n_elements, per):
            x = _gen_f32(rng, s.init, min(per, s.n_elements - start))
            if t == QT.F16:
                yield x.astype(np.float16).view(np.uint8)
            elif t == QT.BF16:
                # bf16 = top half of the f32 bits (truncation; fine for random data)
                yield (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
            else:
                yield x.view(np.uint8)
        return
    assert s.init[0] == "w", s.name
    block, size = GGML_QUANT_SIZES[t]
    n_blocks = s.n_elements // block
    per = _CHUNK // size
    for start in range(0, n_blocks, per):
        yield _gen_blocks(rng, t, min(per, n_blocks - start), s.init[1]).reshape(-1)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
# llama.cpp's vocab-only GGUF of the Qwen family (models/ggml-vocab-qwen35.gguf: Qwen2's 151936
# tokens and 151387 merges); every preset takes its tokenizer from it.
QWEN_VOCAB = os.path.join(VOCAB_DIR, "ggml-vocab-qwen35.gguf")
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
_NORMAL, _CONTROL = int(TokenType.NORMAL), int(TokenType.CONTROL)


@dataclass(frozen=True)
class SynthTokenizer:
    tokens: list
    types: list
    merges: list
    special_ids: dict           # tokenizer.ggml.<role>_token_id -> id
    chat_template: str


def _tokenizer(p: Preset, source: str | None) -> SynthTokenizer:
    """The tokenizer of `source` (default: QWEN_VOCAB) fitted to p.n_vocab rows: padded with the
    converter's [PAD<id>] UNUSED tokens, or (the test-only smaller vocab) cut to its first
    ordinary tokens, with its control tokens after them and the merges that stay inside."""
    path = source or QWEN_VOCAB
    st = os.stat(path) if os.path.exists(path) else None
    model, tokens, types, merges, file_template = _read_tokenizer(path, st and (st.st_size, st.st_mtime_ns))
    if model != "gpt2":
        raise UnsupportedError(path, f"tokenizer.ggml.model is {model!r}; synth writes Qwen models, whose "
                                     f"tokenizer is a byte-level BPE ('gpt2')")
    n = p.n_vocab
    if n >= len(tokens):
        tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), n)]
        types = list(types) + [int(TokenType.UNUSED)] * (n - len(types))
    else:
        control = [i for i, t in enumerate(types) if t == _CONTROL]
        normal = [i for i, t in enumerate(types) if t == _NORMAL][:n - len(control)]
        keep = normal + control
        if len(keep) < n:
            raise UnsupportedError(path, f"vocab {n} is more than this file's {len(keep)} ordinary and control tokens")
        tokens, types = [tokens[i] for i in keep], [types[i] for i in keep]
        kept = set(tokens)
        merges = [m for m in merges if (c := m.find(" ", 1)) > 0
                  and m[:c] in kept and m[c + 1:] in kept and m[:c] + m[c + 1:] in kept]
    index = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in ("<|im_end|>", "<|endoftext|>") if t not in index]
    if missing:
        raise UnsupportedError(path, f"the vocabulary has no {' or '.join(missing)} token (a Qwen tokenizer has both)")
    # Qwen3.5's GGUFs: EOS <|im_end|>, padding and BOS <|endoftext|> (not added)
    special_ids = {"eos": index["<|im_end|>"], "padding": index["<|endoftext|>"], "bos": index["<|endoftext|>"]}
    if source is not None and isinstance(file_template, str):
        template = file_template
    else:
        with open(os.path.join(VOCAB_DIR, p.chat_template), encoding="utf-8") as f:
            template = f.read()
    return SynthTokenizer(tokens, types, merges, special_ids, template)


@functools.lru_cache(maxsize=4)
def _read_tokenizer(path: str, stamp) -> tuple:
    """The tokenizer arrays of a GGUF, read once per process (a 150k-token vocabulary takes
    seconds to parse); `stamp` (size, mtime) makes a changed file read again."""
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.compiler.metadata import Metadata
    md = Metadata(GGUFFile(path))
    model = md.str("tokenizer.ggml.model", None)
    if model != "gpt2":
        return (model, None, None, None, None)
    tokens, types, merges = _TOKENIZER_ARRAYS
    return (model, md.str_array(tokens), md.int_array(types), md.str_array(merges),
            md.str("tokenizer.chat_template", None))


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

def _add_metadata(w: GGUFWriter, p: Preset, quant: str, seed: int, tok: SynthTokenizer) -> None:
    a = p.arch
    w.add_string("general.type", "model")
    w.add_string("general.name", f"{p.hf_repo.split('/')[1]} (ggfuse synthetic)")
    w.add_string("general.basename", p.hf_repo.split("/")[1])
    w.add_string("general.size_label", p.size_label)
    w.add_string("general.description",
                 f"ggfuse synthetic stand-in for {p.hf_repo}: real structure, random weights (seed {seed})")
    # TextModel.set_gguf_parameters
    w.add_uint32(f"{a}.block_count", p.n_layer)
    w.add_uint32(f"{a}.context_length", p.context_length)
    w.add_uint32(f"{a}.embedding_length", p.n_embd)
    if p.n_ff is not None:
        w.add_uint32(f"{a}.feed_forward_length", p.n_ff)
    w.add_uint32(f"{a}.attention.head_count", p.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", p.n_head_kv)
    if p.mrope_sections is not None:
        w.add_array(f"{a}.rope.dimension_sections", list(p.mrope_sections))
    w.add_float32(f"{a}.rope.freq_base", p.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", p.rms_eps)
    if p.n_expert:
        w.add_uint32(f"{a}.expert_count", p.n_expert)
        w.add_uint32(f"{a}.expert_used_count", p.n_expert_used)
    w.add_uint32(f"{a}.attention.key_length", p.head_dim)
    w.add_uint32(f"{a}.attention.value_length", p.head_dim)
    w.add_uint32("general.file_type", QUANTS[quant][0])
    # Qwen2MoeModel.set_gguf_parameters
    if p.n_ff_exp is not None:
        w.add_uint32(f"{a}.expert_feed_forward_length", p.n_ff_exp)
    if p.n_ff_shexp is not None:
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", p.n_ff_shexp)
    # Qwen3NextModel.set_gguf_parameters (also the Qwen3.5 classes)
    if p.hybrid:
        w.add_uint32(f"{a}.ssm.conv_kernel", p.ssm_conv_kernel)
        w.add_uint32(f"{a}.ssm.state_size", p.ssm_k_dim)
        w.add_uint32(f"{a}.ssm.group_count", p.ssm_k_heads)
        w.add_uint32(f"{a}.ssm.time_step_rank", p.ssm_v_heads)
        w.add_uint32(f"{a}.ssm.inner_size", p.ssm_v_dim * p.ssm_v_heads)
        if p.write_layer_types:
            w.add_array(f"{a}.attention.recurrent_layers", [p.is_recurrent(i) for i in range(p.n_layer)])
        w.add_uint32(f"{a}.full_attention_interval", p.full_attention_interval)
        w.add_uint32(f"{a}.rope.dimension_count", int(p.head_dim * p.partial_rotary))
    # _set_vocab_gpt2 + SpecialVocab
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", p.tokenizer_pre)
    w.add_array("tokenizer.ggml.tokens", tok.tokens)
    w.add_array("tokenizer.ggml.token_type", tok.types)
    w.add_array("tokenizer.ggml.merges", tok.merges)
    for role, tid in tok.special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{role}_token_id", tid)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", tok.chat_template)
    # added by llama-quantize
    w.add_uint32("general.quantization_version", 2)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def _resolve(preset: str, quant: str, layers: int | None, vocab: int | None,
             experts: int | None) -> tuple[Preset, list[TensorSpec]]:
    p = get_preset(preset)
    _check_quant(quant)
    if layers is not None and not 1 <= layers <= p.n_layer:
        raise UnsupportedError(None, f"layers must be in 1..{p.n_layer} for preset '{preset}', got {layers}")
    if vocab is not None and vocab < 512:
        raise UnsupportedError(None, f"vocab must be >= 512, got {vocab}")
    if experts is not None:
        if not p.n_expert:
            raise UnsupportedError(None, f"preset '{preset}' is dense; experts= does not apply")
        if experts < 1:
            raise UnsupportedError(None, f"experts must be >= 1, got {experts}")
    if not isinstance(p, Preset):  # a preset of its own module (compiler/synth_gemma4.py)
        p = p.reduced(layers=layers, vocab=vocab, experts=experts)
        return p, _assign_types(p.tensor_table(), p, quant)
    if layers is not None:
        p = replace(p, n_layer=layers)
    if vocab is not None:
        p = replace(p, n_vocab=vocab)
    if experts is not None:
        p = replace(p, n_expert=experts, n_expert_used=min(p.n_expert_used, experts))
    return p, _assign_types(_tensor_table(p), p, quant)


def _summary(p: Preset, quant: str, specs: list[TensorSpec]) -> dict:
    types: dict[str, dict[str, int]] = {}
    for s in specs:
        d = types.setdefault(s.ggml_type.name, {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += s.nbytes
    return {
        "preset": p.name, "arch": p.arch, "quant": quant, "n_layer": p.n_layer,
        "n_vocab": p.n_vocab, "n_expert": p.n_expert, "n_tensors": len(specs),
        "n_params": sum(s.n_elements for s in specs),
        "tensor_bytes": sum(s.nbytes for s in specs),
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
    }


def describe(preset: str, quant: str, *, layers: int | None = None, vocab: int | None = None,
             experts: int | None = None) -> dict:
    """write_synth's summary without writing anything (sizes, type mix),
    plus 'tensors': [(name, ne, type name), ...] in file order."""
    p, specs = _resolve(preset, quant, layers, vocab, experts)
    out = _summary(p, quant, specs)
    out["tensors"] = [(s.name, s.ne, s.ggml_type.name) for s in specs]
    return out


class _Progress:
    """bytes written / total, MB/s, ETA on stderr: one updating line on a
    TTY, a line every ~10 s otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self._print(now, final=False)

    def finish(self) -> None:
        if self.enabled:
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        msg = (f"synth {self.label}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
               f"({100 * self.done / max(self.total, 1):.0f}%) {rate / 1e6:.0f} MB/s "
               + (f"in {dt:.1f} s" if final else f"ETA {eta:.0f} s"))
        if self.tty:
            sys.stderr.write("\r" + msg.ljust(90) + ("\n" if final else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def write_synth(preset: str, quant: str, out_path: str | os.PathLike[str], *,
                layers: int | None = None, seed: int = 0, progress: bool = True,
                vocab: int | None = None, experts: int | None = None,
                progress_cb: Callable[[int, int], None] | None = None, sparse: bool = False,
                tokenizer_from: str | os.PathLike[str] | None = None) -> dict:
    """Write a synthetic GGUF of `preset` in the llama.cpp mix `quant`.

    layers:  keep only the first N layers (block_count = N); the hybrid
             pattern is kept, so N >= 4 includes a full-attention layer.
    vocab, experts: TEST-ONLY overrides that shrink the embedding / the
             expert count so that CPU tests stay small; the result is no
             longer the real model's structure.
    progress_cb(bytes_done, bytes_total) is called as data is written.
    tokenizer_from: a GGUF (a model or a vocab-only file of the Qwen family) whose tokenizer and
             chat template are written; default: llama.cpp's Qwen vocabulary in compiler/vocab/
             with the preset's chat template.
    sparse:  write only the header and tensor table and leave the data a hole of the right size
             (reads as zeros, takes a few MB on disk): enough for the compiler, which plans from
             shapes and types and never reads the data (real-shape planning tests use it).
    Returns the describe() summary (without 'tensors') plus path, bytes
    (file size), seconds and mb_per_s.
    """
    p, specs = _resolve(preset, quant, layers, vocab, experts)
    out_path = os.fspath(out_path)
    summary = _summary(p, quant, specs)

    # Tensor data + generous room for the header (the vocab dominates it).
    need = summary["tensor_bytes"] + 32 * len(specs) + 64 * p.n_vocab + (1 << 20)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    from ggfuse.fileio import check_output
    check_output(out_path, inputs=[tokenizer_from] if tokenizer_from else (), what="synth GGUF")
    free = shutil.disk_usage(out_dir).free
    if free < need and not sparse:
        raise GGFuseError(out_path, f"not enough disk space: writing this file needs {need} bytes "
                          f"({need / 1e9:.1f} GB), {free} bytes ({free / 1e9:.1f} GB) free in {out_dir}")

    w = GGUFWriter(None, p.arch)
    if isinstance(p, Preset):
        _add_metadata(w, p, quant, seed, _tokenizer(p, os.fspath(tokenizer_from) if tokenizer_from else None))
    elif tokenizer_from is not None:
        raise UnsupportedError(os.fspath(tokenizer_from), f"preset '{preset}' writes its own Gemma 4 stand-in "
                                                          f"tokenizer; tokenizer_from applies to the Qwen presets")
    else:  # a preset of its own module (compiler/synth_gemma4.py)
        p.add_metadata(w, QUANTS[quant][0], seed)
    for s in specs:
        # GGUFWriter wants numpy order; ne is ggml order.
        w.add_tensor_info(s.name, tuple(reversed(s.ne)), np.dtype(np.float32), s.nbytes, raw_dtype=s.ggml_type)

    # a temp name of its own beside the target (two writers never share one), renamed when complete
    import tempfile
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)[:64]}.", suffix=".partial", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise GGFuseError(out_path, f"cannot write the synth GGUF: {e.strerror}") from None
    prog = _Progress(summary["tensor_bytes"], os.path.basename(out_path), progress)
    t0 = time.monotonic()
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        align = w.data_alignment
        if sparse:
            fout.flush()
            end = fout.tell()
            for spec in specs:
                end += -end % align + spec.nbytes
            end += -end % align
            fout.truncate(end)
        else:
            _write_data(fout, specs, seed, align, prog, progress_cb)
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException as e:
        if w.fout:
            for f in w.fout:
                f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):      # a full disk, permissions: one line naming the target
            raise GGFuseError(out_path, f"cannot write the synth GGUF: {e.strerror or e}") from None
        raise
    prog.finish()
    dt = time.monotonic() - t0
    size = os.path.getsize(out_path)
    summary.update(path=out_path, bytes=size, seconds=dt, mb_per_s=size / 1e6 / max(dt, 1e-9))
    return summary


def _write_data(fout, specs: list[TensorSpec], seed: int, align: int, prog: _Progress,
                progress_cb: Callable[[int, int], None] | None) -> None:
    """Generate chunks here and write them from a second thread, so that
    generating (numpy) and writing (the kernel) overlap on two cores."""
    q: queue.Queue = queue.Queue(maxsize=4)
    error: list[BaseException] = []

    def writer() -> None:
        while (item := q.get()) is not None:
            if error:
                continue  # drain after a failure so the producer never blocks
            try:
                fout.write(memoryview(item))
            except BaseException as e:  # noqa: BLE001 -- re-raised in the producer
                error.append(e)

    th = threading.Thread(target=writer, name="ggfuse-synth-writer", daemon=True)
    th.start()
    try:
        pos = fout.tell()
        for s in specs:
            pad = -pos % align
            if pad:
                q.put(np.zeros(pad, np.uint8))
                pos += pad
            for chunk in _tensor_chunks(s, seed):
                if error:
                    raise error[0]
                q.put(chunk)
                pos += chunk.nbytes
                prog.update(chunk.nbytes)
                if progress_cb is not None:
                    progress_cb(prog.done, prog.total)
        pad = -pos % align
        if pad:
            q.put(np.zeros(pad, np.uint8))
    finally:
        q.put(None)
        th.join()
    if error:
        raise error[0]


# --------------------------------------------------------------------------
# CLI (wired into `ggfuse synth` by compiler/cli.py)
# --------------------------------------------------------------------------

def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser(
        "synth", help="write a synthetic GGUF with a real model's structure and random weights",
        description="Write a GGUF with the metadata, tensor names, shapes and ggml types that "
                    "llama.cpp's converter + llama-quantize produce for a real Qwen or Gemma 4 model, "
                    "filled with random but well-scaled weights.")
    ap.add_argument("--preset", required=True, help=f"model ({', '.join(PRESETS)})")
    ap.add_argument("--quant", default="q4_k_m", help=f"llama.cpp type mix ({', '.join(QUANTS)}; default q4_k_m)")
    ap.add_argument("-o", "--output", required=True, help="output .gguf path")
    ap.add_argument("--layers", default=None, help="keep only the first N layers")
    ap.add_argument("--seed", default="0", help="random seed (default 0)")
    ap.add_argument("--tokenizer-from", metavar="GGUF", default=None,
                    help="take the tokenizer and chat template from this GGUF (default: llama.cpp's Qwen "
                         "vocabulary, shipped in compiler/vocab/, and the preset's chat template)")
    ap.add_argument("--vocab", default=None, help=argparse.SUPPRESS)    # test-only
    ap.add_argument("--experts", default=None, help=argparse.SUPPRESS)  # test-only
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.set_defaults(fn=synth_main)
    return ap


def synth_main(args: argparse.Namespace) -> int:
    from ggfuse.fileio import check_input
    from ggfuse.options import count

    def opt(v, flag, lo, hi):
        return None if v is None else count(v, flag, lo, hi)
    if args.tokenizer_from is not None:
        check_input(args.tokenizer_from, "--tokenizer-from GGUF")
    s = write_synth(args.preset, args.quant, args.output, layers=opt(args.layers, "--layers", 1, 4096),
                    seed=count(args.seed, "--seed", 0, (1 << 63) - 1), progress=not args.quiet,
                    vocab=opt(args.vocab, "--vocab", 1, 1 << 24), experts=opt(args.experts, "--experts", 1, 1 << 16),
                    tokenizer_from=args.tokenizer_from)
    mix = ", ".join(f"{t} {d['count']}" for t, d in s["types"].items())
    from ggfuse.errors import escape
    from ggfuse.fileio import format_bytes
    print(f"{escape(s['path'])}: {s['arch']} {s['n_layer']} layers, {s['n_tensors']} tensors ({mix}), "
          f"{format_bytes(s['bytes'])} in {s['seconds']:.1f} s ({format_bytes(s['bytes'] / max(s['seconds'], 1e-9))}/s)")
    return 0
