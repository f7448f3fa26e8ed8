"""Time flash_attn_prefill at Qwen3.5-35B-A3B attention shapes (Hq 16, Hkv 2, head dim 256).

    python -m ggfuse.kernels.attention.bench            # prefill chunks
    python -m ggfuse.kernels.attention.bench --decode   # the one-token step: flash against key-split

--decode: the step at 512 .. 32768 positions of context, the prefill kernel with T = 1 (what the
step runs with --decode-attention flash) against decode_attn (split, the plan's number of key
ranges for that context), same replay method; bytes are the K/V rows read, against 3.0 TB/s.

Each row: median over >= 20 replays of a captured graph that launches the kernel REPS times
(CUDA events around each replay). FLOPs count the causal pairs only: 4 * Hq * D * pairs, pairs =
T * P + T * (T + 1) / 2. Bytes: q + the K/V rows read once + out. The floor is the larger of FLOPs
at 670 TFLOP/s and bytes at 3.0 TB/s. Inputs are not rotated: K/V of one layer are <= 16 MB and
stay in L2 either way, and the kernel is compute-bound. If torch is importable, its
scaled_dot_product_attention (flash backend, bf16, K/V expanded to Hq heads beforehand, lower-right
causal mask when P > 0) is timed on the same shapes.
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.benchutil import median_ms

from ggfuse.kernels.attention import launch

HQ, HKV, D = 16, 2, 256
SHAPES = [(512, 0), (2048, 0), (4096, 0), (4096, 4096), (2048, 6144)]   # (T, P)
PEAK_FLOPS, PEAK_BYTES = 670e12, 3.0e12
REPS, REPLAYS, WARMUP = 5, 20, 3


def causal_flops(T: int, P: int) -> float:
    pairs = T * P + T * (T + 1) // 2
    return 4.0 * HQ * D * pairs


def _median_ms(run, stream, n_inner: int) -> float:
    return median_ms(run, stream, n_inner, warmup=WARMUP, replays=REPLAYS)


def time_ours(T: int, P: int, kind: str) -> float:
    """ms per launch; kind 'bf16' (q and out bf16) or 'f32' (q and out f32)."""
    import cupy as cp
    rng = np.random.default_rng(0)
    max_ctx = P + T
    k = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(max_ctx, HKV, D), dtype=np.uint16))  # bf16 in ~[0.0078, 1)
    v = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(max_ctx, HKV, D), dtype=np.uint16))
    if kind == "bf16":
        q = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(T, HQ, D), dtype=np.uint16))
        out = cp.empty((T, HQ, D), dtype=cp.uint16)
    else:
        q = cp.asarray(rng.standard_normal((T, HQ, D), dtype=np.float32))
        out = cp.empty((T, HQ, D), dtype=cp.float32)
    past = cp.asarray(np.array([P], np.int32))
    n_valid = cp.asarray(np.array([T], np.int32))
    launch.prepare(D, kind, out.dtype)
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    for _ in range(REPS):
        launch.flash_attn_prefill(q, kind, HQ * D, D, k, v, out, T, HQ, HKV, D, D, 1.0 / np.sqrt(D),
                                  past, n_valid, stream=s)
    graph = s.end_capture()
    return _median_ms(lambda: graph.launch(s), s, REPS)


def time_torch(T: int, P: int) -> float | None:
    """ms per call of torch SDPA (flash backend), or None when torch/flash is unavailable."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return None
    try:
        dev = torch.device("cuda")
        q = torch.randn(1, HQ, T, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, P + T, D, device=dev, dtype=torch.bfloat16).repeat_interleave(HQ // HKV, dim=1)
        v = torch.randn(1, HKV, P + T, D, device=dev, dtype=torch.bfloat16).repeat_interleave(HQ // HKV, dim=1)
        if P == 0:
            def call():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(T, P + T)

            def call():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for _ in range(WARMUP):
                call()
            torch.cuda.synchronize()
            times = []
            for _ in range(REPLAYS):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(REPS):
                    call()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / REPS)
        return float(np.median(times))
    except Exception as e:  # flash backend refused the shape / mask on this torch build
        print(f"  (torch SDPA flash at T={T} P={P} unavailable: {type(e).__name__}: {str(e)[:120]})")
        return None


DECODE_CONTEXTS = (512, 2048, 4096, 8192, 32768)


def time_decode(P: int, impl: str) -> float:
    """ms per one-token step at P positions before it (bf16 q and out)."""
    import cupy as cp
    rng = np.random.default_rng(1)
    max_ctx = P + 1
    k = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(max_ctx, HKV, D), dtype=np.uint16))
    v = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(max_ctx, HKV, D), dtype=np.uint16))
    q = cp.asarray(rng.integers(0x3C00, 0x3F80, size=(1, HQ, D), dtype=np.uint16))
    out = cp.empty((1, HQ, D), dtype=cp.uint16)
    past = cp.asarray(np.array([P], np.int32))
    n_valid = cp.asarray(np.array([1], np.int32))
    splits = launch.decode_splits(HKV, max_ctx)
    ws = cp.empty(launch.decode_workspace_bytes(HQ, D, splits), dtype=cp.uint8)

    def one(stream):
        if impl == "split":
            launch.decode_attn(q, "bf16", D, k, v, out, HQ, HKV, D, 1.0 / np.sqrt(D), splits, ws, past, n_valid,
                               stream=stream)
        else:
            launch.flash_attn_prefill(q, "bf16", HQ * D, D, k, v, out, 1, HQ, HKV, D, D, 1.0 / np.sqrt(D),
                                      past, n_valid, stream=stream)
    launch.prepare(D, "bf16", out.dtype)
    s = cp.cuda.Stream(non_blocking=True)
    one(s)                      # module loading outside the capture
    s.synchronize()
    s.begin_capture()
    for _ in range(REPS):
        one(s)
    graph = s.end_capture()
    return _median_ms(lambda: graph.launch(s), s, REPS)


