"""Launchers for kernels/moe/grouped_f32.cu: the routed experts of precision="f32".

Same layout as the tensor-core grouped GEMMs (kernels/moe/launch.py, ref.py): x [T, D] f32,
sorted_slots [S] / expert_offsets [E+1] from moe_route, whose `tile` must be a multiple of 64
(MOE_TILE = 128 is). Weights are the raw GGUF stacks [E, rows, K] (any type dense/qf32.py takes),
dequantised and multiplied in f32. Deterministic: every slot's expert output goes to its own row
of a [T*k, D] buffer and the k rows of a token are summed in order (no atomics). Capturable:
nothing allocated, no host synchronisation.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ggfuse.kernels.dense.qf32 import BM, BN, THREADS, check_rows, check_weight, row_bytes, weight_name
from ggfuse.kernels.moe import table
from ggfuse.kernels.nvrtc import load_module

SOURCE = "moe/grouped_f32.cu"


def _fn(name: str, defines=None):
    return load_module(SOURCE, defines=defines).get_function(name)


def _layout(fn: str, sorted_slots, expert_offsets, E: int, tile: int) -> int:
    """Row tiles of BM sorted rows to launch: S // BM, enough since expert_offsets[E] is a
    multiple of the layout's tile (a multiple of BM) and at most S."""
    if sorted_slots.dtype != np.int32 or expert_offsets.dtype != np.int32 or expert_offsets.size != E + 1:
        raise ValueError(f"{fn}: sorted_slots must be int32 and expert_offsets int32[{E + 1}]")
    if tile % BM:
        raise ValueError(f"{fn}: the layout's tile {tile} must be a multiple of {BM}")
    return int(sorted_slots.size) // BM


