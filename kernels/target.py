"""The GPUs a plan can be lowered for, and which one the kernels are being built for now.

A target names the code a plan runs, not the card it runs on: an sm_89 plan (the mma.sync
kernels an Ada card runs, 3 pipeline stages, no wgmma, no TMA) also runs on an H200, whose
driver compiles the sm_89 PTX for it, so the Ada code path can be measured on any newer GPU.
An sm_90a plan runs on compute capability 9.0 only (wgmma and setmaxnreg exist nowhere else).

    spec = TARGETS["sm_89"]              # cc 89, no wgmma, ...
    with building_for(spec):             # launchers pick variants and NVRTC builds for sm_89
        ...

The lowering (passes/lower_cuda.py) decides every kernel and variant for a target and writes
them into the plan; `building_for` only makes the kernels' own shape arithmetic (pipeline
depth, shared memory) and the NVRTC build follow that target instead of the device's.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class TargetSpec:
    name: str            # "sm_90a", "sm_89", "sm_80"
    cc: int              # compute capability the code is built for (90, 89, 80)
    wgmma: bool          # Hopper warpgroup MMA kernels may be used
    sms: int             # multiprocessor count the lowering assumes (a shape choice; grids use the device's)
    smem_per_block: int  # opt-in shared memory per block, bytes

    def runs_on(self, device_cc: int) -> bool:
        """Whether code for this target runs on a device of compute capability device_cc."""
        if self.wgmma:
            return device_cc == self.cc
        return device_cc >= self.cc

    def to_json(self) -> dict:
        return {"name": self.name, "cc": self.cc, "wgmma": self.wgmma, "sms": self.sms,
                "smem_per_block": self.smem_per_block}


TARGETS = {
    # SM counts: H100/H200 SXM 132; RTX 4070 Ti 60 (a 12 GB Ada card); A100 108.
    "sm_90a": TargetSpec("sm_90a", 90, True, 132, 227 * 1024),
    "sm_89": TargetSpec("sm_89", 89, False, 60, 99 * 1024),
    "sm_80": TargetSpec("sm_80", 80, False, 108, 163 * 1024),
}


def for_device(cc: int, sms: int | None = None) -> TargetSpec | None:
    """The best target for a device of compute capability cc (None: no CUDA target runs there)."""
    if cc == 90:
        spec = TARGETS["sm_90a"]
    elif cc >= 89:
        spec = TARGETS["sm_89"]
    elif cc >= 80:
        spec = TARGETS["sm_80"]
    else:
        return None
    if sms:
        spec = TargetSpec(spec.name, spec.cc, spec.wgmma, int(sms), spec.smem_per_block)
    return spec


def detect() -> TargetSpec | None:
    """The target of this machine's current CUDA device, or None (no GPU, no CuPy)."""
    try:
        import cupy
        dev = cupy.cuda.Device()
        cc = int(dev.compute_capability)
        sms = int(cupy.cuda.runtime.getDeviceProperties(dev.id)["multiProcessorCount"])
    except Exception:  # noqa: BLE001 -- any failure means: no usable GPU here
        return None
    return for_device(cc, sms)


def from_json(d) -> TargetSpec:
    return TargetSpec(str(d["name"]), int(d["cc"]), bool(d["wgmma"]), int(d["sms"]), int(d["smem_per_block"]))


_current: contextvars.ContextVar = contextvars.ContextVar("ggfuse_kernel_target", default=None)


@contextlib.contextmanager
def building_for(spec: TargetSpec | None):
    """Kernels looked up inside this block are built for `spec` (None: the device's own)."""
    tok = _current.set(spec)
    try:
        yield
    finally:
        _current.reset(tok)


def current() -> TargetSpec | None:
    return _current.get()


def build_cc(device_cc: int) -> int:
    """The compute capability kernels are built for now: the target's, else the device's."""
    spec = _current.get()
    return spec.cc if spec is not None else device_cc
