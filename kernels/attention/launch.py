"""Launchers for the attention kernels (CuPy arrays in, nothing allocated, no host sync: capturable).

bf16 tensors are CuPy arrays of any 2-byte dtype (uint16 in practice: CuPy has no bfloat16) that
hold the raw bf16 bits.
"""
from __future__ import annotations

import threading

import numpy as np

from ggfuse.kernels.nvrtc import build_arch, load_module
from ggfuse.kernels.quant.types import act_kind

SOURCE = "attention/flash_attn.cu"
BLOCK_M = 64          # query rows per block (flash_attn.cu fa::BLOCK_M)
BLOCK_N = 64          # key rows per tile (fa::BLOCK_N)
THREADS = 128         # 4 warps (fa::THREADS)
HEAD_DIMS = (64, 128, 256)

_lock = threading.Lock()
_functions: dict = {}


def _dtype_name(dtype, what: str) -> str:
    """'f32' or 'bf16' from a ggfuse DType / string / numpy dtype (2-byte dtypes mean bf16 bits)."""
    return act_kind(dtype, "flash_attn_prefill", what)


def smem_bytes(D: int, Dv: int) -> int:
    """Dynamic shared memory of one block: Q [64, D] + K [64, D] + V [64, Dv] tiles, bf16."""
    return 2 * (BLOCK_M * D + BLOCK_N * D + BLOCK_N * Dv)


def _function(D: int, q_kind: str, o_kind: str):
    import cupy
    key = (cupy.cuda.Device().id, build_arch(), D, q_kind, o_kind)
    with _lock:
        fn = _functions.get(key)
        if fn is None:
            fn = load_module(SOURCE).get_function(f"flash_attn_prefill_d{D}_q{q_kind}_o{o_kind}")
            # Above 48 KB a kernel must opt in; done once here, outside any capture. Prefer the
            # largest smem carveout so two 97 KB blocks fit on an sm_90 SM.
            fn.max_dynamic_shared_size_bytes = smem_bytes(D, D)
            fn.preferred_shared_memory_carveout = 100
            _functions[key] = fn
    return fn


def prepare(D: int, q_dtype, out_dtype) -> None:
    """Compile/load the kernel variant and set its smem limit. Call before capturing a graph: module
    loading and function attributes are not stream work and should not happen mid-capture."""
    _function(D, _dtype_name(q_dtype, "q"), _dtype_name(out_dtype, "out"))


