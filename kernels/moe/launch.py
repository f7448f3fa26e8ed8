"""Launchers for the MoE kernels: the device router (moe/route.cu) and the grouped expert GEMMs
(moe/grouped_gemm.cu). Layout of sorted_slots / expert_offsets: kernels/moe/ref.py.

    moe_route(logits, T, E, k, True, 0.0, MOE_TILE, n_valid, ids, wts, slots, offs, scratch, s)
    moe_gate_up(x, "bf16", w_gate, w_up, "q4_k", E, F, D, slots, offs, k, h, s)     # h [S, F] bf16
    moe_down(h, w_down, "q6_k", E, D, F, slots, offs, wts, k, out, s)               # out [T, D] f32

Buffers come from the caller (no allocation, no host sync: capturable):
    ids [T, k] i32, wts [T, k] f32, slots [sorted_len(T, k, E, tile)] i32, offs [E + 1] i32,
    scratch [route_scratch_ints(T, k, E)] i32, h [sorted_len(...), F] bf16.
The grouped GEMMs need tile % 128 == 0 (a 128-row block tile never mixes two experts): use
MOE_TILE for the MOE_ROUTE node's `tile`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggfuse.kernels.dense.launch import GEMV_TYPES as _DENSE_GEMV_TYPES
from ggfuse.kernels.dense.launch import check_dq8_rows
from ggfuse.kernels.gemm import launch as gl
from ggfuse.kernels.moe import table
from ggfuse.kernels.nvrtc import load_module
from ggfuse.kernels.quant.types import qtype

ROUTE_SOURCE = "moe/route.cu"
GEMM_SOURCE = "moe/grouped_gemm.cu"
GEMM_SOURCE90 = "moe/grouped_gemm90.cu"    # wgmma variants, picked as kernels/gemm/launch.pick_impl says
MOE_TILE = 128          # the grouped GEMM's row tile (gemm_core.cuh BM)
SMALL_SOURCE = "moe/grouped_small.cu"      # few rows per expert, every target (mma.sync)
# grouped GEMM schedules: the few-rows kernels (moe/grouped_small.cu, any impl), and for wgmma
# persistent blocks on 256- or 128-row tiles, or a block per tile
SCHEDULES = ("auto", "small", "smallq", "wide", "persist", "tiles")
SMALL_SCHEDULES = ("small", "smallq")
# "smallq": the few-rows kernels with integer-valued quants and per-scale sums (moe_smallq_*) for
# these types, the dequantising ones (moe_small_*) for the others; not picked by "auto"
SMALLQ_TYPES = ("q4_k", "q6_k")
WIDE_MIN_ROWS = 96      # "auto": wide tiles from this many rows per expert on average (T k / E)
SMALL_MAX_ROWS = 16     # "auto", either impl: the few-rows kernels up to this many rows per expert on average
ROUTE_CHUNK = 256       # slots per histogram chunk (route.cu)
MAX_EXPERTS = 512       # route.cu ROUTE_MAX_PER_LANE * 32
GATINGS = {"softmax": 0, "sigmoid": 1}


def sorted_len(T: int, k: int, E: int, tile: int) -> int:
    """Static length of sorted_slots (ref.padded_length)."""
    return T * k + E * (tile - 1)


def route_scratch_ints(T: int, k: int, E: int) -> int:
    """int32 scratch of moe_route: one E-bin histogram per 256-slot chunk."""
    return max(1, -(-T * k // ROUTE_CHUNK)) * E


def route_workspace(T: int, k: int, E: int) -> dict[str, int]:
    """Scratch bytes of one routing step (the MOE_ROUTE node): the router GEMM's logits [T, E]
    f32 and moe_route's histograms. The memory plan places them in the arena."""
    return {"router_logits": T * E * 4, "route_scratch": route_scratch_ints(T, k, E) * 4}


def grouped_workspace(T: int, k: int, E: int, F: int, D: int, tile: int, *, x_copy: bool,
                      shared_ffn: int = 0) -> dict[str, int]:
    """Scratch bytes of one bf16 grouped-expert step (moe_gate_up + moe_down, and the shared
    expert): h [S, F] bf16 between the two GEMMs; x_copy: the bf16 copy of an f32 x [T, D];
    shared_ffn Fs > 0: the shared expert's hidden [T, Fs] bf16 and output [T, D] f32."""
    ws = {"h": sorted_len(T, k, E, tile) * F * 2}
    if x_copy:
        ws["x_bf16"] = T * D * 2
    if shared_ffn:
        ws["hs"] = T * shared_ffn * 2
        ws["ys"] = T * D * 4
    return ws


def _wide_ok(w_name: str, a_kind: str) -> bool:
    return w_name != "bf16" and a_kind == "bf16"


def small_ok(w_name: str, K: int | None, N: int | None, row_step: int) -> bool:
    """Whether the few-rows kernels (moe/grouped_small.cu) take a [N, K] expert matrix of this
    type: a dequant8 type, K a multiple of 32 and of the type's block, N of row_step (16 gate_up
    rows, 32 down rows per warp). K / N None: not known (type only)."""
    q = qtype(w_name)
    if q.name not in GEMV_TYPES:
        return False
    return (K is None or (K % 32 == 0 and K % q.block == 0)) and (N is None or N % row_step == 0)


