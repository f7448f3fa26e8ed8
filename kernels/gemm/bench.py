"""Time the tensor-core GEMMs at Qwen3.5-35B-A3B shapes (python -m ggfuse.kernels.gemm.bench).

Each case is captured once as a CUDA graph and replayed; the median of the replays (CUDA events)
is reported with achieved TFLOP/s and GB/s and the floors (FLOPs at 670 TFLOP/s, bytes at
3.0 TB/s). torch.mm on bf16 is timed beside it when torch is importable.

Every GEMM runs with each kernel family that applies (FAMILIES: "mma" = mma.sync, "wgmma" = the
sm_90a kernel on cc 9.0, "wgmma_generic" = the same with the old element-wise dequantisation;
`--impls mma,wgmma,wgmma_generic` selects) and prints, beside its time, the
error on a sample of 64 rows x 256 columns against a float64 host reference on the same
bf16-rounded operands: "err rms/max" = relative RMS and max-abs / max|ref|.
"""
from __future__ import annotations

import argparse

import numpy as np

from ggfuse.kernels.gemm import launch
from ggfuse.kernels.quant.types import qtype

PEAK_TFLOPS, PEAK_TBS = 670.0, 3.0
CASES = [  # (name, M, N, K, weight types)
    ("proj 4096 x [8192x2048]", 4096, 8192, 2048, ("bf16", "q4_k", "q6_k", "q8_0")),
    ("proj 4096 x [4096x2048]", 4096, 4096, 2048, ("bf16", "q4_k")),
    ("proj 4096 x [2048x2048]", 4096, 2048, 2048, ("bf16", "q4_k")),
    ("proj 4096 x [1024x2048]", 4096, 1024, 2048, ("bf16", "q4_k")),
    ("proj 4096 x [2048x4096]", 4096, 2048, 4096, ("bf16", "q4_k", "q6_k")),
    ("swiglu 4096 x 2x[512x2048]", 4096, 512, 2048, ("bf16", "q4_k")),
    ("lm_head 1 x [248320x2048]", 1, 248320, 2048, ("bf16", "q6_k")),
    ("lm_head 8 x [248320x2048]", 8, 248320, 2048, ("q6_k",)),
]


def device_weight(w_type, N: int, K: int):
    """Random raw bytes of an [N, K] weight generated on the device, with sane f16 scales."""
    import cupy as cp
    t = qtype(w_type)
    if t.name == "bf16":
        x = (cp.random.standard_normal((N, K), dtype=cp.float32) * 0.02).view(cp.uint32)
        return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(cp.uint16)
    nb = K // t.block
    raw = cp.random.randint(0, 256, size=(N * nb, t.block_bytes), dtype=cp.uint8)
    offs = {"q6_k": (208,), "q4_k": (0, 2), "q5_k": (0, 2), "q4_1": (0, 2)}.get(t.name, (0,))
    d = cp.full((N * nb,), 1e-4, dtype=cp.float16).view(cp.uint8).reshape(-1, 2)
    for o in offs:
        raw[:, o:o + 2] = d
    return raw.reshape(N, nb * t.block_bytes)


FAMILIES = (*launch.IMPLS, "wgmma_generic")


def impls(families=FAMILIES, selected: str | None = None) -> list[str]:
    """The kernel families to time here: `selected` (a comma list, the benchmarks' --impls) or
    all of `families`: mma, wgmma (fast word-wise dequantisation) and wgmma_generic (the wgmma
    kernels built with the element-wise dequant8; timed for GGML weights only); the MoE
    benchmark adds wgmma_tiles (a block per tile instead of persistent blocks). Names not in
    `families` are skipped if another benchmark knows them."""
    out = [x.strip() for x in selected.split(",") if x.strip()] if selected else list(families)
    bad = [x for x in out if x not in ALL_FAMILIES]
    if bad:
        raise ValueError(f"--impls: unknown families {bad} (known: {', '.join(ALL_FAMILIES)})")
    return [x for x in out if x in families]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", help=f"comma-separated kernel families (known: {', '.join(ALL_FAMILIES)})")
    return ap.parse_args(argv)


ALL_FAMILIES = (*FAMILIES, "wgmma_persist", "wgmma_tiles", "small", "smallq")
GEMM_FAMILIES = (*FAMILIES, "wgmma_tiles")    # the dense GEMM benchmark: persistent (wgmma) and a block per tile


def family_kwargs(family: str) -> dict:
    """The launcher arguments of a kernel family: impl and dequant for every GEMM; persist for the
    dense ones (wgmma_tiles: a block per tile); schedule for the grouped ones ("small": the
    few-rows grouped kernels, moe/grouped_small.cu, on any device; "smallq": the same with integer
    Q4_K / Q6_K quants)."""
    return {"impl": "wgmma" if family.startswith("wgmma") else "mma" if family.startswith("small") else family,
            "dequant": "generic" if family == "wgmma_generic" else "fast",
            "persist": family != "wgmma_tiles",
            "schedule": {"wgmma_tiles": "tiles", "wgmma_persist": "persist", "small": "small",
                         "smallq": "smallq"}.get(family, "wide")}


def host_rows(w, w_type, rows, K: int) -> np.ndarray:
    """float64 [len(rows), K] of the bf16-rounded dequantised weight rows `rows` of device bytes w."""
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, round_bf16
    t = qtype(w_type)
    raw = w[cp_index(rows)].get()
    if t.name == "bf16":
        return bf16_bits_to_f32(raw).astype(np.float64)
    import gguf
    from gguf.quants import dequantize
    dense = dequantize(raw.reshape(len(rows), -1), gguf.GGMLQuantizationType(t.ggml_id)).astype(np.float32)
    return round_bf16(dense).astype(np.float64)


