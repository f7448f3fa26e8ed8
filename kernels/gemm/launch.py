"""Launchers for the tensor-core GEMMs (kernels/gemm/gemm.cu; design in gemm_core.cuh).

    gemm(a, "bf16", K, w, "q4_k", N, K, c, "f32", N, M, stream)            # C = A @ W^T
    gemm_swiglu(a, "bf16", K, wg, wu, "q4_k", F, K, h, "bf16", F, M, stream)  # silu(A Wg^T) * (A Wu^T)

Arrays are CuPy arrays; bf16 data lives in 2-byte containers (uint16 bit patterns: CuPy has no
bfloat16). Weights are the raw GGUF bytes of an [N, K] matrix (any dtype, contiguous), or bf16
for type "bf16" (dense weights the runtime pre-dequantised). Nothing is allocated and nothing
waits on the host, so every launcher is capturable; call `prepare` for each variant before
capturing (module load and function attributes are not stream work).
"""
from __future__ import annotations

import threading

import numpy as np

from ggfuse.kernels.nvrtc import load_module
from ggfuse.kernels.quant.types import qtype

SOURCE = "gemm/gemm.cu"
THREADS = 256
BM = BN = 128          # block tile (gemm_core.cuh)
BK = 32                # compute step along K
TILE_BYTES = 128 * BK * 2
ROW_TABLES = 128 * 8 + 128 * 8 + 128 * 4
WEIGHT_TYPES = ("bf16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k")

_lock = threading.Lock()
_functions: dict = {}


def act_kind(dtype, what: str = "a") -> str:
    """'f32' or 'bf16' from a DType / name / numpy dtype (2-byte non-f16 dtypes hold bf16 bits)."""
    if isinstance(dtype, str):   # DType is a str enum
        name = str(getattr(dtype, "value", dtype)).lower()
        if name in ("f32", "float32"):
            return "f32"
        if name in ("bf16", "bfloat16"):
            return "bf16"
        raise ValueError(f"gemm: {what} dtype must be f32 or bf16, got {dtype!r}")
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "f32"
    if dt.itemsize == 2 and dt != np.float16:
        return "bf16"
    raise ValueError(f"gemm: {what} dtype must be float32 or a 2-byte bf16 container, got {dt}")


def weight_name(w_type) -> str:
    name = qtype(w_type).name
    if name not in WEIGHT_TYPES:
        raise ValueError(f"gemm: weight type {name} is not supported on the tensor-core path "
                         f"(supported: {', '.join(WEIGHT_TYPES)})")
    return name


def stages(cc: int) -> int:
    """Pipeline depth: 4 on sm_90, 3 below (sm_89 has 99 KB of shared memory per block)."""
    return 4 if cc >= 90 else 3


def smem_bytes(w_type, cc: int) -> int:
    """Dynamic shared memory of one block; mirrors gemm::smem_bytes<W>() (the kernel traps if
    it was given less)."""
    t = qtype(w_type)
    S = stages(cc)
    if t.name == "bf16":
        b = S * TILE_BYTES
    else:
        r = t.block // BK
        nr = S if r == 1 else 2
        by = t.block_bytes
        align = 16 if by % 16 == 0 else 8 if by % 8 == 0 else 4 if by % 4 == 0 else 2
        slot = (by + (16 - align) + 15) // 16 * 16
        b = nr * 128 * slot + 2 * TILE_BYTES
    return S * TILE_BYTES + b + ROW_TABLES


def device_cc() -> int:
    import cupy
    return int(cupy.cuda.Device().compute_capability)


def function(source: str, name: str, w_type):
    """The kernel `name` of `source` with its dynamic shared memory limit set (once per device)."""
    import cupy
    dev = cupy.cuda.Device().id
    key = (dev, source, name)
    with _lock:
        fn = _functions.get(key)
        if fn is None:
            fn = load_module(source).get_function(name)
            fn.max_dynamic_shared_size_bytes = smem_bytes(w_type, device_cc())
            fn.preferred_shared_memory_carveout = 100   # two blocks per SM need ~2 x 105 KB
            _functions[key] = fn
    return fn


def prepare(a_dtype, w_type) -> None:
    """Load and configure gemm and gemm_swiglu for (a_dtype, w_type); call before capturing."""
    a, w = act_kind(a_dtype), weight_name(w_type)
    function(SOURCE, f"gemm_{a}a_{w}", w)
    function(SOURCE, f"gemm_swiglu_{a}a_{w}", w)


