"""Timing shared by the kernel benchmarks: CUDA events around a run, warm-up, median."""
from __future__ import annotations

import numpy as np


def median_ms(run, stream, n_inner: int = 1, *, warmup: int = 3, replays: int = 20) -> float:
    """Median milliseconds per inner launch of `run()` (which enqueues n_inner launches on
    `stream`, typically one CUDA-graph replay), timed with CUDA events after warm-up."""
    import cupy as cp
    for _ in range(warmup):
        run()
    stream.synchronize()
    times = []
    for _ in range(replays):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        run()
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / n_inner)
    return float(np.median(times))
