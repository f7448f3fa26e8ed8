"""Launchers for kernels/dense/dequant.cu and kernels/dense/elementwise.cu.

Every function takes CuPy arrays (outputs included: nothing is allocated here), plain Python
ints/floats, and `stream` (a cupy.cuda.Stream, or None for the current stream). Nothing
synchronises the host, so every launcher can be captured into a CUDA graph.

Views: activations may be strided views (a column slice of a wider buffer, q inside a
[T, H, 2*hd] q|gate projection, ...). The launchers read the view's strides; only the last
dim has to be contiguous. A 2-D operand [T, H*D] is accepted wherever the op works on
[T, H, D] and is split into heads of D. Outputs may alias inputs (same view) except in
ssm_conv_silu. Run-time scalars that change between graph replays (P, n_valid) are device
int32 arrays of one element.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from ggfuse.kernels.nvrtc import load_module
from ggfuse.kernels.quant.types import qtype as _qtype

NULL = np.uint64(0)
_THREADS = 256
_MAX_BLOCKS = 1 << 20  # grid-stride loops cover the rest


# ---- plumbing ------------------------------------------------------------------------------------

def _fn(path: str, name: str):
    return load_module(path).get_function(name)


def _launch(path: str, name: str, grid, block, args, stream):
    fn = _fn(path, name)
    with (stream if stream is not None else contextlib.nullcontext()):
        fn(tuple(grid), tuple(block), tuple(args))


def _ptr(a) -> np.uint64:
    return NULL if a is None else np.uint64(a.data.ptr)


def _dtype_name(a) -> str:
    """Kernel suffix of an output's storage: float32 -> f32; bf16 is stored as uint16 words
    (CuPy has no bfloat16 dtype; ml_dtypes' bfloat16 is accepted too)."""
    dt = np.dtype(a.dtype)
    if dt == np.float32:
        return "f32"
    if dt == np.uint16 or dt.name == "bfloat16":
        return "bf16"
    raise TypeError(f"expected a float32 or bf16 (uint16 storage) array, got {a.dtype}")


def _check_f32(a, what: str):
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"{what}: expected float32, got {a.dtype}")


def _check_i32(a, what: str):
    if a is not None and (np.dtype(a.dtype) != np.int32 or a.size < 1):
        raise TypeError(f"{what}: expected a device int32 array, got {a.dtype} of size {a.size}")


def _view(a, T: int, H: int, D: int, what: str):
    """(st, sh) in elements of operand `a` seen as [T, H, D] with a contiguous last dim."""
    item = a.itemsize
    if a.strides[-1] != item and a.shape[-1] > 1:
        raise ValueError(f"{what}: the last dim must be contiguous (strides {a.strides})")
    if any(s % item for s in a.strides):
        raise ValueError(f"{what}: strides {a.strides} are not multiples of the item size {item}")
    if a.ndim == 3 and tuple(a.shape) == (T, H, D):
        return a.strides[0] // item, a.strides[1] // item
    if a.ndim == 2 and tuple(a.shape) == (T, H * D):
        return a.strides[0] // item, D
    if a.ndim == 1 and T == 1 and a.shape[0] == H * D:
        return 0, D
    raise ValueError(f"{what}: shape {tuple(a.shape)} does not match [T, H, D] = [{T}, {H}, {D}] (or [T, H*D])")


def _thd(*arrays):
    """[T, H, D] of the operation: the shape of the first 3-D operand, else [T, 1, N]."""
    for a in arrays:
        if a is not None and a.ndim == 3:
            return tuple(int(s) for s in a.shape)
    a = arrays[0]
    if a.ndim == 2:
        return int(a.shape[0]), 1, int(a.shape[1])
    if a.ndim == 1:
        return 1, 1, int(a.shape[0])
    raise ValueError(f"expected a 1-, 2- or 3-D operand, got shape {a.shape}")


def _vec_ok(arrays_views, D: int, V: int = 4) -> bool:
    """Whether every operand allows V-wide accesses: D, strides and addresses aligned."""
    if D % V:
        return False
    for a, strides in arrays_views:
        if a is None:
            continue
        if a.data.ptr % (V * a.itemsize):
            return False
        if any(s % V for s in strides):
            return False
    return True