def ptr(x) -> np.uint64:
    """Device address of a CuPy array (or an int address) as a kernel pointer argument."""
    return np.uint64(x if isinstance(x, (int, np.integer)) else x.data.ptr)


def check_operands(fn: str, a, a_kind: str, lda: int, K: int, w, w_name: str, c=None, c_kind=None, ldc=None) -> None:
    t = qtype(w_name)
    if K <= 0 or K % BK or K % t.block:
        raise ValueError(f"{fn}: K={K} must be a positive multiple of {max(BK, t.block)} for {w_name} weights")
    esz = 4 if a_kind == "f32" else 2
    if a.itemsize != esz:
        raise ValueError(f"{fn}: a_dtype {a_kind} but a has {a.itemsize}-byte elements")
    if lda < K or a.data.ptr % 16 or (lda * esz) % 16:
        raise ValueError(f"{fn}: A base and row stride lda={lda} must be 16-byte aligned with lda >= K={K}")
    if w.data.ptr % 16:
        raise ValueError(f"{fn}: weight base address must be 16-byte aligned")
    if c is not None:
        cs = 4 if c_kind == "f32" else 2
        if c.itemsize != cs:
            raise ValueError(f"{fn}: c_dtype {c_kind} but c has {c.itemsize}-byte elements")
        if ldc % 2 or c.data.ptr % (2 * cs):
            raise ValueError(f"{fn}: C base must be {2 * cs}-byte aligned and ldc={ldc} even")


def gemm(a, a_dtype, lda: int, w, w_type, N: int, K: int, c, c_dtype, ldc: int, M: int,
         stream=None, *, accumulate: bool = False) -> None:
    """C[M, N] (+)= A[M, K] @ W[N, K]^T on the tensor cores (bf16 operands, f32 accumulation).

    a: [M, lda] f32 or bf16 (a_dtype); w: W's raw GGUF bytes (w_type: a GGML type name / DType /
    id from WEIGHT_TYPES), rows of K elements, contiguous; c: [M, ldc] f32 or bf16 (c_dtype), its
    first N columns written (accumulate: added to). K % 32 == 0 (and % 256 for K-quants); M, N
    arbitrary. grid (ceil(N/128), ceil(M/128)).
    """
    a_kind, c_kind, w_name = act_kind(a_dtype), act_kind(c_dtype, "c"), weight_name(w_type)
    check_operands("gemm", a, a_kind, lda, K, w, w_name, c, c_kind, ldc)
    if M <= 0 or N <= 0:
        return
    fn = function(SOURCE, f"gemm_{a_kind}a_{w_name}", w_name)
    grid = ((N + BN - 1) // BN, (M + BM - 1) // BM, 1)
    fn(grid, (THREADS, 1, 1),
       (ptr(a), np.int64(lda), ptr(w), np.int64(qtype(w_name).row_bytes(K)), np.int32(M), np.int32(N),
        np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16"), np.int32(bool(accumulate))),
       shared_mem=smem_bytes(w_name, device_cc()), stream=stream)


def gemm_swiglu(a, a_dtype, lda: int, w_gate, w_up, w_type, F: int, K: int, c, c_dtype, ldc: int, M: int,
                stream=None) -> None:
    """C[M, F] = silu(A Wg^T) * (A Wu^T), the dense SwiGLU FFN's first half in one GEMM.

    w_gate, w_up: [F, K] raw GGUF bytes of one type (views into a merged [2F, K] gate_up tensor
    work: pass its two halves). Each block computes 64 output columns from 64 gate and 64 up
    rows. grid (ceil(F/64), ceil(M/128)); other rules as gemm.
    """
    a_kind, c_kind, w_name = act_kind(a_dtype), act_kind(c_dtype, "c"), weight_name(w_type)
    check_operands("gemm_swiglu", a, a_kind, lda, K, w_gate, w_name, c, c_kind, ldc)
    if w_up.data.ptr % 16:
        raise ValueError("gemm_swiglu: w_up base address must be 16-byte aligned")
    if M <= 0 or F <= 0:
        return
    fn = function(SOURCE, f"gemm_swiglu_{a_kind}a_{w_name}", w_name)
    grid = ((F + BN // 2 - 1) // (BN // 2), (M + BM - 1) // BM, 1)
    fn(grid, (THREADS, 1, 1),
       (ptr(a), np.int64(lda), ptr(w_gate), ptr(w_up), np.int64(qtype(w_name).row_bytes(K)), np.int32(M),
        np.int32(F), np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16")),
       shared_mem=smem_bytes(w_name, device_cc()), stream=stream)
