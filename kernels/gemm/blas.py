"""Dense bf16 x bf16 GEMMs through cuBLAS (the library CuPy already loads), capturable.

    if blas.usable(a_dtype, w_type): blas.gemm_bf16(a, lda, w, N, K, c, c_dtype, ldc, M, stream)

The runtime keeps dense matrices dequantised to bf16 where they fit (runtime/cuda/backend.py);
for those, with bf16 activations, cuBLAS's Hopper kernels (TMA, persistent, 128x256 tiles)
run at 600-680 TFLOP/s on the 35B-A3B's projection shapes where our wgmma kernel reaches
~370 (BENCHMARKS.md). Quantised weights, f32 activations and the fused SwiGLU stay on our
kernels (kernels/gemm/launch.py). GGFUSE_DENSE_GEMM=ggfuse turns this path off.

CuPy refuses cupy.matmul inside a stream capture (a Python-level guard); the cuBLAS library
itself supports capture. We call cublasGemmEx through CuPy's low-level binding with our own
handle, a fixed workspace (cublasSetWorkspace, so nothing is allocated while capturing) and the
capturing stream set on the handle before each call. No host synchronisation.

C[M, N] (+)= A[M, K] @ W[N, K]^T in row-major terms is, column-major, C^T = op_T(W) op_N(A^T):
gemmEx(T, N, m=N, n=M, k=K, W (ld K), A (ld lda), C (ld ldc)), f32 accumulation.
"""
from __future__ import annotations

import ctypes
import os
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


def enabled() -> bool:
    return os.environ.get("GGFUSE_DENSE_GEMM", "cublas").strip().lower() != "ggfuse"


def _lib():
    """cuBLAS through CuPy's binding, and cublasSetWorkspace_v2 through ctypes where the
    binding lacks it (the same loaded library)."""
    from cupy_backends.cuda.libs import cublas
    return cublas


def _set_workspace(cublas, handle: int, ptr: int, nbytes: int) -> None:
    fn = getattr(cublas, "setWorkspace", None)
    if fn is not None:
        fn(handle, ptr, nbytes)
        return
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("cuBLAS: cublasSetWorkspace_v2 is not reachable")
    f = lib.cublasSetWorkspace_v2
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    f.restype = ctypes.c_int
    rc = f(ctypes.c_void_p(handle), ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes))
    if rc != 0:
        raise RuntimeError(f"cublasSetWorkspace_v2 failed ({rc})")


def _handle():
    """(cublas module, handle) of the current device: created once, with its own workspace."""
    import cupy
    dev = cupy.cuda.Device().id
    with _lock:
        st = _state.get(dev)
        if st is None:
            cublas = _lib()
            h = cublas.create()
            ws = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
            _set_workspace(cublas, h, ws.data.ptr, WORKSPACE_BYTES)
            st = _state[dev] = (cublas, h, ws)
        return st[0], st[1]


def usable(a_dtype: str, w_type: str) -> bool:
    """bf16 activations and bf16 weights, cuBLAS reachable, not switched off."""
    if not enabled() or a_dtype != "bf16" or w_type != "bf16":
        return False
    try:
        _handle()
    except Exception:      # no binding / library: our kernels
        return False
    return True


def gemm_bf16(a, lda: int, w, N: int, K: int, c, c_dtype: str, ldc: int, M: int, stream=None,
              *, accumulate: bool = False) -> None:
    """C[M, N] (+)= A[M, K] @ W[N, K]^T. a: bf16 (uint16) rows of stride lda; w: bf16 [N, K]
    contiguous; c: f32 or bf16 rows of stride ldc. Capturable (see the module docstring)."""
    if M <= 0 or N <= 0:
        return
    if a.itemsize != 2 or w.itemsize != 2 or lda < K or ldc < N or w.size < N * K:
        raise ValueError(f"blas.gemm_bf16: bad operands (a {a.dtype} lda {lda}, w {w.dtype} {w.shape}, "
                         f"K {K}, N {N}, ldc {ldc})")
    cublas, h = _handle()
    import cupy
    sptr = stream.ptr if stream is not None else cupy.cuda.get_current_stream().ptr
    cublas.setStream(h, sptr)
    c_type = _CUDA_R_32F if c_dtype == "f32" else _CUDA_R_16BF
    beta = _ONE if accumulate else _ZERO
    cublas.gemmEx(h, _OP_T, _OP_N, N, M, K, _ONE.ctypes.data, w.data.ptr, _CUDA_R_16BF, K,
                  a.data.ptr, _CUDA_R_16BF, lda, beta.ctypes.data, c.data.ptr, c_type, ldc,
                  _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