def flash_attn_prefill(q, q_dtype, q_stride_t: int, q_stride_h: int, k_cache, v_cache, out,
                       T: int, Hq: int, Hkv: int, D: int, Dv: int, scale: float,
                       past_dev, n_valid_dev, stream=None) -> None:
    """Causal GQA attention of a chunk's queries over the bf16 KV cache.

    q [T, Hq, D] (f32 or bf16 per q_dtype) with element strides q_stride_t, q_stride_h (unit
    stride along D; strides and the base address 16-byte aligned); k_cache [max_ctx, Hkv, D] and
    v_cache [max_ctx, Hkv, Dv] bf16, contiguous; out [T, Hq, Dv] f32 or bf16 (by out.dtype),
    contiguous. past_dev = int32[1] holding P (cache rows before this chunk; the chunk's own K/V are
    already at rows P..P+T-1); n_valid_dev = int32[1], rows t >= n_valid get zeros. Query t sees keys
    0..P+t; query head h reads KV head h // (Hq // Hkv). The grid depends on T and Hq only, so a
    captured graph stays valid when P or n_valid change.
    """
    q_kind = _dtype_name(q_dtype, "q")
    o_kind = _dtype_name(out.dtype, "out")
    if D != Dv or D not in HEAD_DIMS:
        raise ValueError(f"flash_attn_prefill: head dims D={D}, Dv={Dv}; supported D == Dv in {HEAD_DIMS}")
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"flash_attn_prefill: Hq={Hq} must be a multiple of Hkv={Hkv}")
    if not scale > 0:
        raise ValueError(f"flash_attn_prefill: scale must be positive, got {scale}")
    q_item = 4 if q_kind == "f32" else 2
    if q.itemsize != q_item:
        raise ValueError(f"flash_attn_prefill: q_dtype {q_kind} but q has {q.itemsize}-byte elements")
    if q.data.ptr % 16 or (q_stride_t * q_item) % 16 or (q_stride_h * q_item) % 16:
        raise ValueError(f"flash_attn_prefill: q base and strides ({q_stride_t}, {q_stride_h}) must be 16-byte aligned")
    for name, a, w in (("k_cache", k_cache, D), ("v_cache", v_cache, Dv)):
        if a.itemsize != 2 or not a.flags.c_contiguous or a.size % (Hkv * w):
            raise ValueError(f"flash_attn_prefill: {name} must be contiguous bf16 [max_ctx, {Hkv}, {w}], "
                             f"got {a.dtype} {a.shape}")
    if out.size != T * Hq * Dv or not out.flags.c_contiguous:
        raise ValueError(f"flash_attn_prefill: out must be contiguous [{T}, {Hq}, {Dv}], got {out.shape}")
    if T <= 0:
        return
    fn = _function(D, q_kind, o_kind)
    grid = (Hq, (T + BLOCK_M - 1) // BLOCK_M, 1)
    fn(grid, (THREADS, 1, 1),
       (q, np.int64(q_stride_t), np.int64(q_stride_h), k_cache, v_cache, out,
        np.int32(T), np.int32(Hq), np.int32(Hkv), np.float32(scale), past_dev, n_valid_dev),
       shared_mem=smem_bytes(D, Dv), stream=stream)


# ---- CUDA-core attention: sliding windows over a ring, and head dims the tensor cores lack ------

WINDOW_SOURCE = "attention/window_attn.cu"
WINDOW_HEAD_DIMS = (32, 64, 128, 256, 512)
WINDOW_WARPS = 4      # warps (one (query, head) each) per block, window_attn.cu wa::WARPS


def window_attn(q, q_dtype, k, v, k_ring, v_ring, out, T: int, Hq: int, Hkv: int, D: int, ring_rows: int,
                window: int, scale: float, past_dev, n_valid_dev, stream=None) -> None:
    """GQA attention of a chunk on CUDA cores (kernels/attention/window_attn.cu), a warp per
    (query, head).

    ring_rows R > 0: Gemma's sliding layers (ref.attention_window): k_ring, v_ring [R, Hkv, D]
    bf16 contiguous rings of the keys before the chunk (position p at row p % R); k, v
    [T, Hkv, D] f32 views of the chunk's own keys and values. R == 0: causal attention over
    the KV cache (ref.attention_cache): k_ring, v_ring are the caches [max_ctx, Hkv, D] bf16
    with the chunk appended; k, v unused (None). q [T, Hq, D] f32 or bf16 (q_dtype) view with a
    unit stride along D; out [T, Hq, D] f32 or bf16 contiguous. Query t at P + t sees keys p0 <= P + t
    with P + t - p0 < window (window 0: no limit); keys outside the window are never read.
    past_dev = int32[1] P, n_valid_dev = int32[1] (rows t >= n_valid get zeros). The grid depends
    on T and Hq only, so a captured graph serves every P.
    """
    q_kind = _dtype_name(q_dtype, "q")
    o_kind = _dtype_name(out.dtype, "out")
    if D not in WINDOW_HEAD_DIMS:
        raise ValueError(f"window_attn: head dim {D} not in {WINDOW_HEAD_DIMS}")
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"window_attn: Hq={Hq} must be a multiple of Hkv={Hkv}")
    if not scale > 0 or window < 0:
        raise ValueError(f"window_attn: scale {scale} must be > 0 and window {window} >= 0")
    if ring_rows and window and ring_rows < window - 1:
        raise ValueError(f"window_attn: a ring of {ring_rows} rows cannot hold the {window - 1} keys before a chunk")
    if q.ndim != 3 or tuple(q.shape) != (T, Hq, D) or q.strides[2] != q.itemsize:
        raise ValueError(f"window_attn: q must be a [{T}, {Hq}, {D}] view with a unit stride along D, got {q.shape}")
    for name, a in (("k_ring", k_ring), ("v_ring", v_ring)):
        if a.itemsize != 2 or not a.flags.c_contiguous or a.ndim != 3 or tuple(a.shape[1:]) != (Hkv, D):
            raise ValueError(f"window_attn: {name} must be contiguous bf16 [rows, {Hkv}, {D}], got {a.dtype} {a.shape}")
    ks = vs = (0, 0)
    if ring_rows:
        if k_ring.shape[0] != ring_rows or v_ring.shape[0] != ring_rows:
            raise ValueError(f"window_attn: rings of {k_ring.shape[0]} / {v_ring.shape[0]} rows, expected {ring_rows}")
        for name, a in (("k", k), ("v", v)):
            if a is None or a.dtype != np.float32 or a.ndim != 3 or tuple(a.shape) != (T, Hkv, D) or a.strides[2] != 4:
                raise ValueError(f"window_attn: {name} must be an f32 [{T}, {Hkv}, {D}] view, got "
                                 f"{None if a is None else (a.dtype, a.shape)}")
        ks, vs = (k.strides[0] // 4, k.strides[1] // 4), (v.strides[0] // 4, v.strides[1] // 4)
    if out.size != T * Hq * D or not out.flags.c_contiguous:
        raise ValueError(f"window_attn: out must be contiguous [{T}, {Hq}, {D}], got {out.shape}")
    if T <= 0:
        return
    fn = load_module(WINDOW_SOURCE).get_function(f"window_attn_d{D}_q{q_kind}_o{o_kind}")
    item = q.itemsize
    warps = T * Hq
    nul = np.uint64(0)
    fn((-(-warps // WINDOW_WARPS), 1, 1), (WINDOW_WARPS * 32, 1, 1),
       (q, np.int64(q.strides[0] // item), np.int64(q.strides[1] // item),
        k if ring_rows else nul, np.int64(ks[0]), np.int64(ks[1]), v if ring_rows else nul, np.int64(vs[0]),
        np.int64(vs[1]), k_ring, v_ring, out, np.int32(T), np.int32(Hq), np.int32(Hkv), np.int32(ring_rows),
        np.int32(window), np.float32(scale), past_dev, n_valid_dev),
       stream=stream)


# ---- the one-token step over the KV cache, split along the keys (decode_attn.cu) ----------------

DECODE_SOURCE = "attention/decode_attn.cu"
DECODE_HEAD_DIMS = (64, 128, 256, 512)
DECODE_MIN_KEYS = 32      # keys per range at least (decode_attn.cu da::MIN_KEYS)
DECODE_MAX_GROUP = 16     # query heads per kv head at most (a warp each, blocks of <= 512 threads)
DECODE_BLOCKS = 256       # ranges x kv heads aimed at: about two blocks per SM of an H200 / 4090


def decode_supported(D: int, Dv: int, Hq: int, Hkv: int) -> bool:
    """Whether decode_attn takes these shapes (else the prefill kernel runs the step)."""
    return D == Dv and D in DECODE_HEAD_DIMS and Hkv > 0 and Hq % Hkv == 0 and Hq // Hkv <= DECODE_MAX_GROUP


def decode_splits(Hkv: int, max_ctx: int) -> int:
    """Key ranges of the split step: about DECODE_BLOCKS blocks over the kv heads, no more than a
    full cache has ranges of DECODE_MIN_KEYS keys."""
    return max(1, min(DECODE_BLOCKS // max(Hkv, 1), -(-max_ctx // DECODE_MIN_KEYS)))


def decode_workspace_bytes(Hq: int, D: int, n_split: int) -> int:
    """Partials of the split step: acc [Hq, n_split, D] then (m, l) [Hq, n_split, 2], f32."""
    return 4 * Hq * n_split * (D + 2)


def decode_attn(q, q_dtype, q_stride_h: int, k_cache, v_cache, out, Hq: int, Hkv: int, D: int, scale: float,
                n_split: int, ws, past_dev, n_valid_dev, stream=None) -> None:
    """The one-token step's causal GQA attention over the KV cache (ref.attention_cache, T = 1),
    split into n_split key ranges (decode_attn.cu) and combined.

    q [1, Hq, D] f32 or bf16 (q_dtype) view, unit stride along D, q_stride_h elements between
    heads (16-byte aligned); k_cache, v_cache [max_ctx, Hkv, D] bf16 contiguous with the step's row
    at P; out [1, Hq, D] f32 or bf16 contiguous; ws a uint8 workspace of at least
    decode_workspace_bytes(Hq, D, n_split) bytes. past_dev = int32[1] P, n_valid_dev = int32[1]
    (0: zeros). Two launches whose grids depend on n_split and Hq only: capturable once for every P."""
    q_kind = _dtype_name(q_dtype, "q")
    o_kind = _dtype_name(out.dtype, "out")
    if not decode_supported(D, D, Hq, Hkv):
        raise ValueError(f"decode_attn: head dim {D} (have {DECODE_HEAD_DIMS}), Hq={Hq}, Hkv={Hkv} (a multiple, "
                         f"at most {DECODE_MAX_GROUP} query heads per kv head)")
    if not scale > 0 or n_split < 1:
        raise ValueError(f"decode_attn: scale {scale} must be > 0 and n_split {n_split} >= 1")
    q_item = 4 if q_kind == "f32" else 2
    if q.itemsize != q_item or q.size < Hq * D or q.strides[-1] != q.itemsize:
        raise ValueError(f"decode_attn: q must be a {q_kind} [1, {Hq}, {D}] view with a unit stride along D")
    if q.data.ptr % 16 or (q_stride_h * q_item) % 16:
        raise ValueError(f"decode_attn: q base and head stride {q_stride_h} must be 16-byte aligned")
    for name, a in (("k_cache", k_cache), ("v_cache", v_cache)):
        if a.itemsize != 2 or not a.flags.c_contiguous or a.ndim != 3 or tuple(a.shape[1:]) != (Hkv, D):
            raise ValueError(f"decode_attn: {name} must be contiguous bf16 [max_ctx, {Hkv}, {D}], got {a.dtype} {a.shape}")
    if out.size != Hq * D or not out.flags.c_contiguous:
        raise ValueError(f"decode_attn: out must be contiguous [1, {Hq}, {D}], got {out.shape}")
    need = decode_workspace_bytes(Hq, D, n_split)
    if ws.nbytes < need or ws.data.ptr % 16:
        raise ValueError(f"decode_attn: the workspace holds {ws.nbytes} bytes, the step needs {need} (16-byte aligned)")
    mod = load_module(DECODE_SOURCE)
    split = mod.get_function(f"decode_attn_split_d{D}_q{q_kind}")
    comb = mod.get_function(f"decode_attn_combine_d{D}_o{o_kind}")
    part_acc = ws.data.ptr
    part_ml = part_acc + 4 * Hq * n_split * D
    G = Hq // Hkv
    split((n_split, Hkv, 1), (G * 32, 1, 1),
          (q, np.int64(q_stride_h), k_cache, v_cache, np.uint64(part_acc), np.uint64(part_ml), np.int32(Hq),
           np.int32(Hkv), np.float32(scale), past_dev, n_valid_dev), stream=stream)
    comb((Hq, 1, 1), (D, 1, 1),
         (np.uint64(part_acc), np.uint64(part_ml), out, np.int32(n_split), past_dev, n_valid_dev), stream=stream)
