"""The cuda device: the plan's schedule as NVRTC kernels, one captured CUDA graph per chunk."""
from __future__ import annotations

_AVAILABLE = None


def available() -> bool:
    """True when cupy + cuda-python import and a CUDA device is present."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import cupy
            from cuda.bindings import nvrtc  # noqa: F401
            _AVAILABLE = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # no driver, no device, no wheel: all mean "not available"
            _AVAILABLE = False
    return _AVAILABLE


def __getattr__(name):
    if name == "CUDABackend":
        from ggfuse.runtime.cuda.backend import CUDABackend
        return CUDABackend
    raise AttributeError(name)
