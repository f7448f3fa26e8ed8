"""Ops made by passes/fuse_moe.py: the router with its counting sort, and the grouped expert GEMM.

MOE_ROUTE  inputs  x [T, D], w_router [E, D], (w_shexp_gate [1, D]), (expert_scale [1, E])
           attrs   k, gating ("softmax" | "sigmoid"), norm, scale, tile,
                   expert_scale (absent: False; True: the last input scales each expert's output,
                   Gemma 4's ffn_down_exps.scale, folded into the slot weights)
           outputs ids [T, k] i32, weights [T, k] f32, sorted_slots [S] i32, expert_offsets [E+1] i32,
                   and shexp_gate [T, 1] f32 only when w_shexp_gate is an input (so 4 or 5 outputs:
                   a layer without a shared expert carries no dummy value).
MOE_GROUPED_GEMM
           inputs  x [T, D], weights [T, k], sorted_slots [S], expert_offsets [E+1],
                   then w_gate [E, F, D], w_up [E, F, D]    (merged_gate_up=False)
                     or w_gate_up [E, 2F, D]                (merged_gate_up=True),
                   then w_down [E, D, F],
                   then w_gate_sh [Fs, D], w_up_sh [Fs, D], w_down_sh [D, Fs], shexp_gate [T, 1]  (shared=True)
           attrs   merged_gate_up, shared, tile, act (absent: "silu"; "gelu": GELU-tanh GLU, Gemma 4)
           output  [T, D]
x is the experts' input; Gemma 4's router reads another one (MOE_ROUTE's x).
S = k*T + E*(tile-1), the static worst case of the padded layout (kernels/moe/ref.py).
The router's ids stay an output of MOE_ROUTE for the passes that schedule expert transfers; the
grouped GEMM reads only the sorted layout, which says everything about which slot goes where.
"""
from __future__ import annotations

from dataclasses import dataclass

from ggfuse.ir.ops import Op, _f32, _req, register
from ggfuse.ir.types import DType, TensorType, dim_add, dim_eq, dim_eval, dim_mul
from ggfuse.kernels.moe import ref as moe_ref

_I32 = DType.I32


def _slots_dim(T, k: int, E: int, tile: int):
    return dim_add(dim_mul(T, k), E * (tile - 1))


def _route_inputs(a, ins):
    """(x, w_router, w_shexp_gate or None, expert_scale or None)."""
    has_scale = bool(a.get("expert_scale", False))
    _req(len(ins) - has_scale in (2, 3), f"moe_route (expert_scale={has_scale}) takes {2 + has_scale} or "
                                         f"{3 + has_scale} inputs, got {len(ins)}")
    wsg = ins[2] if len(ins) - has_scale == 3 else None
    return ins[0], ins[1], wsg, ins[-1] if has_scale else None


def _infer_moe_route(a, ins):
    x, w, wsg, es = _route_inputs(a, ins)
    _req(x.rank == 2 and w.rank == 2 and dim_eq(x.shape[1], w.shape[1]),
         f"moe_route wants x[T, D], w_router[E, D], got x{list(x.shape)} w{list(w.shape)}")
    E = w.shape[0]
    _req(isinstance(E, int) and isinstance(a.k, int) and 0 < a.k <= E, f"moe_route k={a.k!r} of {E} experts")
    _req(a.gating in ("softmax", "sigmoid"), f"moe_route gating {a.gating!r} is not softmax or sigmoid")
    _req(isinstance(a.tile, int) and a.tile > 0, f"moe_route tile must be a positive int, got {a.tile!r}")
    T = x.shape[0]
    outs = (TensorType((T, a.k), _I32), _f32((T, a.k)),
            TensorType((_slots_dim(T, a.k, E, a.tile),), _I32), TensorType((E + 1,), _I32))
    if es is not None:
        _req(tuple(es.shape) == (1, E), f"moe_route expert_scale must be [1, {E}], got {list(es.shape)}")
    if wsg is not None:
        _req(wsg.rank == 2 and wsg.shape[0] == 1 and dim_eq(wsg.shape[1], x.shape[1]),
             f"moe_route w_shexp_gate must be [1, {x.shape[1]}], got {list(wsg.shape)}")
        outs += (_f32((T, 1)),)
    return outs


def _flops_moe_route(a, ins, outs, env):
    T = dim_eval(ins[0].shape[0], env)
    E, D = ins[1].shape
    return 2 * T * E * D + (2 * T * D if _route_inputs(a, ins)[2] is not None else 0)


def _ref_moe_route(a, env, *arrays):
    x, w, wsg, es = _route_inputs(a, arrays)
    return moe_ref.moe_route(x, w, wsg, k=a.k, gating=a.gating, norm=a.norm, scale=a.scale, tile=a.tile,
                             expert_scale=es)


register(Op.MOE_ROUTE, (2, 4), _infer_moe_route, _ref_moe_route, _flops_moe_route, n_outputs=5)


@dataclass(frozen=True)
class SharedExpert:
    gate: object        # [Fs, D]
    up: object          # [Fs, D]
    down: object        # [D, Fs]
    scale: object       # shexp_gate [T, 1], the router's sigmoid gate of the shared expert


