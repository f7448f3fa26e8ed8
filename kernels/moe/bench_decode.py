"""The one-token step's experts of Qwen3.5-35B-A3B (python -m ggfuse.kernels.moe.bench --decode).

Per MoE layer: top-8 of 256 experts, F = 512, D = 2048, gate/up Q4_K and down Q6_K as stored,
plus the shared expert (F 512, same types, a per-token gate), x f32, T = 1; the slots' experts
given (the decode plan's slots "slot_expert": the router wrote them). `layers` such layers are
captured in one CUDA graph, replayed `reps` times after a warm-up, timed with CUDA events; the
median over the layers. Rows:
  new: kernels/moe/gemv.cu, the shared expert as a ninth slot: 2 launches a layer
  old: kernels/moe/gemv_baseline.cu, the kernels gemv.cu replaced: 4 launches a layer
and each half alone. The layers cycle through `sets` distinct weight sets (all 256 experts and a
shared expert each) and each layer picks its own random experts, so a replay reads mostly
distinct experts and the L2 holds little of them. Both must give the same outputs (f32
accumulation order only: relative RMS < 1e-4).
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.gemm.bench import PEAK_TBS, device_weight, time_graph
from ggfuse.kernels.moe import launch
from ggfuse.kernels.nvrtc import load_module
from ggfuse.kernels.quant.types import qtype

D, E, K_TOP, F, FS = 2048, 256, 8, 512, 512
GU_TYPE, DN_TYPE = "q4_k", "q6_k"
BASELINE = "moe/gemv_baseline.cu"


class Layer:
    """One layer's operands: a weight set's experts and shared expert, its own x, picks, route
    weights, and outputs of both versions."""

    def __init__(self, cp, ws, rng):
        self.ws = ws
        self.x = cp.asarray(rng.standard_normal((1, D), dtype=np.float32))
        self.slot_e = cp.asarray(rng.choice(E, K_TOP, replace=False).astype(np.int32))
        w = rng.uniform(0.05, 1.0, K_TOP).astype(np.float32)
        self.wts = cp.asarray((w / w.sum()).reshape(1, K_TOP))
        self.h = cp.zeros((K_TOP, F), cp.float32)
        self.out = {v: cp.zeros((1, D), cp.float32) for v in ("new", "old")}
        self.shared = launch.GemvShared(gate=ws["sg"], up=ws["su"], down=ws["sd"], gate_up_type=GU_TYPE,
                                        down_type=DN_TYPE, F=FS, h=cp.zeros((1, FS), cp.float32),
                                        scale=cp.asarray(rng.uniform(0.1, 0.9, 1).astype(np.float32)))


def weight_set(cp):
    return {"wg": device_weight(GU_TYPE, E * F, D).reshape(E, F, -1), "wu": device_weight(GU_TYPE, E * F, D).reshape(E, F, -1),
            "wd": device_weight(DN_TYPE, E * D, F).reshape(E, D, -1), "sg": device_weight(GU_TYPE, FS, D),
            "su": device_weight(GU_TYPE, FS, D), "sd": device_weight(DN_TYPE, D, FS)}


RB_GU, RB_DN, RB_SDN = qtype(GU_TYPE).row_bytes(D), qtype(DN_TYPE).row_bytes(F), qtype(DN_TYPE).row_bytes(FS)


def new_gate_up(L, s):
    ws = L.ws
    launch.moe_gemv_gate_up(L.x, ws["wg"], ws["wu"].data.ptr, F * RB_GU, GU_TYPE, E, F, D, K_TOP, L.h,
                            slot_expert=L.slot_e, shared=L.shared, stream=s)


def new_down(L, s):
    launch.moe_gemv_down(L.h, L.ws["wd"], D * RB_DN, DN_TYPE, D, F, K_TOP, L.wts, L.out["new"],
                         slot_expert=L.slot_e, shared=L.shared, stream=s)


def _old(name):
    return load_module(BASELINE).get_function(name)


def old_gate_up(L, s):
    """The baseline's routed and shared gate_up: two launches."""
    ws, sh, i32, i64, u64 = L.ws, L.shared, np.int32, np.int64, np.uint64
    fn = _old(f"moe_gemv_gate_up_f32a_{GU_TYPE}")
    fn(((F + 7) // 8, K_TOP, 1), (256, 1, 1),
       (L.x, i64(D), i32(1), i32(K_TOP), i32(E), ws["wg"], u64(ws["wu"].data.ptr), i64(F * RB_GU), i64(RB_GU),
        i32(F), i32(D), L.h, L.slot_e, u64(0), i32(0)), shared_mem=D * 4, stream=s)
    fn(((FS + 7) // 8, 1, 1), (256, 1, 1),
       (L.x, i64(D), i32(1), i32(1), i32(1), sh.gate, u64(sh.up.data.ptr), i64(0), i64(RB_GU), i32(FS), i32(D),
        sh.h, u64(0), u64(0), i32(0)), shared_mem=D * 4, stream=s)


def old_down(L, s):
    """The baseline's routed down (written) and shared down (added): two launches."""
    sh, i32, i64, u64 = L.shared, np.int32, np.int64, np.uint64
    fn = _old(f"moe_gemv_down_{DN_TYPE}")
    smem = K_TOP * F * 4
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    fn(((D + 7) // 8, 1, 1), (256, 1, 1),
       (L.h, i32(1), i32(K_TOP), L.wts, L.ws["wd"], i64(D * RB_DN), i64(RB_DN), i32(D), i32(F), L.slot_e,
        L.out["old"], i32(0), u64(0)), shared_mem=smem, stream=s)
    fn(((D + 7) // 8, 1, 1), (256, 1, 1),
       (sh.h, i32(1), i32(1), sh.scale, sh.down, i64(0), i64(RB_SDN), i32(D), i32(FS), u64(0), L.out["old"], i32(1),
        u64(0)), shared_mem=FS * 4, stream=s)


def rel_rms(got, ref) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def main(args) -> None:
    import cupy as cp
    print(f"device: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}")
    rng = np.random.default_rng(0)
    sets = [weight_set(cp) for _ in range(args.sets)]
    layers = [Layer(cp, sets[i % args.sets], rng) for i in range(args.layers)]
    set_mb = sum(a.nbytes for a in sets[0].values()) / 1e6
    per_layer = K_TOP * (2 * F * RB_GU + D * RB_DN) + 2 * FS * RB_GU + D * RB_SDN
    print(f"{args.layers} layers over {args.sets} weight sets of {set_mb:.0f} MB; {per_layer / 1e6:.1f} MB of experts "
          f"read per layer (HBM floor {per_layer / (PEAK_TBS * 1e12) * 1e6:.2f} us at {PEAK_TBS} TB/s)")

    def over_layers(*fns):
        def fn(s):
            for L in layers:
                for f in fns:
                    f(L, s)
        return fn

    whole = {"new": over_layers(new_gate_up, new_down), "old": over_layers(old_gate_up, old_down)}
    for fn in whole.values():
        fn(None)
    cp.cuda.Device().synchronize()
    errs = [rel_rms(cp.asnumpy(L.out["new"]).astype(np.float64), cp.asnumpy(L.out["old"]).astype(np.float64))
            for L in layers]
    worst = max(errs)
    print(f"new vs old: worst relative RMS over the layers {worst:.2e} ({'OK' if worst < 1e-4 else 'MISMATCH'})")
    us = lambda fn: time_graph(fn, reps=args.reps) * 1e3 / args.layers  # noqa: E731
    rows = [("whole layer", whole["new"], whole["old"], "2 launches", "4 launches"),
            ("gate_up (routed + shared)", over_layers(new_gate_up), over_layers(old_gate_up), "1", "2"),
            ("down (routed + shared)", over_layers(new_down), over_layers(old_down), "1", "2")]
    print(f"{'per layer, median of ' + str(args.reps) + ' replays':34s} {'new (gemv.cu)':>22s} {'old (baseline)':>22s}")
    for name, fn_new, fn_old, n_new, n_old in rows:
        t_new, t_old = us(fn_new), us(fn_old)
        print(f"{name:34s} {t_new:9.2f} us ({n_new:>10s}) {t_old:9.2f} us ({n_old:>10s})   x{t_old / t_new:.2f}")
    if worst >= 1e-4:
        raise SystemExit("new and old decode experts disagree")