def main_decode() -> None:
    import cupy as cp
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"one-token attention step on {dev['name'].decode()}: Hq={HQ} Hkv={HKV} D={D}, bf16 KV cache")
    print(f"{'context':>8} {'KV MB':>7} {'floor us':>9} | {'flash us':>9} {'GB/s':>6} | {'split us':>9} {'GB/s':>6} "
          f"{'ranges':>6} | {'flash/split':>11}")
    for P in DECODE_CONTEXTS:
        kv = 2 * (P + 1) * HKV * D * 2
        floor = kv / PEAK_BYTES * 1e6
        fl, sp = time_decode(P, "flash") * 1e3, time_decode(P, "split") * 1e3
        print(f"{P:8d} {kv / 1e6:7.1f} {floor:9.2f} | {fl:9.2f} {kv / fl / 1e3:6.0f} | {sp:9.2f} {kv / sp / 1e3:6.0f} "
              f"{launch.decode_splits(HKV, P + 1):6d} | {fl / sp:11.2f}")


def main() -> None:
    import sys
    if "--decode" in sys.argv[1:]:
        return main_decode()
    import cupy as cp
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"flash_attn_prefill on {dev['name'].decode()}: Hq={HQ} Hkv={HKV} D={D}, causal over the KV cache")
    print(f"{'T':>5} {'P':>5} {'GFLOP':>7} {'floor us':>9} | {'bf16 ms':>8} {'TFLOP/s':>8} {'GB/s':>6} "
          f"| {'f32 ms':>8} {'TFLOP/s':>8} | {'torch ms':>8} {'TFLOP/s':>8}")
    for T, P in SHAPES:
        flops = causal_flops(T, P)
        kv_bytes = 2 * (P + T) * HKV * D * 2
        bytes_bf16 = kv_bytes + 2 * T * HQ * D * 2
        floor = max(flops / PEAK_FLOPS, bytes_bf16 / PEAK_BYTES) * 1e6
        ms_b = time_ours(T, P, "bf16")
        ms_f = time_ours(T, P, "f32")
        ms_t = time_torch(T, P)
        tt = f"{ms_t:8.3f} {flops / ms_t / 1e9:8.1f}" if ms_t else f"{'n/a':>8} {'':>8}"
        print(f"{T:5d} {P:5d} {flops / 1e9:7.1f} {floor:9.1f} | {ms_b:8.3f} {flops / ms_b / 1e9:8.1f} "
              f"{bytes_bf16 / ms_b / 1e6:6.0f} | {ms_f:8.3f} {flops / ms_f / 1e9:8.1f} | {tt}")


if __name__ == "__main__":
    main()