def moe_gate_up_f32(x, w_gate, w_up, w_type, E: int, F: int, D: int, sorted_slots, expert_offsets, k: int,
                    h, *, tile: int = 128, stream=None, wtab=None, act: str = "silu") -> None:
    """h[r, f] = silu(x[tok] Wg_e[f]) * (x[tok] Wu_e[f]) for the sorted rows r of expert e (act
    "gelu": GELU-tanh in place of silu, Gemma 4),
    tok = sorted_slots[r] // k; padding rows get 0, rows from expert_offsets[E] on are not written.
    w_gate [E, F, D]; w_up [E, F, D] or None when w_gate is the merged [E, 2F, D] (gate rows
    first); h f32 [>= S, F] row-strided. tile: the layout's (moe_route's) row tile. wtab: an
    expert table (kernels/moe/table.py, uint64 [2E]); the weights are then not read."""
    w_name = weight_name(w_type)
    tiles = _layout("moe_gate_up_f32", sorted_slots, expert_offsets, E, tile)
    ldx = check_rows("moe_gate_up_f32", x, D, "x")
    ldh = check_rows("moe_gate_up_f32", h, F, "h")
    if h.shape[0] < tiles * BM:
        raise ValueError(f"moe_gate_up_f32: h has {h.shape[0]} rows, the layout {sorted_slots.size}")
    if wtab is not None:
        table.check_table("moe_gate_up_f32", wtab, 2 * E)
        rb, gate_ptr, up_ptr, e_bytes = row_bytes("moe_gate_up_f32", w_name, D), 0, 0, 0
    elif w_up is None:
        rb = check_weight("moe_gate_up_f32", w_gate, w_name, E * 2 * F, D)
        gate_ptr, up_ptr, e_bytes = w_gate.data.ptr, w_gate.data.ptr + F * rb, 2 * F * rb
    else:
        rb = check_weight("moe_gate_up_f32", w_gate, w_name, E * F, D)
        check_weight("moe_gate_up_f32", w_up, w_name, E * F, D)
        gate_ptr, up_ptr, e_bytes = w_gate.data.ptr, w_up.data.ptr, F * rb
    if tiles == 0 or F <= 0:
        return
    with (stream if stream is not None else contextlib.nullcontext()):
        from ggfuse.kernels.gemm.launch import act_defines
        _fn(f"moe_gate_up_qf32_{w_name}", act_defines(act))((-(-F // BN), tiles), (THREADS,),
            (np.uint64(x.data.ptr), np.int64(ldx), np.uint64(gate_ptr), np.uint64(up_ptr), np.int64(rb),
             np.int64(e_bytes), np.int32(F), np.int32(D), np.uint64(h.data.ptr), np.int64(ldh),
             sorted_slots, expert_offsets, np.int32(E), np.int32(k), np.uint64(0 if wtab is None else wtab.data.ptr)))


def moe_down_f32(h, w_down, w_type, E: int, D: int, F: int, sorted_slots, expert_offsets, weights, y, *,
                 tile: int = 128, stream=None, wtab=None) -> None:
    """y[slot] = weights[slot] * (h[r] Wd_e^T) for every routed slot (sorted row r of expert e).
    h f32 [>= S, F]; w_down [E, D, F]; weights f32 [T, k] contiguous; y f32 [T*k, D] row-strided.
    Rows of unrouted slots are left as they are (moe_experts_f32 clears y first). wtab: an expert
    table (uint64 [E]); w_down is then not read."""
    w_name = weight_name(w_type)
    tiles = _layout("moe_down_f32", sorted_slots, expert_offsets, E, tile)
    ldh = check_rows("moe_down_f32", h, F, "h")
    ldy = check_rows("moe_down_f32", y, D, "y")
    if wtab is not None:
        table.check_table("moe_down_f32", wtab, E)
        rb, down_ptr = row_bytes("moe_down_f32", w_name, F), 0
    else:
        rb = check_weight("moe_down_f32", w_down, w_name, E * D, F)
        down_ptr = w_down.data.ptr
    if weights.dtype != np.float32 or not weights.flags.c_contiguous or y.shape[0] < weights.size:
        raise ValueError(f"moe_down_f32: weights must be contiguous f32 [T, k] and y have T*k rows "
                         f"(weights {weights.shape}, y {y.shape})")
    if tiles == 0 or D <= 0:
        return
    with (stream if stream is not None else contextlib.nullcontext()):
        _fn(f"moe_down_qf32_{w_name}")((-(-D // BN), tiles), (THREADS,),
            (np.uint64(h.data.ptr), np.int64(ldh), np.uint64(down_ptr), np.int64(rb), np.int64(D * rb),
             np.int32(D), np.int32(F), sorted_slots, expert_offsets, np.int32(E), weights,
             np.uint64(y.data.ptr), np.int64(ldy), np.uint64(0 if wtab is None else wtab.data.ptr)))


def moe_sum_slots(y, T: int, k: int, D: int, out, *, stream=None) -> None:
    """out[t, :D] = sum over j < k, in order, of y[t*k + j, :D]. y, out f32 row-strided."""
    ldy = check_rows("moe_sum_slots", y, D, "y")
    ldo = check_rows("moe_sum_slots", out, D, "out")
    n = T * D
    if n <= 0:
        return
    with (stream if stream is not None else contextlib.nullcontext()):
        _fn("moe_sum_slots_f32")((min(-(-n // 256), 1 << 16),), (256,),
                                 (np.uint64(y.data.ptr), np.int64(ldy), np.int32(T), np.int32(k), np.int32(D),
                                  np.uint64(out.data.ptr), np.int64(ldo)))


def experts_workspace_f32(T: int, k: int, E: int, F: int, D: int, tile: int, *, shared_ffn: int = 0) -> dict[str, int]:
    """Scratch bytes of one f32 grouped-expert step (moe_experts_f32, and the shared expert's
    f32 GEMMs when shared_ffn > 0): h [S, F] and y [T*k, D] f32; hs [T, Fs] and ys [T, D] f32."""
    from ggfuse.kernels.moe.launch import sorted_len
    ws = {"h": sorted_len(T, k, E, tile) * F * 4, "y": T * k * D * 4}
    if shared_ffn:
        ws["hs"] = T * shared_ffn * 4
        ws["ys"] = T * D * 4
    return ws


def moe_experts_f32(x, w_gate, w_up, w_gu_type, w_down, w_down_type, E: int, F: int, D: int, sorted_slots,
                    expert_offsets, weights, h, y, out, *, tile: int = 128, stream=None,
                    wtab_gate_up=None, wtab_down=None, act: str = "silu") -> None:
    """The routed experts end to end: out[t] = sum_j weights[t, j] * down_e(SwiGLU_e(x[t]))
    (act "gelu": the GELU-tanh GLU).
    h f32 [S, F] and y f32 [T*k, D] are scratch; out f32 [T, D]; tile: the layout's row tile
    (a multiple of 64). y is cleared first (a
    capturable memset), so padding tokens (no routed slot) get 0."""
    import cupy
    T, k = weights.shape
    s = stream if stream is not None else cupy.cuda.get_current_stream()
    if not y.flags.c_contiguous:
        raise ValueError("moe_experts_f32: y must be contiguous")
    cupy.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, s.ptr)
    moe_gate_up_f32(x, w_gate, w_up, w_gu_type, E, F, D, sorted_slots, expert_offsets, k, h, tile=tile, stream=stream,
                    wtab=wtab_gate_up, act=act)
    moe_down_f32(h, w_down, w_down_type, E, D, F, sorted_slots, expert_offsets, weights, y, tile=tile, stream=stream,
                 wtab=wtab_down)
    moe_sum_slots(y, T, k, D, out, stream=stream)