def check_small(schedule: str, w_name: str, K: int | None, N: int | None, row_step: int) -> None:
    """ValueError unless the few-rows kernels take these experts (small_ok)."""
    if not small_ok(w_name, K, N, row_step):
        raise ValueError(f"schedule {schedule}: {w_name} experts [{N}, {K}] are not taken by the few-rows kernels "
                         f"(K a multiple of 32 and of the block, rows of {row_step})")


def pick_schedule(schedule: str | None, w_name: str, a_kind: str, T: int, k: int, E: int, *,
                  K: int | None = None, N: int | None = None, row_step: int = 32) -> str:
    """How the grouped GEMMs are launched: "small" (moe/grouped_small.cu: a block per (expert,
    64 or 128 weight rows), the tokens as the MMA's 8-wide side; any impl, mma.sync), "smallq"
    (the same with Q4_K / Q6_K quants entering the MMA as integers, the scales applied per
    scale group: never picked by "auto", chosen by the option), or on the
    wgmma impl "wide" (about one block per SM, each walking (row tile, column tile) items of
    256-row tiles that never cross an expert, moe90w_*; GGML weights and bf16 activations only,
    otherwise "persist"), "persist" (the same on 128-row tiles, moe90p_*), "tiles" (a block per
    128-row item, the grid covering the worst-case layout, moe90_*); the mma.sync impl ignores
    all but "small". "auto" / None: small up to SMALL_MAX_ROWS rows per expert on average
    (T k / E) where small_ok, on either impl; above it on wgmma wide from WIDE_MIN_ROWS, else
    persist, and on mma.sync its tiles. The 35B-A3B layer on an H200 (kernels/moe/bench.py):
    64 / 256 / 512 tokens (2 / 8 / 16 rows per expert) 0.645 / 0.760 / 0.821 ms small against
    0.754 / 0.851 / 0.852 wgmma persist and 1.212 / 1.387 / 1.435 mma.sync tiles; 1024 tokens
    (32 rows) 1.241 small against 0.858 persist and 1.559 tiles. Whole model, 512-token
    prompt: 40.8 ms with the few-rows kernels against 44.2 ms with persist. Measured on the H100
    for the same layer: 4096 tokens (128 rows per expert) 1.17 ms wide vs 1.35 ms persist,
    2048 tokens (64) 1.08 vs 0.92. K, N: the matrix (gate_up: K = D, N = F, row_step 16; down:
    K = F, N = D, row_step 32).
    The plan's lowering calls this per captured chunk size and records it."""
    sch = schedule or "auto"
    if sch not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {sch!r}")
    if sch == "auto" and T * k <= SMALL_MAX_ROWS * E and small_ok(w_name, K, N, row_step):
        return "small"
    if sch in SMALL_SCHEDULES:
        check_small(sch, w_name, K, N, row_step)
        return sch
    return tile_schedule(sch, w_name, a_kind, T, k, E)


def tile_schedule(schedule: str | None, w_name: str, a_kind: str, T: int, k: int, E: int) -> str:
    """The wgmma tile schedule ("wide", "persist" or "tiles") for schedule "auto" / None or one of
    those: "auto" is wide from WIDE_MIN_ROWS rows per expert on average, else persist; wide only
    for GGML weights and bf16 activations (otherwise persist)."""
    sch = schedule or "auto"
    if sch not in ("auto", "wide", "persist", "tiles"):
        raise ValueError(f"tile schedule must be auto, wide, persist or tiles, got {sch!r}")
    if sch == "auto":
        sch = "wide" if T * k >= WIDE_MIN_ROWS * E else "persist"
    if sch == "wide" and not _wide_ok(w_name, a_kind):
        sch = "persist"
    return sch


