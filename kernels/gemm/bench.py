"""Time the tensor-core GEMMs at Qwen3.5-35B-A3B shapes (python -m ggfuse.kernels.gemm.bench).

Each case is captured once as a CUDA graph and replayed; the median of the replays (CUDA events)
is reported with achieved TFLOP/s and GB/s and the floors (FLOPs at 670 TFLOP/s, bytes at
3.0 TB/s). torch.mm on bf16 is timed beside it when torch is importable.
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.gemm import launch
from ggfuse.kernels.quant.types import qtype

PEAK_TFLOPS, PEAK_TBS = 670.0, 3.0
CASES = [  # (name, M, N, K, weight types)
    ("proj 4096 x [8192x2048]", 4096, 8192, 2048, ("bf16", "q4_k", "q6_k", "q8_0")),
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


def main() -> None:
    import cupy as cp
    try:
        import torch
    except ImportError:
        torch = None
    print(f"device: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}")
    for name, M, N, K, types in CASES:
        swiglu = name.startswith("swiglu")
        a = cp.asarray(np.random.default_rng(0).standard_normal((M, K), dtype=np.float32)).view(cp.uint32)
        a = ((a + 0x7FFF + ((a >> 16) & 1)) >> 16).astype(cp.uint16)
        for wt in types:
            launch.prepare("bf16", wt)
            if swiglu:
                wg, wu = device_weight(wt, N, K), device_weight(wt, N, K)
                c = cp.empty((M, N), dtype=cp.uint16)
                ms = time_graph(lambda s: launch.gemm_swiglu(a, "bf16", K, wg, wu, wt, N, K, c, "bf16", N, M, s))
                flops, nbytes = 2 * M * 2 * N * K, 2 * wg.nbytes + a.nbytes + c.nbytes
            else:
                w = device_weight(wt, N, K)
                c = cp.empty((M, N), dtype=cp.float32)
                ms = time_graph(lambda s: launch.gemm(a, "bf16", K, w, wt, N, K, c, "f32", N, M, s))
                flops, nbytes = 2 * M * N * K, w.nbytes + a.nbytes + c.nbytes
            print(row(f"{name} {wt}", ms, flops, nbytes))
        if torch is not None:
            n_out = 2 * N if swiglu else N
            ta = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            tw = torch.randn(n_out, K, device="cuda", dtype=torch.bfloat16)
            ms = time_torch(lambda: torch.mm(ta, tw.t()))
            print(row(f"{name} torch.mm bf16", ms, 2 * M * n_out * K, tw.numel() * 2 + ta.numel() * 2 + M * n_out * 2))
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
