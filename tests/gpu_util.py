"""What the gpu-marked tests share: the device check, bf16 conversions, error measures, a
capture-and-replay-once helper.

    cp = require_gpu()      # at module level: skips the module without CuPy or a CUDA device
"""
from __future__ import annotations

import numpy as np
import pytest

from ggfuse.kernels.dequant.ref import bf16_bits_to_f32, f32_to_bf16_bits, round_bf16  # noqa: F401


def require_gpu():
    """CuPy, or skip the calling test module (no CuPy, no driver, no device)."""
    cp = pytest.importorskip("cupy")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception:  # no driver
        n = 0
    if n == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cp


def run_captured(s, fn):
    """Capture fn(s) on stream s into a CUDA graph, replay it once, wait; returns the graph.
    Waits for the device first: inputs filled on the default stream must land before a replay on
    a non-blocking s reads them."""
    import cupy
    cupy.cuda.Device().synchronize()
    s.begin_capture()
    fn(s)
    g = s.end_capture()
    g.launch(s)
    s.synchronize()
    return g


def to_bf16_bits(x) -> np.ndarray:
    return f32_to_bf16_bits(x)


def from_bf16_bits(b) -> np.ndarray:
    return bf16_bits_to_f32(b)


def errors(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, max-abs error / max |ref|)."""
    d = got.astype(np.float64) - ref
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.sqrt((d ** 2).mean() / max((ref ** 2).mean(), 1e-30))), float(np.abs(d).max()) / scale


class Family(str):
    """A kernel family under test (mma, wgmma, wgmma_tiles, wgmma_persist, wgmma_generic): its
    name, and the launcher arguments that select it (kernels/gemm/bench.py family_kwargs):
    `gemm` for the dense GEMMs (impl, persist, dequant), `moe` for the grouped ones (impl,
    schedule, dequant, max_blocks)."""

    def __new__(cls, name: str, max_blocks: int | None = None):
        from ggfuse.kernels.gemm.bench import family_kwargs
        self = super().__new__(cls, name)
        kw = family_kwargs(name)
        self.gemm = {k: kw[k] for k in ("impl", "persist", "dequant")}
        self.moe = {k: kw[k] for k in ("impl", "schedule", "dequant")}
        self.moe["max_blocks"] = max_blocks
        return self