def _grid90(n_cols: int, S: int, E: int, schedule: str, max_blocks: int | None = None) -> tuple[str, tuple[int, int, int]]:
    """(kernel name prefix, grid) of a wgmma grouped GEMM with n_cols column tiles over a
    layout of S sorted rows (S // MOE_TILE row tiles at most; wide: at most S // 256 + E).
    max_blocks caps the persistent grid (tests: fewer blocks, more items each)."""
    if schedule in ("persist", "wide"):
        blocks = gl.device_sms()
        if max_blocks:
            blocks = min(blocks, max(1, int(max_blocks)))
        tiles = min(S // MOE_TILE, S // 256 + E) if schedule == "wide" else S // MOE_TILE
        return ("moe90w" if schedule == "wide" else "moe90p"), (max(1, min(blocks, tiles * n_cols)), 1, 1)
    return "moe90", (n_cols, S // MOE_TILE, 1)


def _route_fn(name: str):
    return load_module(ROUTE_SOURCE).get_function(name)


def prepare(x_dtype, w_gate_type, w_down_type, impl: str | None = None, dequant: str = "fast",
            act: str = "silu") -> None:
    """Load and configure the router and the grouped GEMM variants (gate_up with GLU gate
    `act`); call before capturing."""
    for n in ("moe_topk", "moe_hist", "moe_scan", "moe_scatter"):
        _route_fn(n)
    gu, dn, a = gl.weight_name(w_gate_type), gl.weight_name(w_down_type), gl.act_kind(x_dtype, "x")
    gl.function(GEMM_SOURCE, f"moe_gate_up_{a}a_{gu}", gu, defines=gl.act_defines(act))
    gl.function(GEMM_SOURCE, f"moe_down_{dn}", dn)
    for pfx in ("moe90", "moe90p", "moe90w"):
        wide = pfx == "moe90w"
        if gl.pick_impl(gu, 64, impl) == "wgmma" and (not wide or _wide_ok(gu, a)):
            gl.function90(GEMM_SOURCE90, f"{pfx}_gate_up_{a}a_{gu}", gu, a, wide, dequant=dequant, act=act)
        if gl.pick_impl(dn, 64, impl) == "wgmma" and (not wide or _wide_ok(dn, "bf16")):
            gl.function90(GEMM_SOURCE90, f"{pfx}_down_{dn}", dn, "bf16", wide, dequant=dequant)
    if small_ok(gu, None, None, 16):
        _small_fn(f"moe_small_gate_up_{a}a_{gu}")
        _small_fn(f"{_small_prefix('smallq', gu)}_gate_up_{a}a_{gu}")
    if small_ok(dn, None, None, 32):
        _small_fn(f"moe_small_down_{dn}")
        _small_fn(f"{_small_prefix('smallq', dn)}_down_{dn}")


def _small_fn(name: str):
    return load_module(SMALL_SOURCE).get_function(name)


def _small_prefix(schedule: str, w_name: str) -> str:
    return "moe_smallq" if schedule == "smallq" and w_name in SMALLQ_TYPES else "moe_small"


SMALL_THREADS = 128     # grouped_small.cu gs::THREADS


def _route_checks(fn: str, T: int, E: int, k: int, gating: str, buffers) -> None:
    """ValueError unless k, E and gating are ones moe_topk takes and every (array, elements,
    name) in buffers is contiguous with at least that many 4-byte elements."""
    if not 0 < k <= min(E, 32) or E > MAX_EXPERTS:
        raise ValueError(f"{fn}: need 0 < k <= min(E, 32) and E <= {MAX_EXPERTS}, got k={k}, E={E}")
    if gating not in GATINGS:
        raise ValueError(f"{fn}: gating {gating!r} is not one of {sorted(GATINGS)}")
    for arr, n, name in buffers:
        if arr.size < n or arr.itemsize != 4 or not arr.flags.c_contiguous:
            raise ValueError(f"{fn}: {name} must be contiguous with >= {n} 4-byte elements, "
                             f"got {arr.dtype} {arr.shape}")


def _topk(logits, T: int, E: int, k: int, norm: bool, scale: float, n_valid_dev, ids_out, weights_out,
          slot_expert_out, gating: str, stream) -> None:
    """moe_topk: ids and weights, and each slot's expert where slot_expert_out is not None."""
    if T > 0:
        _route_fn("moe_topk")(((T + 7) // 8, 1, 1), (256, 1, 1),
                              (logits, np.int32(T), np.int32(E), np.int32(k), np.int32(GATINGS[gating]),
                               np.int32(bool(norm)), np.float32(scale), n_valid_dev, ids_out, weights_out,
                               np.uint64(0) if slot_expert_out is None else slot_expert_out),
                              stream=stream)


def moe_route(logits, T: int, E: int, k: int, norm: bool, scale: float, tile: int, n_valid_dev,
              ids_out, weights_out, sorted_slots_out, expert_offsets_out, scratch, stream=None,
              *, gating: str = "softmax") -> None:
    """Router probabilities, top-k and the expert-sorted, tile-padded slot layout, on the device.

    logits [T, E] f32 (the router GEMM's output, contiguous); n_valid_dev int32[1]: tokens
    t >= n_valid are padding (ids 0..k-1, weight 0, not sorted). Outputs as ref.moe_route:
    ids [T, k] i32 (most probable first, ties to the lower index), weights [T, k] f32
    (/ max(sum, 2^-14) if norm, * scale unless scale is 0 or 1), sorted_slots
    [T*k + E*(tile-1)] i32, expert_offsets [E+1] i32. Deterministic.
    """
    S = sorted_len(T, k, E, tile)
    _route_checks("moe_route", T, E, k, gating,
                  ((logits, T * E, "logits"), (ids_out, T * k, "ids_out"), (weights_out, T * k, "weights_out"),
                   (sorted_slots_out, S, "sorted_slots_out"), (expert_offsets_out, E + 1, "expert_offsets_out"),
                   (scratch, route_scratch_ints(T, k, E), "scratch")))
    n_chunks = -(-T * k // ROUTE_CHUNK)
    n_chunks_launch = max(n_chunks, 1)   # an empty chunk still fills sorted_slots with -1
    _topk(logits, T, E, k, norm, scale, n_valid_dev, ids_out, weights_out, None, gating, stream)
    _route_fn("moe_hist")((n_chunks_launch, 1, 1), (ROUTE_CHUNK, 1, 1),
                          (ids_out, np.int32(T), np.int32(k), np.int32(E), n_valid_dev, scratch,
                           sorted_slots_out, np.int64(S)),
                          shared_mem=4 * E, stream=stream)
    _route_fn("moe_scan")((1, 1, 1), (1024, 1, 1),
                          (scratch, np.int32(n_chunks_launch), np.int32(E), np.int32(tile), expert_offsets_out),
                          stream=stream)
    if T > 0:
        _route_fn("moe_scatter")((n_chunks, 1, 1), (ROUTE_CHUNK, 1, 1),
                                 (ids_out, np.int32(T), np.int32(k), np.int32(E), n_valid_dev, scratch,
                                  expert_offsets_out, sorted_slots_out),
                                 stream=stream)


def moe_route_slot_experts(logits, T: int, E: int, k: int, norm: bool, scale: float, n_valid_dev, ids_out,
                           weights_out, slot_expert_out, stream=None, *, gating: str = "softmax") -> None:
    """moe_route without the sorted layout, for the matrix-vector experts (moe_gemv_*): ids and
    weights as moe_route, and slot_expert_out [T k] i32 = ids (-1 for a padding token's slots),
    what moe_slot_experts would derive from the layout. One kernel instead of four."""
    _route_checks("moe_route_slot_experts", T, E, k, gating,
                  ((logits, T * E, "logits"), (ids_out, T * k, "ids_out"), (weights_out, T * k, "weights_out"),
                   (slot_expert_out, T * k, "slot_expert_out")))
    _topk(logits, T, E, k, norm, scale, n_valid_dev, ids_out, weights_out, slot_expert_out, gating, stream)


def moe_route1(x, w_router, w_shared, D: int, E: int, k: int, norm: bool, scale: float, n_valid_dev, logits,
               counter, ids_out, weights_out, slot_expert_out, shared_out=None, stream=None, *,
               gating: str = "softmax", add_norm=None) -> None:
    """The one-token step's router in one launch (route.cu moe_route1): logits[e] = x . W[e] in
    f32, shared_out[0] = sigmoid(x . w_shared) where w_shared is given, then moe_route_slot_experts'
    ids, weights and slot_expert_out from the logits, by the last block to finish.

    x [1, D] or [D] f32 contiguous; w_router [E, D] f32; w_shared [D] f32 or None (then
    shared_out is not written); logits [E] f32 scratch; counter a device uint32 [1] that is 0
    before the first launch (each launch leaves it 0 again); D % 4 == 0.

    add_norm = (b, w, eps, out_sum, out_norm): x is instead rms_norm(x + b) * w (all f32 [D];
    the launch writes out_sum = x + b and out_norm, the normed row the experts read: the decode
    step's post-attention add_rms_norm in this launch). out_sum and out_norm must not overlap
    x or b."""
    _route_checks("moe_route1", 1, E, k, gating,
                  ((logits, E, "logits"), (ids_out, k, "ids_out"), (weights_out, k, "weights_out"),
                   (slot_expert_out, k, "slot_expert_out"), (counter, 1, "counter")))
    if D % 4 or x.dtype != np.float32 or x.size < D or not x.flags.c_contiguous:
        raise ValueError(f"moe_route1: x must be contiguous f32 with D = {D} (a multiple of 4) elements")
    if w_router.dtype != np.float32 or w_router.size < E * D:
        raise ValueError(f"moe_route1: the router must be f32 [{E}, {D}]")
    if (w_shared is None) != (shared_out is None):
        raise ValueError("moe_route1: w_shared and shared_out go together")
    if w_shared is not None and (w_shared.dtype != np.float32 or w_shared.size < D):
        raise ValueError(f"moe_route1: the shared gate must be f32 [{D}]")
    null = np.uint64(0)
    nargs = (null, null, np.float32(0), null, null)
    if add_norm is not None:
        nb, nw, eps, nsum, nout = add_norm
        for v, what in ((nb, "b"), (nw, "w"), (nsum, "out_sum"), (nout, "out_norm")):
            if v is None or v.dtype != np.float32 or v.size < D or not v.flags.c_contiguous:
                raise ValueError(f"moe_route1: add_norm {what} must be contiguous f32 with D = {D} elements")
        nargs = (nb, nw, np.float32(eps), nsum, nout)
    grid = E + (w_shared is not None)
    _route_fn("moe_route1")((grid, 1, 1), (256, 1, 1),
                            (x, w_router, null if w_shared is None else w_shared, np.int32(D), np.int32(E),
                             np.int32(k), np.int32(GATINGS[gating]), np.int32(bool(norm)), np.float32(scale),
                             n_valid_dev, logits, counter, ids_out, weights_out, slot_expert_out,
                             null if shared_out is None else shared_out, *nargs),
                            stream=stream)


def _check_layout(fn: str, sorted_slots, expert_offsets, E: int) -> int:
    S = sorted_slots.size
    if sorted_slots.itemsize != 4 or expert_offsets.itemsize != 4 or expert_offsets.size != E + 1:
        raise ValueError(f"{fn}: sorted_slots must be int32 and expert_offsets int32[{E + 1}]")
    return S


def moe_gate_up(x, x_dtype, w_gate, w_up, w_type, E: int, F: int, D: int, sorted_slots, expert_offsets,
                k: int, h_out, stream=None, *, ldx: int | None = None, impl: str | None = None,
                schedule: str | None = None, wtab=None, max_blocks: int | None = None,
                dequant: str = "fast", act: str = "silu") -> None:
    """h[r] = silu(x[tok] Wg_e^T) * (x[tok] Wu_e^T) for every sorted row r of expert e (act
    "gelu": GELU-tanh in place of silu, Gemma 4's experts).

    x [T, ldx] f32 or bf16 (x_dtype); w_gate, w_up [E, F, D] raw GGUF bytes (w_up None: w_gate is
    the merged [E, 2F, D] gate_up, gate rows first); h_out [S, F] bf16 (S = sorted_slots.size),
    rows of padding slots get 0 (schedule "small": not written, and its moe_down never reads them),
    rows from expert_offsets[E] on are not written. The layout's tile
    must be a multiple of MOE_TILE. grid (ceil(F/64), S // 128); tiles past the layout exit.
    wgmma: schedule (schedule90) "persist" = about one block per SM looping over the tiles.
    wtab: an expert table (kernels/moe/table.py gate_up_pointers on the device, uint64 [2E]):
    expert e's gate and up weights at wtab[e] and wtab[E + e]; w_gate / w_up are then only
    described (None, or ExpertTables), never read.
    """
    a_kind, w_name = gl.act_kind(x_dtype, "x"), gl.weight_name(w_type)
    ldx = D if ldx is None else ldx
    gl.check_operands("moe_gate_up", x, a_kind, ldx, D, None if wtab is not None else w_gate, w_name)
    S = _check_layout("moe_gate_up", sorted_slots, expert_offsets, E)
    rb = qtype(w_name).row_bytes(D)
    if wtab is not None:
        table.check_table("moe_gate_up", wtab, 2 * E)
        w_gate, up_ptr, e_bytes = 0, 0, 0
    elif w_up is None:
        up_ptr, e_bytes = w_gate.data.ptr + F * rb, 2 * F * rb
    else:
        if w_up.data.ptr % 16:
            raise ValueError("moe_gate_up: w_up base address must be 16-byte aligned")
        up_ptr, e_bytes = w_up.data.ptr, F * rb
    if h_out.itemsize != 2 or h_out.size < S * F:
        raise ValueError(f"moe_gate_up: h_out must be bf16 [{S}, {F}], got {h_out.dtype} {h_out.shape}")
    if S < MOE_TILE or F <= 0:
        return
    if schedule in SMALL_SCHEDULES:
        check_small(schedule, w_name, D, F, 16)
        if ldx % 8 or gl.ptr(x) % 16:
            raise ValueError(f"moe_gate_up: schedule {schedule} needs 16-byte aligned x rows")
        if wtab is None:
            check_dq8_rows("moe_gate_up", int(gl.ptr(w_gate)), rb, w_name)
            check_dq8_rows("moe_gate_up", int(up_ptr), rb, w_name)
        _small_fn(f"{_small_prefix(schedule, w_name)}_gate_up_{a_kind}a_{w_name}")(
            ((F + 63) // 64, E, 1), (SMALL_THREADS, 1, 1),
            (gl.ptr(x), np.int64(ldx), gl.ptr(w_gate), np.uint64(up_ptr), np.int64(e_bytes), np.int64(rb),
             np.int32(F), np.int32(D), gl.ptr(h_out), np.int64(F), sorted_slots, expert_offsets, np.int32(E),
             np.int32(k), gl.ptr(0 if wtab is None else wtab), np.int32(ACTS[act])),
            stream=stream)
        return
    if gl.pick_impl(w_name, D, impl) == "wgmma":
        sch = tile_schedule(schedule, w_name, a_kind, x.shape[0], k, E)
        bn, threads, smem = gl.cfg90(w_name, a_kind, sch == "wide")
        pfx, grid = _grid90((F + bn // 2 - 1) // (bn // 2), S, E, sch, max_blocks)
        fn = gl.function90(GEMM_SOURCE90, f"{pfx}_gate_up_{a_kind}a_{w_name}", w_name, a_kind, sch == "wide",
                           dequant=dequant, act=act)
        block = (threads, 1, 1)
    else:
        fn = gl.function(GEMM_SOURCE, f"moe_gate_up_{a_kind}a_{w_name}", w_name, defines=gl.act_defines(act))
        grid, block = ((F + 63) // 64, S // MOE_TILE, 1), (gl.THREADS, 1, 1)
        smem = gl.smem_bytes(w_name, gl.build_cc())
    fn(grid, block,
       (gl.ptr(x), np.int64(ldx), gl.ptr(w_gate), np.uint64(up_ptr), np.int64(rb), np.int64(e_bytes),
        np.int32(F), np.int32(D), gl.ptr(h_out), np.int64(F), sorted_slots, expert_offsets, np.int32(E), np.int32(k),
        gl.ptr(0 if wtab is None else wtab)),
       shared_mem=smem, stream=stream)


def moe_down(h, w_down, w_type, E: int, D: int, F: int, sorted_slots, expert_offsets, weights, k: int, out,
             stream=None, *, zero_out: bool = True, impl: str | None = None, schedule: str | None = None,
             wtab=None, max_blocks: int | None = None, dequant: str = "fast") -> None:
    """out[tok] (+)= sum over the token's slots of weights[slot] * (h[r] Wd_e^T).

    h [S, F] bf16 (moe_gate_up's output); w_down [E, D, F] raw GGUF bytes; weights [T, k] f32;
    out [T, D] f32, contiguous. zero_out clears `out` first (a capturable memset); with
    zero_out=False the experts are added to what is there (e.g. the shared expert's output).
    The scatter uses f32 atomics (vector red.v2, on the wgmma path red.v4 where out allows), so
    the order of the k additions per element, and hence the last bit, may vary between runs.
    wgmma: schedule as moe_gate_up. wtab: an expert table (uint64 [E], kernels/moe/table.py),
    expert e's down weight at wtab[e]; w_down is then not read.
    """
    import cupy
    w_name = gl.weight_name(w_type)
    gl.check_operands("moe_down", h, "bf16", F, F, None if wtab is not None else w_down, w_name)
    if wtab is not None:
        table.check_table("moe_down", wtab, E)
        w_down = 0
    S = _check_layout("moe_down", sorted_slots, expert_offsets, E)
    if out.itemsize != 4 or out.data.ptr % 8 or not out.flags.c_contiguous or out.size % D:
        raise ValueError(f"moe_down: out must be contiguous f32 [T, {D}], got {out.dtype} {out.shape}")
    if weights.itemsize != 4:
        raise ValueError("moe_down: weights must be f32 [T, k]")
    if zero_out:
        sptr = 0 if stream is None else stream.ptr
        if stream is None:
            sptr = cupy.cuda.get_current_stream().ptr
        cupy.cuda.runtime.memsetAsync(out.data.ptr, 0, out.nbytes, sptr)
    if S < MOE_TILE or D <= 0:
        return
    rb = qtype(w_name).row_bytes(F)
    if schedule in SMALL_SCHEDULES:
        check_small(schedule, w_name, F, D, 32)
        if gl.ptr(h) % 16:
            raise ValueError(f"moe_down: schedule {schedule} needs 16-byte aligned h rows")
        if wtab is None:
            check_dq8_rows("moe_down", int(gl.ptr(w_down)), rb, w_name)
        _small_fn(f"{_small_prefix(schedule, w_name)}_down_{w_name}")(
            ((D + 127) // 128, E, 1), (SMALL_THREADS, 1, 1),
            (gl.ptr(h), np.int64(F), gl.ptr(w_down), np.int64(D * rb), np.int64(rb), np.int32(D), np.int32(F),
             gl.ptr(out), np.int64(D), sorted_slots, expert_offsets, np.int32(E), np.int32(k), weights,
             gl.ptr(0 if wtab is None else wtab)),
            stream=stream)
        return
    if gl.pick_impl(w_name, F, impl) == "wgmma":
        sch = tile_schedule(schedule, w_name, "bf16", out.size // D, k, E)
        bn, threads, smem = gl.cfg90(w_name, "bf16", sch == "wide")
        pfx, grid = _grid90((D + bn - 1) // bn, S, E, sch, max_blocks)
        fn = gl.function90(GEMM_SOURCE90, f"{pfx}_down_{w_name}", w_name, "bf16", sch == "wide", dequant=dequant)
        block = (threads, 1, 1)
    else:
        fn = gl.function(GEMM_SOURCE, f"moe_down_{w_name}", w_name)
        grid, block = ((D + gl.BN - 1) // gl.BN, S // MOE_TILE, 1), (gl.THREADS, 1, 1)
        smem = gl.smem_bytes(w_name, gl.build_cc())
    fn(grid, block,
       (gl.ptr(h), np.int64(F), gl.ptr(w_down), np.int64(rb), np.int64(D * rb), np.int32(D), np.int32(F),
        gl.ptr(out), np.int64(D), sorted_slots, expert_offsets, np.int32(E), np.int32(k), weights,
        gl.ptr(0 if wtab is None else wtab)),
       shared_mem=smem, stream=stream)


# ---- the few-token path (decode): matrix-vector products on the picked experts (moe/gemv.cu) ----

GEMV_SOURCE = "moe/gemv.cu"
GEMV_TYPES = _DENSE_GEMV_TYPES          # the same types as dense/gemv.cu
GEMV_MAX_T = 8          # the lowering picks these kernels for chunks of at most this many tokens
ACTS = {"silu": 0, "gelu": 1}
GEMV_GU_WARPS, GEMV_GU_F = 4, 2         # gemv.cu GU_WARPS, GU_F: a gate_up block holds 8 f values of one slot
GEMV_DN_ROWS, GEMV_DN_MAX_WARPS = 8, 9  # gemv.cu DN_ROWS, DN_MAX_WARPS: a down block, 8 rows of a token


@dataclass(frozen=True)
class GemvShared:
    """A shared expert run as one more slot of each token in the routed experts' two launches
    (moe_gemv_gate_up, moe_gemv_down): its gate and up [Fs, D] and down [D, Fs] weights as
    stored (device arrays) and their types, hs [T, Fs] f32 (the hidden between the launches),
    and scale [T] f32, the weight of its output per token (the router's sigmoid gate). Its
    gate is SiLU (ref.moe_grouped_gemm), whatever the routed experts' act."""
    gate: object
    up: object
    down: object
    gate_up_type: str
    down_type: str
    F: int
    h: object
    scale: object


def _rows_ok(w_type, K: int) -> bool:
    q = qtype(w_type)
    return q.name in GEMV_TYPES and K % 8 == 0 and K % q.block == 0


def gemv_supported(gate_up_type, down_type, D: int, F: int, k: int) -> bool:
    """Whether moe_gemv_gate_up / moe_gemv_down take these experts (gate/up [F, D] and down
    [D, F] rows of these types, k slots per token; any k: a down block's warps loop over the
    slots): the lowering asks before it records them."""
    return _rows_ok(gate_up_type, D) and _rows_ok(down_type, F) and k >= 1


def gemv_workspace(T: int, k: int, F: int, *, shared_ffn: int = 0) -> dict[str, int]:
    """Scratch bytes of one few-token expert step (moe_gemv_gate_up + moe_gemv_down): h [T k, F]
    f32 and each slot's expert [T k] i32; with a shared expert of width Fs, its h [T, Fs] f32."""
    ws = {"h_gemv": T * k * F * 4, "slot_expert": T * k * 4}
    if shared_ffn:
        ws["hs_gemv"] = T * shared_ffn * 4
    return ws


def _gemv_type(w_type, fn: str) -> str:
    name = qtype(w_type).name
    if name not in GEMV_TYPES:
        raise ValueError(f"{fn}: weight type {name} is not supported (supported: {', '.join(GEMV_TYPES)})")
    return name


def _gemv_kernel(half: str, w_routed: str, w_shared: str | None):
    """gemv.cu's kernel `half` ("gate_up_f32a", "gate_up_bf16a", "down") for routed experts of
    w_routed and a shared expert of w_shared (None: none): the module of every type when the
    two agree, else a module built for that pair (each slot reads its own type)."""
    if w_shared is None or w_shared == w_routed:
        return load_module(GEMV_SOURCE).get_function(f"moe_gemv_{half}_{w_routed}")
    return load_module(GEMV_SOURCE, defines=gemv_pair_defines(w_routed, w_shared)).get_function(
        f"moe_gemv_{half}_{w_routed}_{w_shared}")


def gemv_pair_defines(w_routed: str, w_shared: str) -> dict:
    """The defines that build gemv.cu for routed experts of one type and a shared expert of
    another: kernels moe_gemv_*_<routed>_<shared> only."""
    return {"MOE_GEMV_PAIR_NAME": f"{w_routed}_{w_shared}", "MOE_GEMV_PAIR_WR": f"GGML_{w_routed.upper()}",
            "MOE_GEMV_PAIR_WS": f"GGML_{w_shared.upper()}"}


def _check_x16(fn: str, a, what: str) -> None:
    """Rows of a vector the kernels read in 16-byte pieces (quant/dot_unit.cuh)."""
    if a.strides[-1] != a.itemsize:
        raise ValueError(f"{fn}: {what} rows must be contiguous")
    if int(gl.ptr(a)) % 16 or (a.shape[0] > 1 and a.strides[0] % 16):
        raise ValueError(f"{fn}: {what} rows must start 16-byte aligned (address {int(gl.ptr(a)):#x}, "
                         f"row stride {a.strides[0]} bytes)")


def _check_f32(fn: str, a, n: int, what: str) -> None:
    if a.itemsize != 4 or a.size < n or int(gl.ptr(a)) % 16:
        raise ValueError(f"{fn}: {what} must be 16-byte aligned f32 of >= {n} elements, got {a.dtype} {a.shape}")


def moe_gemv_gate_up(x, w_gate, up_ptr: int, e_bytes: int, w_type, E: int, F: int, D: int, k: int, h, *,
                     sorted_slots=None, expert_offsets=None, slot_expert=None, wtab=None, act: str = "silu",
                     shared: GemvShared | None = None, stream=None) -> None:
    """h[j] = act(x[j // k] Wg_e^T) * (x[j // k] Wu_e^T) for every slot j < T k, e its expert in
    the sorted layout (slot_expert[j] = e, -1 for a slot the layout does not hold; its h row 0),
    reading only the picked experts' rows as the GGUF stores them; with `shared`, in the same
    launch, shared.h[t] = silu(x[t] Wsg^T) * (x[t] Wsu^T) for every token t.

    x [T, ldx] f32 or bf16 rows, 16-byte aligned; w_gate: the stacked gate (or merged gate_up)
    weight [E, F, D] (or [E, 2F, D]); up_ptr: the address of expert 0's up rows, e_bytes: bytes
    from one expert to the next; h [T k, F] f32; slot_expert [T k] i32, filled from the layout
    when one is given (moe_slot_experts, one launch more), else read as given
    (moe_route_slot_experts wrote it). Without either: one expert for every slot. wtab: an expert
    table (gate at wtab[e], up at wtab[E + e]) for a streamed layer; w_gate is then not read.
    One launch: grid (ceil(max(F, Fs) / 8), T k (+ T)), 128 threads (moe/gemv.cu)."""
    fn_name = "moe_gemv_gate_up"
    name = _gemv_type(w_type, fn_name)
    T = x.shape[0]
    qt = qtype(name)
    if D % 8 or D % qt.block:
        raise ValueError(f"{fn_name}: D={D} must be a multiple of 8 and of the {name} block ({qt.block})")
    _check_x16(fn_name, x, "x")
    _check_f32(fn_name, h, T * k * F, f"h [{T * k}, {F}]")
    if (sorted_slots is None) != (expert_offsets is None) or (sorted_slots is not None and slot_expert is None):
        raise ValueError(f"{fn_name}: sorted_slots, expert_offsets and slot_expert go together")
    sname, Fs, sh = None, 0, None
    if shared is not None:
        sname, Fs = _gemv_type(shared.gate_up_type, f"{fn_name} (shared expert)"), int(shared.F)
        if Fs <= 0 or not _rows_ok(sname, D):
            raise ValueError(f"{fn_name}: shared expert rows of {D} {sname} elements are not taken (F={Fs})")
        _check_f32(fn_name, shared.h, T * Fs, f"shared.h [{T}, {Fs}]")
        srb = qtype(sname).row_bytes(D)
        for w in (shared.gate, shared.up):
            check_dq8_rows(f"{fn_name} (shared expert)", int(gl.ptr(w)), srb, sname)
        sh = (gl.ptr(shared.gate), gl.ptr(shared.up), np.int64(srb), np.int32(Fs), gl.ptr(shared.h))
    if T == 0 or max(F, Fs) <= 0:
        return
    if sorted_slots is not None:
        moe_slot_experts(sorted_slots, expert_offsets, E, T * k, slot_expert, stream=stream)
    a = gl.act_kind(x.dtype, "x")
    if wtab is None:
        base = 0 if w_gate is None else gl.ptr(w_gate)
        check_dq8_rows(fn_name, int(base), qt.row_bytes(D), name)
        check_dq8_rows(fn_name, int(up_ptr), int(e_bytes or qt.row_bytes(D)), name)
    fn = _gemv_kernel(f"gate_up_{a}a", name, sname)
    ldx = x.strides[0] // x.itemsize
    per_block = GEMV_GU_WARPS * GEMV_GU_F
    fn((-(-max(F, Fs) // per_block), T * k + (T if shared is not None else 0), 1), (GEMV_GU_WARPS * 32, 1, 1),
       (gl.ptr(x), np.int64(ldx), np.int32(T), np.int32(k), np.int32(E), gl.ptr(0 if w_gate is None else w_gate),
        np.uint64(up_ptr), np.int64(e_bytes), np.int64(qt.row_bytes(D)), np.int32(F), np.int32(D), gl.ptr(h),
        gl.ptr(0 if slot_expert is None else slot_expert), gl.ptr(0 if wtab is None else wtab),
        np.int32(ACTS[act]), *(sh or (np.uint64(0), np.uint64(0), np.int64(0), np.int32(0), np.uint64(0)))),
       stream=stream)


def moe_slot_experts(sorted_slots, expert_offsets, E: int, n_slots: int, slot_expert, stream=None) -> None:
    """slot_expert[j] = the expert whose rows of the sorted layout (sorted_slots, expert_offsets
    [E + 1]) hold slot j < n_slots, -1 where none does (a padding token's slots)."""
    if sorted_slots.itemsize != 4 or expert_offsets.itemsize != 4 or expert_offsets.size != E + 1:
        raise ValueError(f"moe_slot_experts: sorted_slots must be int32 and expert_offsets int32[{E + 1}]")
    if slot_expert.itemsize != 4 or slot_expert.size < n_slots:
        raise ValueError(f"moe_slot_experts: slot_expert must be int32 [{n_slots}]")
    fn = load_module(GEMV_SOURCE).get_function("moe_slot_experts")
    fn((1, 1, 1), (1024, 1, 1), (sorted_slots, expert_offsets, np.int32(E), np.int32(n_slots), slot_expert),
       shared_mem=(E + 1) * 4, stream=stream)


def moe_gemv_down(h, w_down, e_bytes: int, w_type, D: int, F: int, k: int, weights, out, *, slot_expert=None,
                  accumulate: bool = False, wtab=None, shared: GemvShared | None = None, stream=None) -> None:
    """out[t] (+)= sum_j weights[t, j] * (h[t k + j] Wd_e^T), e = slot_expert[t k + j] (slots with
    e < 0 add nothing; slot_expert None: expert 0 for every slot), plus with `shared`, in the
    same launch, shared.scale[t] * (shared.h[t] Wsd^T). h [T k, F] f32; w_down [E, D, F] as
    stored (e_bytes apart) or an expert table wtab; out [T, D] f32 contiguous, written
    (accumulate False) or added to. Deterministic: each block adds its slots' partial rows in
    slot order, no atomics. One launch: grid (ceil(D / 8), T), a warp per slot (moe/gemv.cu)."""
    fn_name = "moe_gemv_down"
    name = _gemv_type(w_type, fn_name)
    qt = qtype(name)
    if F % 8 or F % qt.block:
        raise ValueError(f"{fn_name}: F={F} must be a multiple of 8 and of the {name} block ({qt.block})")
    if out.itemsize != 4 or not out.flags.c_contiguous or out.size % D:
        raise ValueError(f"{fn_name}: out must be contiguous f32 [T, {D}], got {out.dtype} {out.shape}")
    T = out.size // D
    if weights.itemsize != 4 or weights.size < T * k:
        raise ValueError(f"{fn_name}: weights must be f32 [{T}, {k}]")
    _check_f32(fn_name, h, T * k * F, f"h [{T * k}, {F}]")
    sname, sh = None, None
    if shared is not None:
        sname, Fs = _gemv_type(shared.down_type, f"{fn_name} (shared expert)"), int(shared.F)
        if Fs <= 0 or not _rows_ok(sname, Fs):
            raise ValueError(f"{fn_name}: shared expert rows of {Fs} {sname} elements are not taken")
        _check_f32(fn_name, shared.h, T * Fs, f"shared.h [{T}, {Fs}]")
        if shared.scale.itemsize != 4 or shared.scale.size < T:
            raise ValueError(f"{fn_name}: shared.scale must be f32 [{T}]")
        srb = qtype(sname).row_bytes(Fs)
        check_dq8_rows(f"{fn_name} (shared expert)", int(gl.ptr(shared.down)), srb, sname)
        sh = (gl.ptr(shared.down), np.int64(srb), np.int32(Fs), gl.ptr(shared.h), gl.ptr(shared.scale))
    if T == 0:
        return
    if wtab is None and w_down is not None:
        check_dq8_rows(fn_name, int(gl.ptr(w_down)), qt.row_bytes(F), name)
    fn = _gemv_kernel("down", name, sname)
    warps = min(max(k + (1 if shared is not None else 0), 1), GEMV_DN_MAX_WARPS)
    fn((-(-D // GEMV_DN_ROWS), T, 1), (32 * warps, 1, 1),
       (gl.ptr(h), np.int32(T), np.int32(k), gl.ptr(weights), gl.ptr(0 if w_down is None else w_down),
        np.int64(e_bytes), np.int64(qt.row_bytes(F)), np.int32(D), np.int32(F),
        gl.ptr(0 if slot_expert is None else slot_expert), gl.ptr(out), np.int32(bool(accumulate)),
        gl.ptr(0 if wtab is None else wtab),
        *(sh or (np.uint64(0), np.int64(0), np.int32(0), np.uint64(0), np.uint64(0)))),
       stream=stream)
