"""Time the chunked gated delta rule at Qwen3.5-35B-A3B DeltaNet shapes (Hk 16, Hv 32, K = V = 128).

    python -m ggfuse.kernels.deltanet.bench [--v-block 32,64,128]
    python -m ggfuse.kernels.deltanet.bench --decode       # the one-token step: loop vs step kernel

Each row: median over >= 20 replays of a captured graph that runs one layer's call REPS times
(CUDA events around each replay; the state is updated in place, which is what a layer does).
Inputs bf16 as strided views into one [T, 2 Hk K + Hv V] conv-output buffer, output bf16. Also
timed alone: the parallel prep kernel and the sequential recurrence. FLOPs: the tensor-core work
of the two kernels (launch.flops). Bytes: the minimum traffic (q, k, v, g, beta read once, o
written, state read and written); the workspace (Tinv, P, decays: 16.5 KiB per chunk and value
head, written by prep, read by the recurrence) comes on top. The floor is the larger of FLOPs at
670 TFLOP/s and bytes at 3.0 TB/s. Inputs are not rotated (the layer at T=512 fits in L2; the
larger ones do not).

If torch and flash-linear-attention are importable, fla.ops.gated_delta_rule.chunk_gated_delta_rule
is timed on the same shapes (q, k expanded to Hv heads, [1, T, H, D] bf16, initial_state and
output_final_state=True, use_qk_l2norm_in_kernel=False), captured in a torch CUDA graph.

--decode: the decode step's delta rule (T = 1, launch.gated_delta_rule_recurrent) with each kernel
family, gdr_recurrent_* ("loop", one 32-thread block per 32 value columns walking the K rows) and
gdr_step_* ("step", the state through registers). One graph launches it once per DeltaNet layer
(DECODE_LAYERS = 30, each layer its own 2 MB state: 60 MB, more than the L2 holds, so the states
come from HBM as in a decode step whose weights sweep the L2 between layers); us per launch is
the median replay / 30. Dtypes: f32 q, k, v and f32 out first (what the decode plan binds: q, k are
l2_norm outputs, the delta rule's output feeds the gated norm; runtime/cuda/ops.py _chunk_gdr),
then bf16 in with f32 / bf16 out. Bytes: the state read and written (2 MB each per layer) plus
q, k, v, o; the floor is that at 3.0 TB/s. Each row first runs both kernels once from one state
and prints their largest differences (output, state; relative to the largest value).
"""
from __future__ import annotations

import sys

import numpy as np

from ggfuse.kernels.benchutil import median_ms

from ggfuse.kernels.deltanet import launch

HK, HV, K, V = 16, 32, 128, 128
LENGTHS = [512, 4096, 16384]
PEAK_FLOPS, PEAK_BYTES = 670e12, 3.0e12
REPS, REPLAYS, WARMUP = 5, 20, 3


def min_bytes(T: int) -> float:
    return 2.0 * (2 * T * HK * K + T * HV * V) + 4.0 * 2 * T * HV + 4.0 * 2 * HV * K * V + 2.0 * T * HV * V


def workspace_traffic(T: int) -> float:
    return 2.0 * launch.workspace_bytes(T, HV, K, V, Hk=HK)


def _median_ms(run, stream, n_inner: int) -> float:
    return median_ms(run, stream, n_inner, warmup=WARMUP, replays=REPLAYS)


