"""Dense bf16 x bf16 GEMMs through cuBLAS (the library CuPy already loads), capturable.

    if blas.usable(a_dtype, w_type): blas.gemm_bf16(a, lda, w, N, K, c, c_dtype, ldc, M, stream)

The runtime keeps dense matrices dequantised to bf16 where they fit (runtime/cuda/backend.py);
for those, with bf16 activations, cuBLAS's Hopper kernels (TMA, persistent, 128x256 tiles)
run at 600-680 TFLOP/s on the 35B-A3B's projection shapes where our wgmma kernel reaches
~370 (BENCHMARKS.md). Quantised weights, f32 activations and the fused SwiGLU stay on our
kernels (kernels/gemm/launch.py). The plan's lowering chooses this path (option dense_gemm).

CuPy refuses cuBLAS calls inside a stream capture (its wrappers, down to cupy_backends, raise
NotImplementedError); the cuBLAS library itself supports capture. We call the library CuPy
loaded through ctypes: our own handle, a fixed workspace (cublasSetWorkspace, so nothing is
allocated while capturing), the capturing stream set on the handle before each call, and a
probe at first use (a small GEMM captured and replayed; where that fails, our kernels run).
No host synchronisation.

C[M, N] (+)= A[M, K] @ W[N, K]^T in row-major terms is, column-major, C^T = op_T(W) op_N(A^T):
gemmEx(T, N, m=N, n=M, k=K, W (ld K), A (ld lda), C (ld ldc)), f32 accumulation.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

WORKSPACE_BYTES = 8 << 20        # inside the runtime's reserve (passes/schedule_expert_prefetch.py)
_CUDA_R_16BF, _CUDA_R_32F = 14, 0
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1

_lock = threading.Lock()
_state: dict = {}
_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)


def _libcublas():
    """The libcublas CuPy loaded (found in this process's mappings after CuPy's binding is
    imported), through ctypes: CuPy's own cuBLAS wrappers, down to cupy_backends, raise
    NotImplementedError while a stream is capturing."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads the library)
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcublas.so" in line and "libcublasLt" not in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    lib = ctypes.CDLL(path or "libcublas.so", mode=ctypes.RTLD_GLOBAL)
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
        fn.restype = i
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"cuBLAS {what} failed (status {rc})")


def _probe(lib, h) -> None:
    """A small GEMM captured into a throwaway graph and replayed: raises if this cuBLAS cannot
    run inside a capture."""
    import cupy
    a = cupy.zeros((64, 64), dtype=cupy.uint16)
    c = cupy.zeros((64, 64), dtype=cupy.float32)
    s = cupy.cuda.Stream(non_blocking=True)
    s.begin_capture()
    try:
        _gemm(lib, h, s.ptr, a, 64, a, 64, 64, c, "f32", 64, 64, False)
    finally:
        g = s.end_capture()
    g.launch(s)
    s.synchronize()


def _handle():
    """(library, handle) of the current device: created once, with its own workspace, and
    probed under capture; raises where that fails (the callers then use our kernels)."""
    import cupy
    dev = cupy.cuda.Device().id
    with _lock:
        st = _state.get(dev)
        if st is None:
            try:
                lib = _libcublas()
                h = ctypes.c_void_p()
                _check(lib.cublasCreate_v2(ctypes.byref(h)), "create")
                ws = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
                _check(lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(ws.data.ptr), WORKSPACE_BYTES), "setWorkspace")
                _probe(lib, h)
                st = (lib, h, ws)
            except Exception as exc:   # remembered: no retry per launch
                st = exc
            _state[dev] = st
        if isinstance(st, Exception):
            raise st
        return st[0], st[1]


def usable(a_dtype: str, w_type: str) -> bool:
    """bf16 activations and bf16 weights, cuBLAS reachable and capturable."""
    if a_dtype != "bf16" or w_type != "bf16":
        return False
    try:
        _handle()
    except Exception:      # no library / not capturable here: our kernels (why: unavailable())
        return False
    return True


def unavailable() -> str | None:
    """Why the cuBLAS path is off on the current device (after a usable() call), or None."""
    import cupy
    st = _state.get(cupy.cuda.Device().id)
    return f"{type(st).__name__}: {st}" if isinstance(st, Exception) else None


def _gemm(lib, h, sptr: int, a, lda: int, w, N: int, K: int, c, c_dtype: str, ldc: int, M: int, accumulate: bool):
    _check(lib.cublasSetStream_v2(h, ctypes.c_void_p(sptr)), "setStream")
    c_type = _CUDA_R_32F if c_dtype == "f32" else _CUDA_R_16BF
    beta = _ONE if accumulate else _ZERO
    vp = ctypes.c_void_p
    _check(lib.cublasGemmEx(h, _OP_T, _OP_N, N, M, K, vp(_ONE.ctypes.data), vp(w.data.ptr), _CUDA_R_16BF, K,
                            vp(a.data.ptr), _CUDA_R_16BF, lda, vp(beta.ctypes.data), vp(c.data.ptr), c_type, ldc,
                            _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT), "gemmEx")


def gemm_bf16(a, lda: int, w, N: int, K: int, c, c_dtype: str, ldc: int, M: int, stream=None,
              *, accumulate: bool = False) -> None:
    """C[M, N] (+)= A[M, K] @ W[N, K]^T. a: bf16 (uint16) rows of stride lda; w: bf16 [N, K]
    contiguous; c: f32 or bf16 rows of stride ldc. Capturable (see the module docstring)."""
    if M <= 0 or N <= 0:
        return
    if a.itemsize != 2 or w.itemsize != 2 or lda < K or ldc < N or w.size < N * K:
        raise ValueError(f"blas.gemm_bf16: bad operands (a {a.dtype} lda {lda}, w {w.dtype} {w.shape}, "
                         f"K {K}, N {N}, ldc {ldc})")
    lib, h = _handle()
    import cupy
    sptr = stream.ptr if stream is not None else cupy.cuda.get_current_stream().ptr
    _gemm(lib, h, sptr, a, lda, w, N, K, c, c_dtype, ldc, M, accumulate)