def _blocks(n_threads: int, threads: int = _THREADS) -> int:
    return max(1, min(_MAX_BLOCKS, -(-n_threads // threads)))


# ---- dequantisation ------------------------------------------------------------------------------

DEQUANT = "dense/dequant.cu"


def dequantize(raw, qtype, n_rows: int, row_len: int, out, *, row0: int = 0, stream=None):
    """out[r, :] = dequant(raw row row0 + r), r < n_rows.

    raw: uint8 [...] the whole tensor's GGUF bytes (rows of row_len elements, quantised
    independently); qtype: DType / GGMLQuantizationType / ggml id / name; out: float32 or bf16
    (uint16 storage) with n_rows * row_len elements, contiguous, 16-byte aligned. Bit-exact
    with gguf.quants.dequantize (f32 out; bf16 out is that value rounded to nearest even).
    """
    qt = _qtype(qtype)
    rb = qt.row_bytes(row_len)
    n = n_rows * row_len
    if raw.dtype != np.uint8:
        raise TypeError(f"dequantize: raw must be uint8 bytes, got {raw.dtype}")
    if raw.size < (row0 + n_rows) * rb:
        raise ValueError(f"dequantize: raw has {raw.size} bytes, rows {row0}..{row0 + n_rows} of {rb} need {(row0 + n_rows) * rb}")
    if out.size != n or not out.flags.c_contiguous or out.data.ptr % 16:
        raise ValueError(f"dequantize: out must be contiguous, 16-byte aligned, {n} elements (got {out.size})")
    name = f"dequantize_{qt.name}_{_dtype_name(out)}"
    src = np.uint64(raw.data.ptr + row0 * rb)
    _launch(DEQUANT, name, (_blocks(-(-n // 8)),), (_THREADS,), (src, np.int64(n), _ptr(out)), stream)


def get_rows(raw, qtype, row_len: int, ids, out, n_tokens: int | None = None, *, stream=None):
    """Embedding lookup straight from the quantised table: out[t] = table[ids[t]], t < n_tokens.

    raw: uint8 table bytes [V rows]; ids: int32 [>= n_tokens] on the device (out-of-range ids
    are clamped to [0, V-1]); out: float32 or bf16 [n_tokens, row_len], contiguous, 16-byte aligned.
    """
    qt = _qtype(qtype)
    rb = qt.row_bytes(row_len)
    n_tokens = int(ids.size) if n_tokens is None else int(n_tokens)
    n_table = raw.size // rb
    _check_i32(ids, "get_rows ids")
    if out.size != n_tokens * row_len or not out.flags.c_contiguous or out.data.ptr % 16:
        raise ValueError(f"get_rows: out must be contiguous, 16-byte aligned, [{n_tokens}, {row_len}] (got {out.shape})")
    if n_tokens == 0:
        return
    name = f"get_rows_{qt.name}_{_dtype_name(out)}"
    args = (_ptr(raw), np.int32(n_table), np.int32(row_len), np.int64(rb), _ptr(ids), np.int32(n_tokens), _ptr(out))
    _launch(DEQUANT, name, (n_tokens,), (_THREADS,), args, stream)


# ---- row norms -----------------------------------------------------------------------------------

ELEMENTWISE = "dense/elementwise.cu"
ROW_MAX = 8192    # the row kernels' longest row (a block per row, 32 values per thread in registers)


def _row_norm(a, b, w, z, out, out_sum, *, eps: float, l2: bool, stream, what: str):
    T, H, D = _thd(a, b, z, out, out_sum)
    for arr, nm in ((a, "a"), (b, "b"), (z, "z"), (out_sum, "out_sum"), (w, "w")):
        if arr is not None:
            _check_f32(arr, f"{what} {nm}")
    if w is not None and (w.size != D or not w.flags.c_contiguous):
        raise ValueError(f"{what}: weight must be contiguous [{D}], got {w.shape}")
    views = [(x, _view(x, T, H, D, f"{what} {nm}") if x is not None else (0, 0))
             for x, nm in ((a, "a"), (b, "b"), (z, "z"), (out, "out"), (out_sum, "out_sum"))]
    if D > ROW_MAX:
        raise ValueError(f"{what}: rows of {D} > {ROW_MAX} elements are not supported")
    G = 32 if D <= 512 else 256
    V = 4 if _vec_ok(views + [(w, ())], D) else 1
    name = f"row_norm_g{G}_v{V}_{_dtype_name(out)}"
    n_rows = T * H
    (sa, sb, sz, so, ss) = [v for _, v in views]
    args = (_ptr(a), np.int64(sa[0]), np.int64(sa[1]), _ptr(b), np.int64(sb[0]), np.int64(sb[1]),
            _ptr(w), _ptr(z), np.int64(sz[0]), np.int64(sz[1]),
            _ptr(out), np.int64(so[0]), np.int64(so[1]), _ptr(out_sum), np.int64(ss[0]), np.int64(ss[1]),
            np.int32(n_rows), np.int32(H), np.int32(D), np.float32(eps), np.int32(1 if l2 else 0))
    if n_rows == 0:
        return
    grid = (-(-n_rows // 8),) if G == 32 else (n_rows,)
    _launch(ELEMENTWISE, name, grid, (256,), args, stream)


def rms_norm(x, w, out, *, eps: float, stream=None):
    """out = x / sqrt(mean(x^2) + eps) * w over the last dim. x [T, D] or [T, H, D] (per head)
    f32 view; w [D] f32 or None; out like x, f32 or bf16. D <= ROW_MAX."""
    _row_norm(x, None, w, None, out, None, eps=eps, l2=False, stream=stream, what="rms_norm")


def add_rms_norm(a, b, w, out_norm, out_sum, *, eps: float, stream=None):
    """out_sum = a + b; out_norm = rms_norm(out_sum) * w. a, b, out_sum [T, D] f32; w [D];
    out_norm [T, D] f32 or bf16. out_sum may be a or b (in-place residual)."""
    _row_norm(a, b, w, None, out_norm, out_sum, eps=eps, l2=False, stream=stream, what="add_rms_norm")


def l2_norm(x, out, *, eps: float, stream=None):
    """out = x / sqrt(sum(x^2) + eps) over the last dim (per head). x [T, H, D] f32 view (e.g. q/k
    column slices of the conv output); out like x (f32 or bf16)."""
    _row_norm(x, None, None, None, out, None, eps=eps, l2=True, stream=stream, what="l2_norm")


def gated_rms_norm(o, w, z, out, *, eps: float, stream=None):
    """out = rms_norm(o) * w * silu(z) per head. o, z [T, Hv, V] f32 views (z may be [T, Hv*V]);
    w [V]; out [T, Hv, V] or [T, Hv*V], f32 or bf16."""
    _row_norm(o, None, w, z, out, None, eps=eps, l2=False, stream=stream, what="gated_rms_norm")


# ---- norm + rope -----------------------------------------------------------------------------------

_ROPE_MODES = {"neox": 0, "imrope": 0, "mrope": 0, "normal": 1}


def norm_rope(x, w, pos, out, *, eps: float, n_dims: int, freq_base: float, freq_scale: float = 1.0,
              mode: str = "neox", freq_factors=None, stream=None):
    """Per-head RMSNorm (weight w [D]) then RoPE of the first n_dims dims of each head; each
    pair's angle divided by freq_factors[i] when given (f32 [n_dims/2] on the device,
    llama.cpp's rope_freqs: Gemma 4's full layers).

    x [T, H, D] f32 view (e.g. q inside a [T, H, 2*D] q|gate buffer); pos int32 [T] on the
    device (absolute positions); out [T, H, D] f32 view. mode "neox" ("imrope" text-only is
    the same) pairs i with i + n_dims/2, "normal" pairs 2i with 2i+1. D <= 512.
    """
    _check_f32(x, "norm_rope x")
    _check_f32(out, "norm_rope out")
    _check_i32(pos, "norm_rope pos")
    if x.ndim != 3:
        raise ValueError(f"norm_rope: x must be [T, H, D], got {x.shape}")
    T, H, D = (int(s) for s in x.shape)
    if D > 512 or n_dims > D or n_dims % 2:
        raise ValueError(f"norm_rope: need D <= 512 and even n_dims <= D (D={D}, n_dims={n_dims})")
    if mode not in _ROPE_MODES:
        raise ValueError(f"norm_rope: unknown rope mode {mode!r}")
    if w.size != D:
        raise ValueError(f"norm_rope: weight must be [{D}], got {w.shape}")
    if freq_factors is not None:
        _check_f32(freq_factors, "norm_rope freq_factors")
        if freq_factors.size != n_dims // 2 or not freq_factors.flags.c_contiguous:
            raise ValueError(f"norm_rope: freq_factors must be contiguous [{n_dims // 2}], got {freq_factors.shape}")
    xs, os_ = _view(x, T, H, D, "norm_rope x"), _view(out, T, H, D, "norm_rope out")
    if T == 0:
        return
    args = (_ptr(x), np.int64(xs[0]), np.int64(xs[1]), _ptr(w), _ptr(pos), _ptr(out), np.int64(os_[0]), np.int64(os_[1]),
            np.int32(H), np.int32(D), np.int32(n_dims), np.float64(freq_base), np.float64(freq_scale),
            np.float32(eps), np.int32(_ROPE_MODES[mode]), _ptr(freq_factors))
    _launch(ELEMENTWISE, "norm_rope_f32", (T,), (256,), args, stream)


# ---- elementwise binary ----------------------------------------------------------------------------

_EW_OPS = {"add": 0, "mul": 1, "sigmoid_mul": 2, "silu_mul": 3, "scale": 4, "copy": 5, "gelu": 6, "gelu_mul": 7,
           "softcap": 8}


def _ew(op: str, a, b, out, *, factor: float = 1.0, stream=None):
    T, H, D = _thd(a, b if (b is not None and b.shape[-1] != 1) else None, out)
    _check_f32(a, f"{op} a")
    bcast = False
    sb = (0, 0)
    if b is not None:
        _check_f32(b, f"{op} b")
        if b.shape[-1] == 1 and D != 1:  # [T, 1] or [T, H, 1] gate broadcast along d
            bcast = True
            if b.ndim == 2 and b.shape[0] == T and H == 1:
                sb = (b.strides[0] // b.itemsize, 0)
            elif b.ndim == 3 and tuple(b.shape[:2]) == (T, H):
                sb = (b.strides[0] // b.itemsize, b.strides[1] // b.itemsize)
            else:
                raise ValueError(f"{op}: broadcast operand {b.shape} does not match [T, H] = [{T}, {H}]")
        elif b.ndim == 1 and b.shape[0] == D and T * H > 1:   # a [D] vector along every row (Gemma's router scale)
            if b.strides[0] != b.itemsize:
                raise ValueError(f"{op}: the row vector b must be contiguous")
            sb = (0, 0)
        else:
            sb = _view(b, T, H, D, f"{op} b")
    sa, so = _view(a, T, H, D, f"{op} a"), _view(out, T, H, D, f"{op} out")
    views = [(a, sa), (out, so)] + ([] if (b is None or bcast) else [(b, sb)])
    V = 4 if _vec_ok(views, D) else 1
    n_rows = T * H
    if n_rows * D == 0:
        return
    args = (_ptr(a), np.int64(sa[0]), np.int64(sa[1]), _ptr(b), np.int64(sb[0]), np.int64(sb[1]), np.int32(bcast),
            _ptr(out), np.int64(so[0]), np.int64(so[1]), np.int32(n_rows), np.int32(H), np.int32(D),
            np.int32(_EW_OPS[op]), np.float32(factor))
    _launch(ELEMENTWISE, f"ew_v{V}_{_dtype_name(out)}", (_blocks(n_rows * D // V),), (_THREADS,), args, stream)


def add(a, b, out, *, stream=None):
    """out = a + b (residual). [T, N] or [T, H, D] f32 views; out f32 or bf16."""
    _ew("add", a, b, out, stream=stream)


def mul(a, b, out, *, stream=None):
    """out = a * b; b may be [T, 1] (broadcast along the row) or [D] (the same vector for every row)."""
    _ew("mul", a, b, out, stream=stream)


def sigmoid_mul(x, g, out, *, stream=None):
    """Output gate: out = x * sigmoid(g). x [T, N] / [T, H, D]; g the same shape as a (strided)
    view, e.g. the gate half of a [T, H, 2*D] q|gate buffer, or [T, 1] broadcast; out f32/bf16."""
    _ew("sigmoid_mul", x, g, out, stream=stream)


def silu_mul(a, b, out, *, stream=None):
    """SwiGLU: out = silu(a) * b. a, b [T, F] f32 views (e.g. the halves of a [T, 2F] gate|up
    output); out [T, F] f32 or bf16 (for the down GEMM)."""
    _ew("silu_mul", a, b, out, stream=stream)


def scale(x, out, factor: float, *, stream=None):
    """out = x * factor."""
    _ew("scale", x, None, out, factor=factor, stream=stream)


def gelu(x, out, *, stream=None):
    """out = gelu(x), the tanh approximation (kernels/dense/ref.py gelu)."""
    _ew("gelu", x, None, out, stream=stream)


def gelu_mul(a, b, out, *, stream=None):
    """GELU GLU: out = gelu(a) * b (Gemma's per-layer-embedding gate). a, b [T, N] f32 views;
    out f32 or bf16."""
    _ew("gelu_mul", a, b, out, stream=stream)


def softcap(x, out, cap: float, *, stream=None):
    """out = cap * tanh(x / cap) (Gemma's final logits); out may be x."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be > 0, got {cap}")
    _ew("softcap", x, None, out, factor=cap, stream=stream)


def copy(src, dst, *, stream=None):
    """Strided 2-D/3-D copy (slice, concat piece, f32 -> bf16 conversion): dst = src.
    src f32 view; dst f32 or bf16 view of the same [T, N] / [T, H, D] shape."""
    _ew("copy", src, None, dst, stream=stream)


# ---- DeltaNet ----------------------------------------------------------------------------------------

def gate_layout(alpha, beta_lin, fn: str):
    """(T, Hv, r, (row, group) strides of alpha, of beta_lin) of the DeltaNet gate inputs as
    deltanet_gates reads them: [T, Hv] f32 views, or [T, Hk, r] (value head h = c r + j at
    [t, c, j]); ValueError naming `fn` otherwise."""
    if alpha.ndim == 3:
        T, nc, r = (int(s) for s in alpha.shape)
        Hv = nc * r
    else:
        T, Hv = (int(s) for s in alpha.shape)
        nc, r = 1, Hv

    def grouped(a, what):
        _check_f32(a, f"{fn} {what}")
        if a.ndim == 3:
            if tuple(a.shape) != (T, nc, r) or a.strides[2] != a.itemsize:
                raise ValueError(f"{fn} {what}: expected [{T}, {nc}, {r}] with a contiguous last dim, got {a.shape}")
            return a.strides[0] // a.itemsize, a.strides[1] // a.itemsize
        if tuple(a.shape) != (T, Hv) or (Hv > 1 and a.strides[1] != a.itemsize):
            raise ValueError(f"{fn} {what}: expected [{T}, {Hv}], got {a.shape}")
        return a.strides[0] // a.itemsize, Hv
    return T, Hv, r, grouped(alpha, "alpha"), grouped(beta_lin, "beta_lin")


def deltanet_gates(alpha, beta_lin, dt_bias, ssm_a, g_out, beta_out, n_valid=None, *, stream=None):
    """g = softplus(alpha + dt_bias) * ssm_a, beta = sigmoid(beta_lin); rows t >= n_valid -> 0.

    alpha, beta_lin: [T, Hv] f32 views, or [T, Hk, r] views (value head h = c*r + j at [t, c, j],
    Qwen3-Next's interleaved ba projection) with r = Hv / Hk; dt_bias, ssm_a [Hv] f32;
    g_out, beta_out [T, Hv] f32 contiguous; n_valid: device int32 [1] or None (all valid).
    """
    T, Hv, r, sa, sb = gate_layout(alpha, beta_lin, "deltanet_gates")
    for arr, nm, n in ((dt_bias, "dt_bias", Hv), (ssm_a, "ssm_a", Hv), (g_out, "g_out", T * Hv), (beta_out, "beta_out", T * Hv)):
        _check_f32(arr, f"deltanet_gates {nm}")
        if arr.size != n or not arr.flags.c_contiguous:
            raise ValueError(f"deltanet_gates {nm}: expected {n} contiguous elements, got {arr.shape}")
    _check_i32(n_valid, "deltanet_gates n_valid")
    if T * Hv == 0:
        return
    args = (_ptr(alpha), np.int64(sa[0]), np.int64(sa[1]), _ptr(beta_lin), np.int64(sb[0]), np.int64(sb[1]),
            np.int32(r), _ptr(dt_bias), _ptr(ssm_a), _ptr(g_out), _ptr(beta_out), _ptr(n_valid),
            np.int32(T), np.int32(Hv))
    _launch(ELEMENTWISE, "deltanet_gates_f32", (_blocks(T * Hv),), (_THREADS,), args, stream)


_CONV_TT = 16


def ssm_conv_silu(x, conv_state, w, out, n_valid=None, *, stream=None):
    """out = silu(causal depthwise conv of concat(conv_state, x) with w); conv_state is then
    replaced IN PLACE by the window ending at token n_valid - 1 (the last Kc-1 rows of
    concat(conv_state, x[:n_valid])).

    x [T, C] f32 view (row stride allowed); conv_state [Kc-1, C] f32 contiguous; w [C, Kc] f32
    contiguous; out [T, C] f32 view, must not overlap x; n_valid device int32 [1] or None (= T).
    Two launches (conv, then state update) on the same stream; one token (T = 1, the decode
    step), one launch (ssm_conv1_k: each thread reads its channel's window once).
    """
    T, C = (int(s) for s in x.shape)
    Kc = int(w.shape[1])
    for arr, nm in ((x, "x"), (conv_state, "conv_state"), (w, "w"), (out, "out")):
        _check_f32(arr, f"ssm_conv_silu {nm}")
    if tuple(w.shape) != (C, Kc) or not w.flags.c_contiguous:
        raise ValueError(f"ssm_conv_silu: w must be contiguous [{C}, Kc], got {w.shape}")
    if tuple(conv_state.shape) != (Kc - 1, C) or not conv_state.flags.c_contiguous:
        raise ValueError(f"ssm_conv_silu: conv_state must be contiguous [{Kc - 1}, {C}], got {conv_state.shape}")
    if Kc not in (2, 3, 4):
        raise ValueError(f"ssm_conv_silu: conv kernel width {Kc} not in (2, 3, 4)")
    sx, so = _view(x, T, 1, C, "ssm_conv_silu x"), _view(out, T, 1, C, "ssm_conv_silu out")
    _check_i32(n_valid, "ssm_conv_silu n_valid")
    if T == 0:
        return
    gx = -(-C // _THREADS)
    if T == 1:          # one token: conv and window update in one launch (ssm_conv1_k)
        _launch(ELEMENTWISE, f"ssm_conv1_k{Kc}", (gx,), (_THREADS,),
                (_ptr(x), _ptr(conv_state), _ptr(w), _ptr(out), _ptr(n_valid), np.int32(C)), stream)
        return
    _launch(ELEMENTWISE, f"ssm_conv_silu_k{Kc}", (gx, -(-T // _CONV_TT)), (_THREADS,),
            (_ptr(x), np.int64(sx[0]), _ptr(conv_state), _ptr(w), _ptr(out), np.int64(so[0]), np.int32(T), np.int32(C)),
            stream)
    _launch(ELEMENTWISE, f"ssm_conv_state_k{Kc}", (gx,), (_THREADS,),
            (_ptr(x), np.int64(sx[0]), _ptr(conv_state), _ptr(n_valid), np.int32(T), np.int32(C)), stream)


# ---- attention KV cache ------------------------------------------------------------------------------

def kv_append(k, v, k_cache, v_cache, p_dev, *, stream=None):
    """k_cache[P + t] = bf16(k[t]), v_cache[P + t] = bf16(v[t]) for t < T, P = p_dev[0].

    k, v [T, Hkv, D] f32 views (v may be a slice of a fused projection, [T, Hkv*D] accepted);
    k_cache, v_cache [max_ctx, Hkv, D] bf16 (uint16 storage) contiguous; p_dev int32 [1] on the
    device. Rows P + t >= max_ctx are dropped.
    """
    max_ctx, Hkv, D = (int(s) for s in k_cache.shape)
    T = int(k.shape[0])
    for arr, nm in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if tuple(arr.shape) != (max_ctx, Hkv, D) or not arr.flags.c_contiguous or _dtype_name(arr) != "bf16":
            raise ValueError(f"kv_append: {nm} must be contiguous bf16 [{max_ctx}, {Hkv}, {D}], got {arr.dtype} {arr.shape}")
    _check_f32(k, "kv_append k")
    _check_f32(v, "kv_append v")
    sk, sv = _view(k, T, Hkv, D, "kv_append k"), _view(v, T, Hkv, D, "kv_append v")
    _check_i32(p_dev, "kv_append P")
    if T == 0:
        return
    args = (_ptr(k), np.int64(sk[0]), np.int64(sk[1]), _ptr(v), np.int64(sv[0]), np.int64(sv[1]),
            _ptr(k_cache), _ptr(v_cache), _ptr(p_dev), np.int32(T), np.int32(Hkv), np.int32(D), np.int32(max_ctx))
    _launch(ELEMENTWISE, "kv_append_bf16", (_blocks(T * Hkv * D), 2), (_THREADS,), args, stream)


def argmax_rows(x, out, *, stream=None):
    """out[r] = argmax(x[r]) (first maximum). x [R, N] f32 view; out int32 [R]."""
    R, N = (int(s) for s in x.shape)
    _check_f32(x, "argmax_rows x")
    _check_i32(out, "argmax_rows out")
    sx = _view(x, R, 1, N, "argmax_rows x")
    if R == 0:
        return
    _launch(ELEMENTWISE, "argmax_rows_f32", (R,), (_THREADS,), (_ptr(x), np.int64(sx[0]), _ptr(out), np.int32(N)), stream)


# ---- small row kernels (kernels/dense/misc.cu) ---------------------------------------------------

def rowdot_sigmoid(x, w, out, *, stream=None):
    """out[t] = sigmoid(x[t] . w): x [T, D] f32 (row stride allowed), w [D] f32, out [T] or [T, 1]."""
    T, D = x.shape
    _check_f32(x, "rowdot_sigmoid x")
    _launch("dense/misc.cu", "rowdot_sigmoid_f32", (_blocks(T * 32),), (_THREADS,),
            (_ptr(x), np.int64(x.strides[0] // 4), _ptr(w), _ptr(out), np.int32(T), np.int32(D)), stream)


def axpy_rows(out, y, s, *, stream=None):
    """out[t, :] += y[t, :] * s[t]: out, y [T, D] f32 (row strides allowed), s [T] or [T, 1] f32."""
    T, D = out.shape
    _launch("dense/misc.cu", "axpy_rows_f32", (_blocks(T * D),), (_THREADS,),
            (_ptr(out), np.int64(out.strides[0] // 4), _ptr(y), np.int64(y.strides[0] // 4), _ptr(s),
             np.int32(T), np.int32(D)), stream)


def gemm_f32(a, w, c, *, stream=None):
    """c[M, N] = a[M, K] @ w[N, K]^T in f32 on CUDA cores (the MoE router: llama.cpp multiplies
    its f32 router weights in f32; bf16 would flip near-tied expert choices). a, c row-strided
    f32 views, w contiguous f32 [N, K]."""
    M, K = a.shape
    N = w.shape[0]
    _check_f32(a, "gemm_f32 a")
    _check_f32(w, "gemm_f32 w")
    _launch("dense/gemm_f32.cu", "gemm_f32_nt", (-(-N // 64), -(-M // 64)), (256,),
            (_ptr(a), np.int64(a.strides[0] // 4), _ptr(w), _ptr(c), np.int64(c.strides[0] // 4),
             np.int32(M), np.int32(N), np.int32(K)), stream)


ROUTER = "dense/router_gemm.cu"
# tile -> (BM, BN, dynamic smem = Tile<...>::SMEM in router_gemm.cu); all 256 threads
ROUTER_TILES = {"128x64": (128, 64, 48 * 1024), "64x64k2": (64, 64, 64 * 1024)}
ROUTER_SPLITS = ("f16", "bf16")
ROUTER_W_SCALE = 256.0              # f16 split: W is multiplied by this (exact) before splitting


def router_tile(M: int, N: int, sms: int | None = None) -> str:
    """128x64 once it gives 1.5 blocks per SM (it reads A and W less often from L2), else
    64x64k2 (two k-groups of warps per block, 2x the blocks); sms: the multiprocessors assumed
    (the plan's target; default this device's)."""
    if sms is None:
        from ggfuse.kernels.gemm.launch import device_sms
        sms = device_sms()
    return "128x64" if 2 * (-(-M // 128) * -(-N // 64)) >= 3 * sms else "64x64k2"


def router_gemm(a, w, c, *, split: str = "f16", tile: str | None = None, w_scale: float = ROUTER_W_SCALE,
                stream=None):
    """c[M, N] = a[M, K] @ w[N, K]^T on tensor cores at f32 accuracy (the MoE router logits;
    kernels/dense/router_gemm.cu): each f32 operand is split into a 16-bit hi + lo pair in the
    kernel and three mma products are summed. split "f16" (default) is more accurate than
    gemm_f32 but needs |a| < 65504 and |w| * w_scale < 65504 (w_scale a power of two); "bf16"
    (bf16x3) has no range limit but ~5x gemm_f32's RMS error. a, c row-strided f32 views (last
    dim contiguous), w contiguous f32 [N, K], 16-byte aligned; K % 32 == 0. tile: None (by
    shape), or a key of ROUTER_TILES."""
    M, K = (int(s) for s in a.shape)
    N = int(w.shape[0])
    _check_f32(a, "router_gemm a")
    _check_f32(w, "router_gemm w")
    _check_f32(c, "router_gemm c")
    if split not in ROUTER_SPLITS:
        raise ValueError(f"router_gemm: split {split!r} not in {ROUTER_SPLITS}")
    if K % 32:
        raise ValueError(f"router_gemm: K = {K} must be a multiple of 32")
    if tuple(w.shape) != (N, K) or not w.flags.c_contiguous or w.data.ptr % 16:
        raise ValueError(f"router_gemm: w must be contiguous, 16-byte aligned f32 [N, {K}], got {w.shape}")
    if tuple(c.shape) != (M, N):
        raise ValueError(f"router_gemm: c must be [{M}, {N}], got {c.shape}")
    for x, nm in ((a, "a"), (c, "c")):
        if (x.shape[1] > 1 and x.strides[1] != 4) or x.strides[0] % 4:
            raise ValueError(f"router_gemm: {nm} must be row-strided with a contiguous last dim, strides {x.strides}")
    if math.frexp(w_scale)[0] != 0.5:
        raise ValueError(f"router_gemm: w_scale {w_scale} must be a power of two")
    if M == 0 or N == 0:
        return
    tile = tile or router_tile(M, N)
    if tile not in ROUTER_TILES:
        raise ValueError(f"router_gemm: tile {tile!r} not in {tuple(ROUTER_TILES)}")
    BM, BN, smem = ROUTER_TILES[tile]
    lda, ldc = a.strides[0] // 4, c.strides[0] // 4
    a4 = "" if lda % 4 == 0 and a.data.ptr % 16 == 0 else "_a4"    # float4 loads of A, or scalar
    fn = _fn(ROUTER, f"router_gemm_{tile}_{split}{a4}")
    if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem          # opt-in above 48 KiB (a function attribute)
    with (stream if stream is not None else contextlib.nullcontext()):
        fn((-(-N // BN), -(-M // BM)), (256,),
           (_ptr(a), np.int64(lda), _ptr(w), _ptr(c), np.int64(ldc),
            np.int32(M), np.int32(N), np.int32(K), np.float32(w_scale if split == "f16" else 1.0)),
           shared_mem=smem)


def lm_head_workspace(block_rows: int, N: int) -> dict[str, int]:
    """Scratch bytes of the LM head: one block of `block_rows` rows of logits [rows, N] f32 (the
    all-rows head, copied to the host block by block) and the last row's [1, N] (gemv)."""
    return {"block": block_rows * N * 4, "last": N * 4}


GEMV = "dense/gemv.cu"
# the alignment of a row that quant/dq8.cuh's word loads need, per weight type (others: 1)
DQ8_ALIGN = {"f32": 16, "f16": 16, "bf16": 16, "q4_k": 16, "q8_0": 2, "q6_k": 2}


def check_dq8_rows(fn: str, base: int, row_bytes: int, type_name: str) -> None:
    """ValueError unless every row (base + i row_bytes) is aligned as quant/dq8.cuh reads it."""
    a = DQ8_ALIGN.get(type_name, 1)
    if base % a or row_bytes % a:
        raise ValueError(f"{fn}: {type_name} rows must start {a}-byte aligned (base {base:#x}, {row_bytes} bytes per row)")


GEMV_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
GEMV_MAX_M = 8
GEMV1_TYPES = ("q4_k", "q6_k")  # one-row kernels laid out for the type's blocks (gemv1_<a>_<w>)
# per type: elements a warp covers per step (Q4_K 4 blocks of 8 lanes, Q6_K 8 of 4), the matrix
# alignment its loads need (Q6_K: aligned words around the 2-byte aligned blocks, which reach up
# to 2 bytes before a block: dense/gemv1_q6k.cuh); gemv1_smem: its shared memory
GEMV1_STEP = {"q4_k": 1024, "q6_k": 2048}
GEMV1_ALIGN = {"q4_k": 16, "q6_k": 4}

GEMV_MAX_SMEM = 96 * 1024      # sm_89 allows 99 KiB per block, sm_90 227 KiB


def gemv1_smem(type_name: str, K: int) -> int:
    """Dynamic shared memory of gemv1_<a>_<type_name> in bytes: Q4_K x padded by 4 floats per
    64 and the sums of 16; Q6_K x padded by 4 floats per 128 (dense/gemv.cu)."""
    return 4 * (K + K // 8 if type_name == "q4_k" else K + K // 32)


def gemv_supported(w_type, K: int, M: int = 1) -> bool:
    """Whether gemv() takes M rows times a [N, K] weight of w_type (the lowering asks before it
    records a gemv; gemv() itself says why not)."""
    qt = _qtype(w_type)
    return qt.name in GEMV_TYPES and K % 8 == 0 and K % qt.block == 0 and M * K * 4 <= GEMV_MAX_SMEM


def gemv(x, w, w_type, N: int, K: int, y, *, M: int | None = None, nvalid=None, stream=None):
    """y[m, :N] = x[r + m, :K] @ W[N, K]^T for m < M <= 8, reading W as the GGUF stores it
    (GGML blocks, or "bf16"/"f32"/"f16" rows): the bandwidth-bound LM head of the last token.

    x: f32 or bf16 (uint16) rows, row-strided; y: f32 [M, >= N] row-strided. With `nvalid` (a
    device int32 [1], the chunk's valid rows) M is 1 and the row read is nvalid[0] - 1, decided
    at run time, so a captured graph serves every prompt length; else r = 0.
    One row of a type in GEMV1_TYPES (Q4_K, Q6_K) runs the kernel laid out for its blocks
    (gemv1_<a>_<w>; a Q6_K matrix only 2-byte aligned, never one the runtime places, takes the
    other), every other case the 8-element-group kernel (gemv_<a>_<w>); warps share a row where
    N is small (gemv1_warps_per_row / gemv_warps_per_row).
    """
    qt = _qtype(w_type)
    name = qt.name if qt.name in GEMV_TYPES else None
    if name is None:
        raise ValueError(f"gemv: weight type {qt.name} is not supported (supported: {', '.join(GEMV_TYPES)})")
    M = int(x.shape[0] if M is None and nvalid is None else (1 if M is None else M))
    if not 1 <= M <= GEMV_MAX_M or (nvalid is not None and M != 1):
        raise ValueError(f"gemv: M must be 1..{GEMV_MAX_M} (1 with nvalid), got {M}")
    if K % 8 or K % qt.block:
        raise ValueError(f"gemv: K={K} must be a multiple of 8 and of the {qt.name} block ({qt.block})")
    if x.strides[-1] != x.itemsize or x.shape[-1] < K:
        raise ValueError("gemv: x rows must be contiguous and >= K long")
    _check_f32(y, "gemv y")
    if y.strides[-1] != 4 or y.shape[-1] < N:
        raise ValueError("gemv: y rows must be contiguous f32 with >= N columns")
    if nvalid is not None:
        _check_i32(nvalid, "gemv nvalid")
    rb = qt.row_bytes(K)
    if w.nbytes < N * rb:
        raise ValueError(f"gemv: W has {w.nbytes} bytes, [{N}, {K}] {qt.name} needs {N * rb}")
    check_dq8_rows("gemv", w.data.ptr, rb, qt.name)
    smem = M * K * 4
    if smem > GEMV_MAX_SMEM:
        raise ValueError(f"gemv: M * K = {M * K} floats exceed {GEMV_MAX_SMEM // 1024} KiB of shared memory")
    a = _dtype_name(x)
    ldx, ldy = x.strides[0] // x.itemsize, y.strides[0] // 4
    smem1 = gemv1_smem(name, K)
    if M == 1 and name in GEMV1_TYPES and smem1 <= GEMV_MAX_SMEM and w.data.ptr % GEMV1_ALIGN[name] == 0:
        # one row: the kernel laid out for the type's blocks (gemv1_<a>_<w>)
        _gemv1(x, a, name, [(w, N, y)], K, nvalid, stream)
        return
    fn = _fn(GEMV, f"gemv_{a}a_{name}")
    if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem     # opt-in above 48 KiB (a function attribute, not stream work)
    wpr = gemv_warps_per_row(N, K)
    grid = (min(-(-N // (8 // wpr)), 132 * 16),)
    with (stream if stream is not None else contextlib.nullcontext()):
        fn(grid, (256,), (_ptr(x), np.int64(ldx), np.int32(M), _ptr(w), np.int64(rb), np.int32(N), np.int32(K),
                          _ptr(y), np.int64(ldy), _ptr(nvalid), np.int32(wpr)), shared_mem=smem)


_WAVE: dict = {}


def _one_wave(fn, smem: int) -> int:
    """Blocks of 256 threads that one wave of kernel fn holds on this GPU (its registers and
    shared memory, as the driver's occupancy calculator counts them), cached per kernel."""
    key = (id(fn), smem)
    if key not in _WAVE:
        import cupy
        from cuda.bindings import driver as cu
        kern = getattr(fn, "kernel", fn)
        err, per_sm = cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(cu.CUfunction(int(kern.ptr)), 256, smem)
        if err != cu.CUresult.CUDA_SUCCESS or per_sm < 1:
            per_sm = 1
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        _WAVE[key] = int(per_sm) * int(sms)
    return _WAVE[key]


def gemv1_grid(rows_blocks: int, wave: int) -> int:
    """Blocks of a one-row launch needing rows_blocks blocks (one per 8 / wpr rows): up to four
    waves' worth, one wave (each warp takes several rows: no partial last wave, and the x
    staging once per block; H200, the decode step's [12320, 2048] Q4_K group: 2.3 waves ->
    one, 0.72 -> 0.65 ms over 30 layers with their output projections); beyond that, 16 blocks
    per SM (the LM head's 248k rows: a wave-sized grid was 5% slower there)."""
    if rows_blocks <= 4 * wave:
        return min(rows_blocks, wave)
    return min(rows_blocks, 16 * max(1, wave // 4))


def _gemv1(x, a: str, name: str, mats: list, K: int, nvalid, stream, norm=None) -> None:
    """gemv1_<a>_<name> over up to 4 matrices [(w, N, y)] of one type and K (dense/gemv.cu Segs).
    norm: (b, w, eps, out_sum, out_norm or None) where x is an add_rms_norm's first operand
    (dense/gemv.cu NormIn: the launch computes the norm itself)."""
    rb = _qtype(name).row_bytes(K)
    ldx = x.strides[0] // x.itemsize
    N = sum(n for _, n, _ in mats)
    wpr = gemv1_warps_per_row(N, K, step=GEMV1_STEP[name])
    smem1 = gemv1_smem(name, K)
    fn = _fn(GEMV, f"gemv1_{a}a_{name}")
    if smem1 > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem1:
        fn.max_dynamic_shared_size_bytes = smem1
    if norm is None:
        nargs = [np.uint64(0), np.uint64(0), np.float32(0), np.uint64(0), np.uint64(0), np.int32(0)]
    else:
        nb, nw, eps, nsum, nout = norm
        nargs = [_ptr(nb), _ptr(nw), np.float32(eps), _ptr(nsum), _ptr(nout),
                 np.int32(nout is not None and _dtype_name(nout) == "bf16")]
    segs, end, ends = [], 0, []
    for _, n, _ in mats:
        end += n
        ends.append(end)
    # matrix i > 0 starts at row ends[i - 1]; missing matrices are empty ranges at N
    for i in range(1, 4):
        if i < len(mats):
            w, _, y = mats[i]
            segs += [_ptr(w), _ptr(y), np.int32(ends[i - 1])]
        else:
            segs += [np.uint64(0), np.uint64(0), np.int32(N)]
    w0, _, y0 = mats[0]
    grid = gemv1_grid(-(-N // (8 // wpr)), _one_wave(fn, smem1))
    with (stream if stream is not None else contextlib.nullcontext()):
        fn((grid,), (256,),
           (_ptr(x), np.int64(ldx), _ptr(w0), np.int64(rb), np.int32(N), np.int32(K), _ptr(y0), _ptr(nvalid),
            np.int32(wpr), *segs, *nargs), shared_mem=smem1)


def gemv_group(x, mats: list, w_type, K: int, *, norm=None, stream=None) -> None:
    """y_i[0, :N_i] = x[0, :K] @ W_i[N_i, K]^T for up to 4 matrices [(W_i, N_i, y_i)] of one
    type in GEMV1_TYPES and one K, in one launch of the one-row kernel (the decode step's
    projections of one input: a launch costs about as much as a small matrix's bytes).

    norm = (b, w, eps, out_sum, out_norm): x is instead add_rms_norm(x, b) with weight w (f32
    x, b, w, out_sum [1, K]; the launch writes out_sum = x + b and, unless out_norm is None, the
    normed row to out_norm, f32 or bf16 [1, K]; where out_norm is bf16 the products read the
    normed row rounded to bf16, as they would read it from there): the decode step's attn_norm
    and its projections in one launch. out_sum and out_norm must not overlap x or b."""
    qt = _qtype(w_type)
    name = qt.name
    if name not in GEMV1_TYPES:
        raise ValueError(f"gemv_group: weight type {name} has no one-row kernel (types: {', '.join(GEMV1_TYPES)})")
    if not 1 <= len(mats) <= 4:
        raise ValueError(f"gemv_group: 1 to 4 matrices, got {len(mats)}")
    if K % qt.block or gemv1_smem(name, K) > GEMV_MAX_SMEM:
        raise ValueError(f"gemv_group: K={K} must be a multiple of {qt.block} and fit shared memory")
    if x.strides[-1] != x.itemsize or x.shape[-1] < K:
        raise ValueError("gemv_group: x rows must be contiguous and >= K long")
    rb = qt.row_bytes(K)
    for i, (w, n, y) in enumerate(mats):
        _check_f32(y, f"gemv_group y{i}")
        if y.strides[-1] != 4 or y.shape[-1] < n or n < 1:
            raise ValueError(f"gemv_group: y{i} must be contiguous f32 with >= {n} columns")
        if w.nbytes < n * rb:
            raise ValueError(f"gemv_group: W{i} has {w.nbytes} bytes, [{n}, {K}] {name} needs {n * rb}")
        if w.data.ptr % GEMV1_ALIGN[name]:
            raise ValueError(f"gemv_group: W{i} is not {GEMV1_ALIGN[name]}-byte aligned")
    if norm is not None:
        nb, nw, _, nsum, nout = norm
        _check_f32(x, "gemv_group x (with norm)")
        for v, what in ((nb, "norm b"), (nw, "norm w"), (nsum, "norm out_sum")):
            _check_f32(v, f"gemv_group {what}")
            if v.size < K or not v.flags.c_contiguous:
                raise ValueError(f"gemv_group: {what} must be contiguous f32 with >= {K} elements")
        if nout is not None:
            _dtype_name(nout)       # f32 or bf16, else a TypeError naming it
            if nout.size < K or not nout.flags.c_contiguous:
                raise ValueError(f"gemv_group: norm out_norm must be contiguous with >= {K} elements")
    _gemv1(x, _dtype_name(x), name, list(mats), K, None, stream, norm=norm)


def gemv1_warps_per_row(N: int, K: int, target_blocks: int = 2 * 132, *, step: int = 1024) -> int:
    """Warps sharing one output row in the one-row kernels (gemv1_*: a warp step is `step`
    elements, GEMV1_STEP), as gemv_warps_per_row."""
    return _warps_per_row(N, -(-K // step), target_blocks)


def gemv_warps_per_row(N: int, K: int, target_blocks: int = 2 * 132) -> int:
    """Warps sharing one output row in gemv(): the fewest of 1, 2, 4, 8 that give `target_blocks`
    blocks of 8 / wpr rows (two per SM of an H200; small N such as the [2048 -> 32] DeltaNet
    gates would otherwise leave most SMs idle), while every lane keeps at least one 8-element
    group of each row (a warp step: 32 lanes x 8 elements)."""
    return _warps_per_row(N, K // 256, target_blocks)


def _warps_per_row(N: int, steps: int, target_blocks: int) -> int:
    """The fewest of 1, 2, 4, 8 warps per row giving target_blocks blocks of 8 / wpr rows, while
    each warp keeps at least two of the row's `steps` warp steps."""
    wpr = 1
    while wpr < 8 and -(-N * wpr // 8) < target_blocks and steps >= 2 * wpr:
        wpr *= 2
    return wpr


# ---- Gemma 4 ---------------------------------------------------------------------------------------

def norm_add(x, w, res, out_sum, *, scale=None, w_next=None, out_norm=None, eps: float, eps_next: float = 0.0,
             stream=None):
    """Gemma's post-norm residual (kernels/elementwise/ref.py norm_add / norm_add_norm):
    out_sum = (rms_norm(x) * w + res) [* scale[0]]; with w_next also
    out_norm = rms_norm(out_sum) * w_next (eps_next).

    x, res, out_sum [T, D] or [T, H, D] f32 views (rows per head); w, w_next [D] f32; scale f32
    [1] on the device (layer_output_scale) or None; out_norm like x, f32 or bf16. out_sum may be
    res (in place). D <= ROW_MAX."""
    T, H, D = _thd(x, res, out_sum)
    for arr, nm in ((x, "x"), (res, "res"), (out_sum, "out_sum"), (w, "w"), (w_next, "w_next"), (scale, "scale")):
        if arr is not None:
            _check_f32(arr, f"norm_add {nm}")
    for arr, nm in ((w, "w"), (w_next, "w_next")):
        if arr is not None and (arr.size != D or not arr.flags.c_contiguous):
            raise ValueError(f"norm_add: {nm} must be contiguous [{D}], got {arr.shape}")
    if scale is not None and scale.size != 1:
        raise ValueError(f"norm_add: scale must be [1], got {scale.shape}")
    if (w_next is None) != (out_norm is None):
        raise ValueError("norm_add: w_next and out_norm go together")
    if D > ROW_MAX:
        raise ValueError(f"norm_add: rows of {D} > {ROW_MAX} elements are not supported")
    views = [(a, _view(a, T, H, D, f"norm_add {nm}") if a is not None else (0, 0))
             for a, nm in ((x, "x"), (res, "res"), (out_sum, "out_sum"), (out_norm, "out_norm"))]
    G = 32 if D <= 512 else 256
    V = 4 if _vec_ok(views + [(w, ()), (w_next, ())], D) else 1
    o = out_norm if out_norm is not None else out_sum
    name = f"norm_add_g{G}_v{V}_{_dtype_name(o)}"
    n_rows = T * H
    if n_rows == 0:
        return
    (sx, sr, ss, so) = [v for _, v in views]
    args = (_ptr(x), np.int64(sx[0]), np.int64(sx[1]), _ptr(w), _ptr(res), np.int64(sr[0]), np.int64(sr[1]),
            _ptr(scale), _ptr(w_next), _ptr(out_sum), np.int64(ss[0]), np.int64(ss[1]),
            _ptr(out_norm), np.int64(so[0]), np.int64(so[1]), np.int32(n_rows), np.int32(H), np.int32(D),
            np.float32(eps), np.float32(eps_next))
    grid = (-(-n_rows // 8),) if G == 32 else (n_rows,)
    _launch(ELEMENTWISE, name, grid, (256,), args, stream)


def kv_ring_append(x, ring, p_dev, n_valid_dev, *, stream=None):
    """A sliding layer's ring after a chunk (kernels/attention/ref.py kv_ring_append, valid rows
    only): ring[(P + t) % R] = bf16(x[t]) for the last min(R, n_valid) valid rows t.

    x [T, Hkv, D] f32 view (or [T, Hkv*D]); ring [R, Hkv, D] bf16 (uint16 storage) contiguous;
    p_dev, n_valid_dev int32 [1] on the device. Run it after every reader of the ring."""
    R, Hkv, D = (int(s) for s in ring.shape)
    T = int(x.shape[0])
    if ring.ndim != 3 or not ring.flags.c_contiguous or _dtype_name(ring) != "bf16":
        raise ValueError(f"kv_ring_append: ring must be contiguous bf16 [R, Hkv, D], got {ring.dtype} {ring.shape}")
    _check_f32(x, "kv_ring_append x")
    sx = _view(x, T, Hkv, D, "kv_ring_append x")
    _check_i32(p_dev, "kv_ring_append P")
    _check_i32(n_valid_dev, "kv_ring_append n_valid")
    if T == 0:
        return
    args = (_ptr(x), np.int64(sx[0]), np.int64(sx[1]), _ptr(ring), _ptr(p_dev), _ptr(n_valid_dev),
            np.int32(T), np.int32(Hkv), np.int32(D), np.int32(R))
    _launch(ELEMENTWISE, "kv_ring_append_bf16", (_blocks(min(T, R) * Hkv * D),), (_THREADS,), args, stream)


def scale_by_expert(weights, ids, scale, *, stream=None):
    """weights[t, j] *= scale[ids[t, j]] (Gemma 4's per-expert output scale folded into the
    route weights, kernels/moe/ref.py moe_route expert_scale). weights f32 [T, k], ids int32
    [T, k] contiguous; scale f32 [E]."""
    _check_f32(weights, "scale_by_expert weights")
    _check_f32(scale, "scale_by_expert scale")
    if ids.dtype != np.int32 or ids.size != weights.size or not (ids.flags.c_contiguous and weights.flags.c_contiguous):
        raise ValueError(f"scale_by_expert: ids int32 and weights f32 contiguous of one size, got {ids.dtype} "
                         f"{ids.shape} and {weights.shape}")
    n = int(weights.size)
    if n == 0:
        return
    _launch("dense/misc.cu", "scale_by_expert_f32", (_blocks(n),), (_THREADS,),
            (_ptr(weights), _ptr(ids), _ptr(scale), np.int32(n)), stream)


def ple_gather(raw, qtype, ids, out, scale: float, *, stream=None):
    """Gemma 4's per-layer embeddings of a chunk (kernels/dense/ref.py ple_gather): the rows of
    `ids` gathered from the quantised table [V, L*P] and dequantised on the device, times
    `scale` (sqrt(P)). raw: uint8 table bytes; ids int32 [T]; out f32 [T, L, P] contiguous."""
    T = int(out.shape[0])
    row_len = int(out.size) // max(T, 1)
    flat = out.reshape(T, row_len)
    get_rows(raw, qtype, row_len, ids, flat, T, stream=stream)
    if scale != 1.0:
        _ew("scale", flat, None, flat, factor=float(scale), stream=stream)