def cp_index(rows):
    import cupy as cp
    return cp.asarray(np.asarray(rows, dtype=np.int64))


def sample(n: int, k: int, seed: int) -> np.ndarray:
    """k sorted distinct indices of [0, n) including the last one (the tails)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(k, n), replace=False)
    idx[-1] = n - 1
    return np.unique(idx)


def err(got: np.ndarray, ref: np.ndarray) -> str:
    got = got.astype(np.float64)
    if not np.isfinite(got).all():
        return f"err: {np.count_nonzero(~np.isfinite(got))} non-finite!"
    d = got - ref
    rms = float(np.sqrt((d ** 2).mean() / max((ref ** 2).mean(), 1e-30)))
    mx = float(np.abs(d).max() / max(np.abs(ref).max(), 1e-30))
    flag = "" if rms < 1e-2 and mx < 2e-2 else "  FAIL"
    return f"err rms {rms:.1e} max {mx:.1e}{flag}"


def time_graph(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of one replay of a graph capturing fn(stream)."""
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    fn(s)
    g = s.end_capture()
    for _ in range(warmup):
        g.launch(s)
    s.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        g.launch(s)
        e1.record(s)
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return float(np.median(times))


def time_torch(fn, reps: int = 30, warmup: int = 3) -> float:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return float(np.median(times))


def row(name, ms, flops, nbytes):
    floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBS * 1e12)) * 1e3
    return (f"{name:44s} {ms:9.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s {nbytes / ms / 1e6:8.1f} GB/s"
            f"   floor {floor:7.3f} ms")


def main(argv=None) -> None:
    args = parse_args(argv)
    import cupy as cp
    try:
        import torch
    except ImportError:
        torch = None
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32
    print(f"device: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}, "
          f"GEMM kernel families: {', '.join(impls(GEMM_FAMILIES, args.impls))}")
    silu = lambda x: x / (1.0 + np.exp(-x))   # noqa: E731
    for name, M, N, K, types in CASES:
        swiglu = name.startswith("swiglu")
        a = cp.asarray(np.random.default_rng(0).standard_normal((M, K), dtype=np.float32)).view(cp.uint32)
        a = ((a + 0x7FFF + ((a >> 16) & 1)) >> 16).astype(cp.uint16)
        mi, ni = sample(M, 64, 1), sample(N, 256, 2)
        A = bf16_bits_to_f32(a[cp_index(mi)].get()).astype(np.float64)
        for wt in types:
            if swiglu:
                wg, wu = device_weight(wt, N, K), device_weight(wt, N, K)
                c = cp.empty((M, N), dtype=cp.uint16)
                flops, nbytes = 2 * M * 2 * N * K, 2 * wg.nbytes + a.nbytes + c.nbytes
                ref = silu(A @ host_rows(wg, wt, ni, K).T) * (A @ host_rows(wu, wt, ni, K).T)
            else:
                w = device_weight(wt, N, K)
                c = cp.empty((M, N), dtype=cp.float32)
                flops, nbytes = 2 * M * N * K, w.nbytes + a.nbytes + c.nbytes
                ref = A @ host_rows(w, wt, ni, K).T
            for family in impls(GEMM_FAMILIES, args.impls):
                try:
                    if family.startswith("wgmma") and (launch.device_cc() != 90 or qtype(wt).name not in launch.SM90_TYPES
                                                       or K % 64 or (family == "wgmma_generic" and wt == "bf16")):
                        continue
                    kw = family_kwargs(family)
                    kw.pop("schedule")
                    launch.prepare("bf16", wt, kw["impl"], kw["dequant"])
                    if swiglu:
                        run = lambda s: launch.gemm_swiglu(a, "bf16", K, wg, wu, wt, N, K, c, "bf16", N, M, s, **kw)  # noqa: E731
                    else:
                        run = lambda s: launch.gemm(a, "bf16", K, w, wt, N, K, c, "f32", N, M, s, **kw)  # noqa: E731
                    c.fill(0xFFFF if swiglu else np.nan)
                    ms = time_graph(run)
                    got = c[cp_index(mi)][:, cp_index(ni)].get()
                    got = bf16_bits_to_f32(got) if swiglu else got
                    print(row(f"{name} {wt} {family}", ms, flops, nbytes) + "   " + err(got, ref))
                except Exception as exc:   # one failing variant must not hide the others
                    print(f"{name} {wt} {family}: {type(exc).__name__}: {exc}")
            if wt == "bf16" and not swiglu:   # the runtime's path for bf16 dense matrices (kernels/gemm/blas.py)
                try:
                    from ggfuse.kernels.gemm import blas
                    if blas.usable("bf16", "bf16"):
                        c.fill(np.nan)
                        ms = time_graph(lambda s: blas.gemm_bf16(a, K, w, N, K, c, "f32", N, M, s))
                        got = c[cp_index(mi)][:, cp_index(ni)].get()
                        print(row(f"{name} {wt} cublas (graph)", ms, flops, nbytes) + "   " + err(got, ref))
                except Exception as exc:
                    print(f"{name} {wt} cublas: {type(exc).__name__}: {exc}")
        if torch is not None:
            n_out = 2 * N if swiglu else N
            ta = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            tw = torch.randn(n_out, K, device="cuda", dtype=torch.bfloat16)
            ms = time_torch(lambda: torch.mm(ta, tw.t()))
            print(row(f"{name} torch.mm bf16", ms, 2 * M * n_out * K, tw.numel() * 2 + ta.numel() * 2 + M * n_out * 2))
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
