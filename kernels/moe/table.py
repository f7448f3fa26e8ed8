"""Expert tables: a stacked expert tensor [E, N, K] whose experts lie anywhere in device memory.

The grouped GEMMs (moe/grouped_gemm.cu, grouped_gemm90.cu, grouped_f32.cu) normally find expert
e of a weight at base + e * expert_bytes. With a table (their last argument, `wtab`) they read
expert e's base address from wtab[e] instead (gate, or down) and wtab[E + e] (up), so one kernel
serves a layer whose first experts are resident and whose last ones arrive in a streaming slot
(runtime/cuda/streaming.py). Build the device table before a capture starts (device_table): the
launchers only pass its address.
"""
from __future__ import annotations

import numpy as np


class ExpertTable:
    """Per-expert device addresses of a stacked [E, N, K] expert weight (numpy uint64 [E]).
    `keep` holds the device buffers the addresses point into."""

    def __init__(self, ptrs, shape, keep=()):
        self.ptrs = np.asarray(ptrs, dtype=np.uint64)
        self.shape = tuple(int(d) for d in shape)
        if self.ptrs.shape != (self.shape[0],):
            raise ValueError(f"ExpertTable: {self.ptrs.size} addresses for {self.shape[0]} experts")
        if np.any(self.ptrs % np.uint64(16)):
            raise ValueError("ExpertTable: every expert must start 16-byte aligned")
        self.keep = tuple(keep)

    @property
    def n_experts(self) -> int:
        return self.shape[0]

    def __repr__(self):
        return f"ExpertTable({self.shape}, {len(self.keep)} buffers)"


def strided(base: int, n: int, stride: int) -> np.ndarray:
    """base + e * stride for e < n: the addresses of n experts stored back to back."""
    return np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(stride)


def pointers(w, n_experts: int) -> np.ndarray:
    """Expert e's address for e < n_experts: an ExpertTable's, or base + e * stride of a
    contiguous stack (a CuPy array)."""
    if isinstance(w, ExpertTable):
        if w.n_experts != n_experts:
            raise ValueError(f"expert table of {w.n_experts} experts, {n_experts} expected")
        return w.ptrs
    if w.nbytes % n_experts:
        raise ValueError(f"a stack of {w.nbytes} bytes does not split into {n_experts} experts")
    return strided(w.data.ptr, n_experts, w.nbytes // n_experts)


def gate_up_pointers(w_gate, w_up, n_experts: int, up_offset: int = 0) -> np.ndarray:
    """The gate_up kernels' table, [2E]: gate experts then up experts. w_up None: w_gate is the
    merged [E, 2F, K] stack and up starts up_offset bytes (F rows) into each gate expert."""
    g = pointers(w_gate, n_experts)
    u = g + np.uint64(up_offset) if w_up is None else pointers(w_up, n_experts)
    return np.concatenate([g, u])


def device_table(cp, ptrs: np.ndarray):
    """The table on the device (a `cp` = CuPy uint64 array). Not inside a stream capture."""
    host = np.ascontiguousarray(ptrs, dtype=np.uint64)
    t = cp.empty(host.size, dtype=np.uint64)
    t.set(host)
    return t


def check_table(fn: str, wtab, entries: int) -> None:
    if wtab.dtype != np.uint64 or wtab.size != entries or not wtab.flags.c_contiguous:
        raise ValueError(f"{fn}: wtab must be a contiguous uint64 table of {entries} addresses, "
                         f"got {wtab.dtype} {wtab.shape}")
