"""Launchers for kernels/dense/gemm_qf32.cu: the dense GEMMs of precision="f32".

f32 activations times a weight as the GGUF stores it (GGML blocks, or f32 / f16 / bf16 rows),
dequantised bit-exactly and multiplied in f32 on CUDA cores: the CPU reference's f32 matmul up to
summation order. Slow next to the tensor-core GEMMs (kernels/gemm); it is the verification mode.
As everywhere in kernels/: CuPy arrays in and out (nothing allocated), `stream` a
cupy.cuda.Stream or None, no host synchronisation (capturable in a CUDA graph).
"""
from __future__ import annotations

import contextlib

import numpy as np

from ggfuse.kernels.nvrtc import load_module
from ggfuse.kernels.quant.types import qtype

SOURCE = "dense/gemm_qf32.cu"
TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
BM = BN = 64
THREADS = 256


def weight_name(w_type) -> str:
    name = qtype(w_type).name
    if name not in TYPES:
        raise ValueError(f"qf32: weight type {name} is not supported (supported: {', '.join(TYPES)})")
    return name


def check_rows(fn: str, a, K: int, what: str) -> int:
    """Row stride (elements) of an f32 [rows, >= K] operand whose last dim is contiguous."""
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"{fn}: {what} must be float32, got {a.dtype}")
    if a.ndim != 2 or a.shape[1] < K or (a.shape[1] > 1 and a.strides[1] != 4) or a.strides[0] % 4:
        raise ValueError(f"{fn}: {what} must be a row-strided f32 [rows, {K}] view, got {a.shape} strides {a.strides}")
    return a.strides[0] // 4


def row_bytes(fn: str, w_name: str, K: int) -> int:
    """Bytes per row of K weights of type w_name; K % 8 == 0 (dequant8 groups)."""
    if K % 8:
        raise ValueError(f"{fn}: K = {K} must be a multiple of 8")
    return qtype(w_name).row_bytes(K)


def check_weight(fn: str, w, w_name: str, rows: int, K: int) -> int:
    """Bytes per row of a [rows, K] weight of type w_name; K % 8 == 0 (dequant8 groups)."""
    rb = row_bytes(fn, w_name, K)
    if w.nbytes < rows * rb:
        raise ValueError(f"{fn}: the weight has {w.nbytes} bytes, [{rows}, {K}] {w_name} needs {rows * rb}")
    return rb


def _call(name: str, grid, args, stream, defines=None):
    fn = load_module(SOURCE, defines=defines).get_function(name)
    with (stream if stream is not None else contextlib.nullcontext()):
        fn(tuple(grid), (THREADS,), tuple(args))


def gemm_qf32(a, w, w_type, N: int, K: int, c, M: int | None = None, *, accumulate: bool = False,
              stream=None) -> None:
    """c[m, :N] (+)= a[m, :K] @ W[N, K]^T for m < M (default a.shape[0]).
    a, c: row-strided f32 views; w: the weight's bytes as the GGUF stores it (w_type)."""
    w_name = weight_name(w_type)
    M = int(a.shape[0] if M is None else M)
    lda = check_rows("gemm_qf32", a, K, "a")
    ldc = check_rows("gemm_qf32", c, N, "c")
    rb = check_weight("gemm_qf32", w, w_name, N, K)
    if M <= 0 or N <= 0:
        return
    _call(f"gemm_qf32_{w_name}", (-(-N // BN), -(-M // BM)),
          (np.uint64(a.data.ptr), np.int64(lda), np.uint64(w.data.ptr), np.int64(rb), np.uint64(c.data.ptr),
           np.int64(ldc), np.int32(M), np.int32(N), np.int32(K), np.int32(1 if accumulate else 0)), stream)


def gemm_swiglu_qf32(a, w_gate, w_up, w_type, N: int, K: int, c, M: int | None = None, *, act: str = "silu",
                     stream=None) -> None:
    """c[m, :N] = silu(a[m] @ Wg^T) * (a[m] @ Wu^T), Wg and Wu [N, K] of the same type (act
    "gelu": GELU-tanh in place of silu, a module built with GLU_ACT=1)."""
    from ggfuse.kernels.gemm.launch import act_defines
    w_name = weight_name(w_type)
    M = int(a.shape[0] if M is None else M)
    lda = check_rows("gemm_swiglu_qf32", a, K, "a")
    ldc = check_rows("gemm_swiglu_qf32", c, N, "c")
    rb = check_weight("gemm_swiglu_qf32", w_gate, w_name, N, K)
    check_weight("gemm_swiglu_qf32", w_up, w_name, N, K)
    if M <= 0 or N <= 0:
        return
    _call(f"gemm_swiglu_qf32_{w_name}", (-(-N // BN), -(-M // BM)),
          (np.uint64(a.data.ptr), np.int64(lda), np.uint64(w_gate.data.ptr), np.uint64(w_up.data.ptr), np.int64(rb),
           np.uint64(c.data.ptr), np.int64(ldc), np.int32(M), np.int32(N), np.int32(K)), stream, act_defines(act))
