"""Time the memory-bound dense kernels at Qwen3.5-35B-A3B shapes on the current GPU, and the
MoE router GEMM (gemm_f32 vs router_gemm).

    python -m ggfuse.kernels.dense.bench

Each kernel is captured into CUDA graphs (one per rotated input copy, so a 32 MB activation is
not served from the 50 MB L2 by the previous replay), warmed up, then timed with CUDA events
over >= 30 replays; the table shows the median, the achieved GB/s and the floor at 3.0 TB/s.
"""
from __future__ import annotations

import numpy as np

HBM_GBS = 3000.0


def _time_graphs(cp, runs, n_iter=30):
    """Median microseconds of one replay, rotating over one graph per entry of `runs`."""
    s = cp.cuda.Stream(non_blocking=True)
    graphs = []
    for run in runs:
        run(s)  # load modules and warm up outside capture
        s.synchronize()
        s.begin_capture()
        run(s)
        graphs.append(s.end_capture())
    for g in graphs * 3:
        g.launch(s)
    s.synchronize()
    times = []
    for i in range(max(n_iter, 20)):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        graphs[i % len(graphs)].launch(s)
        e1.record(s)
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
    return float(np.median(times))


def _row(name, us, nbytes):
    gbs = nbytes / (us * 1e-6) / 1e9
    floor = nbytes / (HBM_GBS * 1e9) * 1e6
    print(f"{name:<44} {us:9.2f} us {gbs:9.1f} GB/s  floor {floor:8.2f} us  ({gbs / HBM_GBS * 100:5.1f}% of 3.0 TB/s)")


T, D, N_COPIES = 4096, 2048, 3