def time_ours(T: int, v_block: int) -> dict:
    """ms per layer call (both kernels), and each kernel alone."""
    import cupy as cp
    rng = np.random.default_rng(0)
    width = 2 * HK * K + HV * V
    x = rng.standard_normal((T, width), dtype=np.float32) * 0.09   # ~ unit rows of 128
    buf = cp.asarray(((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16))
    g = cp.asarray(-np.log1p(np.exp(rng.standard_normal((T, HV)))).astype(np.float32))
    beta = cp.asarray((1 / (1 + np.exp(-rng.standard_normal((T, HV))))).astype(np.float32))
    state = cp.zeros((HV, K, V), cp.float32)
    out = cp.empty((T, HV, V), cp.uint16)
    ws = cp.zeros(launch.workspace_bytes(T, HV, K, V, Hk=HK), cp.uint8)
    launch.prepare(K, V, v_block)
    plan = launch.plan(buf, buf, buf, width, 0, HK * K, width, 2 * HK * K, g, beta, state, out, "bf16",
                       T, HK, HV, K, V, K ** -0.5, "tile", ws, v_block=v_block)
    s = cp.cuda.Stream(non_blocking=True)
    res = {}
    for name, parts in (("total", (plan.prep, plan.recur)), ("prep", (plan.prep,)), ("recur", (plan.recur,))):
        s.begin_capture()
        for _ in range(REPS):
            for p in parts:
                p(s)
        graph = s.end_capture()
        res[name] = _median_ms(lambda: graph.launch(s), s, REPS)
    return res


def time_fla(T: int) -> float | None:
    """ms per call of flash-linear-attention's chunk_gated_delta_rule, or None if unavailable."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:
        return None
    try:
        dev = torch.device("cuda")
        bf = torch.bfloat16
        unit = lambda x: x / x.norm(dim=-1, keepdim=True)
        q = unit(torch.randn(1, T, HK, K, device=dev)).to(bf).repeat_interleave(HV // HK, dim=2)
        k = unit(torch.randn(1, T, HK, K, device=dev)).to(bf).repeat_interleave(HV // HK, dim=2)
        v = torch.randn(1, T, HV, V, device=dev, dtype=bf)
        g = -torch.nn.functional.softplus(torch.randn(1, T, HV, device=dev, dtype=torch.float32))
        beta = torch.sigmoid(torch.randn(1, T, HV, device=dev, dtype=torch.float32)).to(bf)
        h0 = torch.zeros(1, HV, K, V, device=dev, dtype=torch.float32)

        def call():
            try:
                return fla_chunk(q, k, v, g=g, beta=beta, scale=K ** -0.5, initial_state=h0,
                                 output_final_state=True, use_qk_l2norm_in_kernel=False)
            except TypeError:   # older API
                return fla_chunk(q, k, v, g=g, beta=beta, scale=K ** -0.5, initial_state=h0,
                                 output_final_state=True, head_first=False)

        for _ in range(WARMUP):   # triton autotuning happens here, outside the capture
            call()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            call()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPS):
                call()
        for _ in range(WARMUP):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(REPLAYS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / REPS)
        return float(np.median(times))
    except Exception as e:
        print(f"  (fla chunk_gated_delta_rule at T={T} unavailable: {type(e).__name__}: {str(e)[:160]})")
        return None


DECODE_LAYERS = 30
DECODE_DTYPES = (("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16"))


def decode_bytes(in_dt: str, out_dt: str) -> float:
    isz, osz = (4 if in_dt == "f32" else 2), (4 if out_dt == "f32" else 2)
    return 2 * 4.0 * HV * K * V + isz * (2 * HK * K + HV * V) + osz * HV * V + 4.0 * 2 * HV


def _decode_operands(in_dt: str, rng):
    """One token's q, k (as l2_norm writes them: [1, Hk, K] each) and v (a view of the conv
    output row [1, 2 Hk K + Hv V]), g, beta [1, Hv] on the device."""
    import cupy as cp
    width = 2 * HK * K + HV * V
    x = rng.standard_normal((1, width)).astype(np.float32) * 0.09   # ~ unit rows of 128
    dev = cp.asarray(((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16) if in_dt == "bf16" else x)
    q = dev[:, :HK * K].reshape(1, HK, K).copy()
    k = dev[:, HK * K:2 * HK * K].reshape(1, HK, K).copy()
    v = dev[:, 2 * HK * K:].reshape(1, HV, V)
    g = cp.asarray(-np.log1p(np.exp(rng.standard_normal((1, HV)))).astype(np.float32))
    beta = cp.asarray((1 / (1 + np.exp(-rng.standard_normal((1, HV))))).astype(np.float32))
    return q, k, v, g, beta


def time_decode(in_dt: str, out_dt: str) -> dict:
    """us per launch of each kernel family (a graph of DECODE_LAYERS launches on their own
    states), and the step kernel's largest differences from the loop kernel's output and state."""
    import cupy as cp

    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32
    rng = np.random.default_rng(0)
    q, k, v, g, beta = _decode_operands(in_dt, rng)
    s0 = cp.asarray(rng.standard_normal((DECODE_LAYERS, HV, K, V)).astype(np.float32) * 0.05)
    odt = cp.uint16 if out_dt == "bf16" else cp.float32
    outs = cp.zeros((DECODE_LAYERS, 1, HV, V), odt)
    scale = K ** -0.5
    res, got = {}, {}
    for kern in ("loop", "step"):   # one eager call each: loads the module, and the check
        st, o = s0[0].copy(), cp.zeros((1, HV, V), odt)
        launch.gated_delta_rule_recurrent(q, k, v, g, beta, st, o, scale, "tile", kernel=kern)
        got[kern] = (bf16_bits_to_f32(cp.asnumpy(o)) if out_dt == "bf16" else cp.asnumpy(o)), cp.asnumpy(st)
    rel = lambda a, b: float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))
    res["err_o"] = rel(got["step"][0], got["loop"][0])
    res["err_s"] = rel(got["step"][1], got["loop"][1])
    s = cp.cuda.Stream(non_blocking=True)
    for kern in ("loop", "step"):
        states = s0.copy()
        cp.cuda.Device().synchronize()
        s.begin_capture()
        for layer in range(DECODE_LAYERS):
            launch.gated_delta_rule_recurrent(q, k, v, g, beta, states[layer], outs[layer], scale, "tile", s,
                                              kernel=kern)
        graph = s.end_capture()
        res[kern] = _median_ms(lambda: graph.launch(s), s, DECODE_LAYERS) * 1e3
    return res


def main_decode() -> None:
    import cupy as cp
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"gated_delta_rule_recurrent, one token, on {dev['name'].decode()}: Hk={HK} Hv={HV} K={K} V={V}, "
          f"head_map tile, a graph of {DECODE_LAYERS} launches (one state each)")
    print(f"{'in':>4} {'out':>4} {'MB':>5} {'floor us':>8} | {'loop us':>8} {'GB/s':>6} | {'step us':>8} {'GB/s':>6} | "
          f"{'loop/step':>9} | {'max d(o)':>8} {'max d(S)':>8}")
    bad = []
    for in_dt, out_dt in DECODE_DTYPES:
        by = decode_bytes(in_dt, out_dt)
        r = time_decode(in_dt, out_dt)
        # f32 sums reassociated: ~1e-6; a bf16 output may round to the neighbouring value
        ok = r["err_s"] <= 1e-4 and r["err_o"] <= (1e-2 if out_dt == "bf16" else 1e-4)
        print(f"{in_dt:>4} {out_dt:>4} {by / 1e6:5.2f} {by / PEAK_BYTES * 1e6:8.2f} | {r['loop']:8.2f} "
              f"{by / r['loop'] / 1e3:6.0f} | {r['step']:8.2f} {by / r['step'] / 1e3:6.0f} | "
              f"{r['loop'] / r['step']:9.2f} | {r['err_o']:8.1e} {r['err_s']:8.1e}{'' if ok else '  MISMATCH'}")
        if not ok:
            bad.append(f"{in_dt}->{out_dt}")
    if bad:
        raise SystemExit(f"the step kernel's output or state differs from the loop kernel's: {', '.join(bad)}")


def main(argv=None) -> None:
    import cupy as cp
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--decode":
        main_decode()
        return
    blocks = [64]
    if argv and argv[0] == "--v-block":
        blocks = [int(b) for b in argv[1].split(",")]
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"chunk_gated_delta_rule on {dev['name'].decode()}: Hk={HK} Hv={HV} K={K} V={V}, chunk 64, "
          f"bf16 in/out, graph replay")
    print(f"{'T':>6} {'vb':>4} {'GFLOP':>6} {'MB':>6} {'floor us':>8} | {'total ms':>8} {'TFLOP/s':>7} "
          f"{'GB/s':>6} | {'prep ms':>7} {'recur ms':>8} | {'fla ms':>7} {'fla/ours':>8}")
    for T in LENGTHS:
        fl, by = launch.flops(T, HK, HV, K, V), min_bytes(T)
        floor = max(fl / PEAK_FLOPS, by / PEAK_BYTES) * 1e6
        ms_f = time_fla(T)
        for vb in blocks:
            r = time_ours(T, vb)
            ms = r["total"]
            fla = f"{ms_f:7.3f} {ms_f / ms:8.2f}" if ms_f else f"{'n/a':>7} {'':>8}"
            print(f"{T:6d} {vb:4d} {fl / 1e9:6.1f} {by / 1e6:6.1f} {floor:8.1f} | {ms:8.3f} {fl / ms / 1e9:7.1f} "
                  f"{(by + workspace_traffic(T)) / ms / 1e6:6.0f} | {r['prep']:7.3f} {r['recur']:8.3f} | {fla}")


if __name__ == "__main__":
    main()