@dataclass(frozen=True)
class MoeOperands:
    """The MOE_GROUPED_GEMM node's operands by name: values, types or arrays alike (whatever
    sequence `moe_operands` was given). The one reading of the operand layout: the shape rule,
    the reference, the FLOP count, the passes and the runtime all use it."""
    x: object
    weights: object
    slots: object
    offsets: object
    gate: object        # [E, F, D], None when gate and up are merged
    up: object          # [E, F, D], None when merged
    gate_up: object     # [E, 2F, D], None when not merged
    down: object        # [E, D, F]
    shared: SharedExpert | None

    @property
    def experts(self) -> tuple:
        """The stacked expert weights in input order: gate, up (or gate_up), then down."""
        return tuple(w for w in (self.gate, self.up, self.gate_up, self.down) if w is not None)

    @property
    def first_gate(self):
        """The gate (or merged gate_up) weight: its shape gives E and F."""
        return self.gate_up if self.gate is None else self.gate


def moe_operands(a, ins) -> MoeOperands:
    n_exp = 2 if a.merged_gate_up else 3
    want = 4 + n_exp + (4 if a.shared else 0)
    _req(len(ins) == want, f"moe_grouped_gemm (merged_gate_up={a.merged_gate_up}, shared={a.shared}) "
                           f"takes {want} inputs, got {len(ins)}")
    _req(a.get("act", "silu") in ("silu", "gelu"), f"moe_grouped_gemm act {a.get('act')!r} is not silu or gelu")
    x, wts, slots, offs = ins[:4]
    if a.merged_gate_up:
        wg, wu, wgu, wd = None, None, ins[4], ins[5]
    else:
        wg, wu, wgu, wd = ins[4], ins[5], None, ins[6]
    shared = SharedExpert(*ins[4 + n_exp:]) if a.shared else None
    return MoeOperands(x, wts, slots, offs, wg, wu, wgu, wd, shared)


def _infer_moe_grouped_gemm(a, ins):
    o = moe_operands(a, ins)
    x, wts, slots, offs, wg, wu, wgu, wd = o.x, o.weights, o.slots, o.offsets, o.gate, o.up, o.gate_up, o.down
    shared = (o.shared.gate, o.shared.up, o.shared.down, o.shared.scale) if o.shared else None
    _req(x.rank == 2 and wts.rank == 2 and dim_eq(wts.shape[0], x.shape[0]) and isinstance(wts.shape[1], int),
         f"moe_grouped_gemm wants x[T, D], weights[T, k], got x{list(x.shape)} weights{list(wts.shape)}")
    _req(wd.rank == 3 and dim_eq(wd.shape[1], x.shape[1]), f"w_down must be [E, D, F], got {list(wd.shape)}")
    E, D, F = wd.shape
    for w, rows in ((wg, F), (wu, F), (wgu, 2 * F)):
        if w is not None:
            _req(tuple(w.shape) == (E, rows, D), f"expert gate/up weight must be [{E}, {rows}, {D}], got {list(w.shape)}")
    _req(slots.dtype == _I32 and offs.dtype == _I32 and tuple(offs.shape) == (E + 1,),
         f"expert_offsets must be i32[{E + 1}], got {offs}")
    _req(slots.rank == 1 and dim_eq(slots.shape[0], _slots_dim(x.shape[0], wts.shape[1], E, a.tile)),
         f"sorted_slots {slots} does not have the tile={a.tile} padded length")
    if shared:
        wgs, wus, wds, sg = shared
        Fs = wgs.shape[0]
        _req(tuple(wgs.shape) == (Fs, D) and tuple(wus.shape) == (Fs, D) and tuple(wds.shape) == (D, Fs),
             f"shared expert weights must be [Fs, D], [Fs, D], [D, Fs], got {list(wgs.shape)}, {list(wus.shape)}, {list(wds.shape)}")
        _req(sg.rank == 2 and dim_eq(sg.shape[0], x.shape[0]) and sg.shape[1] == 1, f"shexp_gate must be [T, 1], got {sg}")
    return (_f32(x.shape),)


def _ref_moe_grouped_gemm(a, env, *arrays):
    o = moe_operands(a, arrays)
    shared = (o.shared.gate, o.shared.up, o.shared.down, o.shared.scale) if o.shared else None
    return (moe_ref.moe_grouped_gemm(o.x, o.weights, o.slots, o.offsets, w_gate=o.gate, w_up=o.up,
                                     w_gate_up=o.gate_up, w_down=o.down, shared=shared,
                                     act=a.get("act", "silu")),)


def _flops_moe_grouped_gemm(a, ins, outs, env):
    """Useful work only (tile padding rows are not counted): 3 matmuls per routed slot and per
    token for the shared expert."""
    o = moe_operands(a, ins)
    T, k = dim_eval(o.x.shape[0], env), o.weights.shape[1]
    _, D, F = o.down.shape
    routed = 2 * T * k * 3 * D * F
    return routed + (2 * T * 3 * D * o.shared.gate.shape[0] if o.shared else 0)


register(Op.MOE_GROUPED_GEMM, (6, 11), _infer_moe_grouped_gemm, _ref_moe_grouped_gemm, _flops_moe_grouped_gemm)