def bench_norms(cp, launch, rng):
    """rms_norm / add_rms_norm [4096, 2048]."""
    n_copies = N_COPIES
    xs = [cp.asarray(rng.standard_normal((T, D), dtype=np.float32)) for _ in range(n_copies)]
    bs = [cp.asarray(rng.standard_normal((T, D), dtype=np.float32)) for _ in range(n_copies)]
    w = cp.asarray(rng.standard_normal(D, dtype=np.float32))
    out32 = cp.empty((T, D), cp.float32)
    out16 = cp.empty((T, D), cp.uint16)
    sums = cp.empty((T, D), cp.float32)
    act = T * D * 4
    us = _time_graphs(cp, [lambda s, x=x: launch.rms_norm(x, w, out32, eps=1e-6, stream=s) for x in xs])
    _row("rms_norm [4096,2048] f32->f32", us, 2 * act)
    us = _time_graphs(cp, [lambda s, x=x: launch.rms_norm(x, w, out16, eps=1e-6, stream=s) for x in xs])
    _row("rms_norm [4096,2048] f32->bf16", us, act + act // 2)
    us = _time_graphs(cp, [lambda s, a=a, b=b: launch.add_rms_norm(a, b, w, out32, sums, eps=1e-6, stream=s)
                           for a, b in zip(xs, bs)])
    _row("add_rms_norm [4096,2048] ->f32 norm + sum", us, 4 * act)
    us = _time_graphs(cp, [lambda s, a=a, b=b: launch.add_rms_norm(a, b, w, out16, sums, eps=1e-6, stream=s)
                           for a, b in zip(xs, bs)])
    _row("add_rms_norm [4096,2048] ->bf16 norm + sum", us, 3 * act + act // 2)


def bench_dequant(cp, launch, rng, q4k):
    """dequantize one Q4_K expert matrix [512, 2048]."""
    n_rows, row_len = 512, 2048
    rb = q4k.row_bytes(row_len)
    raws = [cp.asarray(rng.integers(0, 256, size=n_rows * rb, dtype=np.uint8)) for _ in range(8)]
    for r in raws:  # finite f16 scales (d, dmin = 2^-10)
        r.reshape(-1, 144)[:, 0:4] = cp.asarray(np.array([0x1400, 0x1400], np.uint16).view(np.uint8))
    o32 = cp.empty((n_rows, row_len), cp.float32)
    o16 = cp.empty((n_rows, row_len), cp.uint16)
    qbytes = n_rows * rb
    us = _time_graphs(cp, [lambda s, r=r: launch.dequantize(r, q4k, n_rows, row_len, o32, stream=s) for r in raws])
    _row("dequantize Q4_K [512,2048] -> f32", us, qbytes + n_rows * row_len * 4)
    us = _time_graphs(cp, [lambda s, r=r: launch.dequantize(r, q4k, n_rows, row_len, o16, stream=s) for r in raws])
    _row("dequantize Q4_K [512,2048] -> bf16", us, qbytes + n_rows * row_len * 2)


def bench_get_rows(cp, launch, rng, q4k):
    """get_rows: 4096 tokens from the [248320, 2048] Q4_K embedding table."""
    V, row_len = 248320, D
    rb = q4k.row_bytes(row_len)
    table = cp.asarray(rng.integers(0, 256, size=V * rb, dtype=np.uint8))
    table.reshape(-1, 144)[:, 0:4] = cp.asarray(np.array([0x1400, 0x1400], np.uint16).view(np.uint8))
    ids = [cp.asarray(rng.integers(0, V, size=T).astype(np.int32)) for _ in range(N_COPIES)]
    emb = cp.empty((T, row_len), cp.float32)
    us = _time_graphs(cp, [lambda s, i=i: launch.get_rows(table, q4k, row_len, i, emb, stream=s) for i in ids])
    _row("get_rows Q4_K 4096 of [248320,2048] -> f32", us, T * rb + T * row_len * 4)


def bench_router(cp, launch, rng):
    """MoE router logits [T, 256] = x [T, 2048] @ W^T in f32 (gemm_f32, CUDA cores) vs the split
    f16 / bf16 tensor-core router_gemm (both tiles), with the max-abs error vs float64 (logits ~N(0, 3))."""
    E, K = 256, 2048
    w = (rng.standard_normal((E, K)) * (3.0 / np.sqrt(K))).astype(np.float32)
    wd = cp.asarray(w)
    for T in (2048, 8192):
        n_copies = max(1, (64 << 20) // (T * K * 4))  # rotate inputs past the 50 MB L2
        xs = [rng.standard_normal((T, K)).astype(np.float32) for _ in range(n_copies)]
        xds = [cp.asarray(x) for x in xs]
        ref = xs[0].astype(np.float64) @ w.astype(np.float64).T
        c = cp.empty((T, E), cp.float32)
        flops = 2.0 * T * E * K
        auto = launch.router_tile(T, E)
        variants = [("gemm_f32 (CUDA cores)", lambda s, x: launch.gemm_f32(x, wd, c, stream=s))]
        for split in ("f16", "bf16"):
            for tile in launch.ROUTER_TILES:
                variants.append((f"router_gemm {split} {tile}{' (auto)' if tile == auto else ''}",
                                 lambda s, x, sp=split, tl=tile: launch.router_gemm(x, wd, c, split=sp, tile=tl, stream=s)))
        base = None
        for name, fn in variants:
            us = _time_graphs(cp, [lambda s, x=x: fn(s, x) for x in xds])
            c.fill(np.nan)
            fn(None, xds[0])
            err = float(np.abs(cp.asnumpy(c) - ref).max())
            base = base or us
            print(f"router T={T:<5} {name:<36} {us:9.2f} us {flops / (us * 1e-6) / 1e12:7.1f} TFLOP/s (f32 math)  "
                  f"x{base / us:5.2f} vs gemm_f32  max-abs err {err:.2e}")


# the decode step's one-row products of Qwen3.5-35B-A3B: (name, N, K, weight type)
GEMV_SHAPES = [("qkv", 8192, 2048, "q4_k"), ("qkv", 8192, 2048, "q6_k"), ("z", 4096, 2048, "q4_k"),
               ("ssm_out", 2048, 4096, "q4_k"), ("alpha", 32, 2048, "q4_k"), ("router", 256, 2048, "f32"),
               ("qkv", 8192, 2048, "bf16"), ("z", 4096, 2048, "bf16"), ("lm_head", 248320, 2048, "q6_k"),
               ("lm_head", 248320, 2048, "bf16")]


def bench_gemv(cp, launch, rng, n_launch: int = 20):
    """One-row products (kernels/dense/gemv.cu) as the decode graph runs them: n_launch launches
    back to back in one CUDA graph, each on its own copy of the weight (so the 50 MB L2 does not
    serve them), bf16 x; per launch. cuBLAS on the bf16 matrix beside (the decode_dense gemm path)."""
    from ggfuse.kernels.gemm import blas
    from ggfuse.kernels.gemm.weights import random_weight
    from ggfuse.kernels.quant.types import qtype
    for name, N, K, wt in GEMV_SHAPES:
        qt = qtype(wt)
        nbytes = N * qt.row_bytes(K)
        copies = max(2, min(n_launch, int(2e9 // nbytes)))
        raw, _ = random_weight(wt, (min(N, 4096), K), rng)
        base = cp.asarray(np.ascontiguousarray(raw)).view(cp.uint8).reshape(-1)
        reps = -(-N // min(N, 4096))
        ws = [cp.tile(base, reps)[:nbytes].copy() for _ in range(copies)]
        x = cp.asarray(rng.standard_normal((1, K), dtype=np.float32)).astype(cp.float32)
        xb = cp.asarray(np.frombuffer(x.get().astype(np.float32).tobytes(), np.uint32) >> 16).astype(cp.uint16)
        y = cp.zeros((1, N), dtype=cp.float32)

        def run(s, ws=ws):
            for i in range(n_launch):
                launch.gemv(xb.reshape(1, K), ws[i % len(ws)], wt, N, K, y, M=1, stream=s)
        us = _time_graphs(cp, [run]) / n_launch
        _row(f"gemv {name} [{N}, {K}] {wt} (wpr {launch.gemv_warps_per_row(N, K)})", us,
             nbytes + K * 2 + N * 4)
        if wt == "bf16" and blas.usable("bf16", "bf16"):
            def run_blas(s, ws=ws):
                for i in range(n_launch):
                    blas.gemm_bf16(xb.reshape(1, K), K, ws[i % len(ws)].view(cp.uint16), N, K, y, "f32", N, 1, s)
            us = _time_graphs(cp, [run_blas]) / n_launch
            _row(f"cublas {name} [{N}, {K}] bf16 M=1", us, nbytes + K * 2 + N * 4)
        del ws


def main():
    import argparse

    import cupy as cp
    from ggfuse.kernels.dense import launch
    from ggfuse.kernels.quant.types import qtype

    ap = argparse.ArgumentParser(description="memory-bound dense kernels on this GPU")
    ap.add_argument("--gemv", action="store_true", help="only the decode step's one-row products")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"device: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}")
    print(f"{'kernel':<44} {'median':>12} {'achieved':>14}")
    if args.gemv:
        bench_gemv(cp, launch, rng)
        return
    bench_norms(cp, launch, rng)
    bench_dequant(cp, launch, rng, qtype("q4_k"))
    bench_get_rows(cp, launch, rng, qtype("q4_k"))
    bench_router(cp, launch, rng)


if __name__ == "__main__":
    main()
