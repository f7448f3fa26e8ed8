"""`ggfuse bench`: prefill throughput and time-to-first-token per prompt length, peak device
memory and a per-phase breakdown, optionally side by side with llama.cpp's llama-bench.

Timing: the model is compiled and loaded once (under --vram-budget: once per prompt length, with
the KV cache sized for that prompt, as llama-bench sizes its context per test); for each prompt length, one warm-up prefill (it
captures the chunk's CUDA graph), then R timed prefills (CUDA events around the whole prefill,
host work included, so the figure is what a user waits for); the median is reported. The phase
breakdown comes from one instrumented eager prefill with an event after every kernel launch,
each launch charged to its op's phase; phases are shown as fractions of that eager run.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from ggfuse.errors import GGFuseError

PHASES = {
    "get_rows": "embedding",
    "attention": "full attention", "norm_rope": "full attention", "sigmoid_mul": "full attention",
    "chunk_gated_delta_rule": "deltanet", "gated_delta_rule": "deltanet", "ssm_conv_silu": "deltanet",
    "deltanet_gates": "deltanet", "l2_norm": "deltanet", "gated_rms_norm": "deltanet",
    "moe_route": "moe routing", "moe_grouped_gemm": "moe gemm", "ffn_swiglu": "dense matmuls",
    "matmul": "dense matmuls", "fetch_weights": "transfers", "lm_head": "lm head",
}


def phase_of(node) -> str:
    return PHASES.get(node.op.value, "norms and elementwise")


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def bench_model(path: str, prompts, *, chunk: int, repeat: int, vram_budget=None, device: str = "auto",
                max_context: int | None = None, seed: int = 0, log=print, with_ceilings: bool = True,
                options=None, tg: int = 0, tg_depth: int = 0) -> dict:
    """options: ggfuse.options.Options for everything else (target, precision, kernel variants,
    runtime switches); chunk / vram_budget / device / max_context given here override it.
    tg > 0: also a decode row (tg one-token steps from an empty context, as llama-bench's tgN;
    after a prompt of tg_depth tokens where tg_depth > 0, as llama-bench's tgN @ dD)."""
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.options import Options
    from ggfuse.runtime.api import Model, cuda_available

    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    # the decode row's context: its depth prompt (its last chunk padded, at most a chunk more)
    # and its steps
    ctx = max([max_context or 0, (tg_depth + chunk if tg_depth else 0) + tg + 8 if tg else 0] + list(prompts))
    opts = Options.make(options, chunk=chunk, vram_budget=vram_budget, max_context=ctx, device=device)
    if device == "cpu" and opts.target == "auto":
        opts = opts.replace(target="cpu")
    # the ceilings first: their cuBLAS / cuRAND modules and buffers are the benchmark's, and
    # must not count in the model's measured device memory (used since its load)
    ceilings = measure_ceilings(log) if device == "cuda" and with_ceilings else None
    t0 = time.perf_counter()
    gf = GGUFFile(path)
    plan = compile_gguf(path, options=opts, gf=gf)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    if device == "cuda":
        from ggfuse.runtime.cuda.backend import CUDABackend
        backend = CUDABackend(plan, gf, chunk=chunk, options=opts)
    else:
        from ggfuse.runtime.cpu import CPUBackend
        backend = CPUBackend(plan, gf)
    model = Model(plan, gf, backend, chunk)
    t_load = time.perf_counter() - t0
    log(f"compiled in {t_compile:.1f} s, loaded in {t_load:.1f} s on {device}")
    rng = np.random.default_rng(seed)
    rows = []
    for n in prompts:
        tokens = rng.integers(0, model.n_vocab, size=n)
        times = []
        for r in range(repeat + 1):
            model.reset()
            if device == "cuda":
                import cupy as cp
                s = backend.stream
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record(s)
                model.prefill(tokens, logits="last")
                stop.record(s)
                stop.synchronize()
                ms = cp.cuda.get_elapsed_time(start, stop)
            else:
                t = time.perf_counter()
                model.prefill(tokens, logits="last")
                ms = (time.perf_counter() - t) * 1e3
            if r > 0:  # the first run is the warm-up (graph capture)
                times.append(ms)
        ms = _median(times)
        row = {"prompt": n, "ms": ms, "tok_per_s": n / ms * 1e3, "ttft_ms": ms, "runs": times, "max_context": ctx}
        if device == "cuda":
            row.update(host_time(model, backend, tokens, ms))
        if ceilings:
            fl = prompt_floor(plan, n, chunk, ceilings)
            row.update(floor_ms=fl["floor_ms"], of_floor=fl["floor_ms"] / ms, tflops=fl["flops"] / ms / 1e9)
        if device == "cuda":
            ops: list = []
            try:
                row["phases"] = replay_profile(model, backend, tokens, ops, ceilings)
                row["profile"] = "replayed: each launch its own CUDA graph, events between"
            except Exception as e:  # noqa: BLE001 -- a launch that cannot be captured alone: the eager profile
                ops.clear()
                row["phases"] = phase_breakdown(model, backend, tokens, ops)
                row["profile"] = f"eager (the replayed profile failed: {type(e).__name__}: {e})"
            row["ops"] = ops
            log(f"  op profile ({row['profile'].split(':')[0]}), slowest first:")
            log_ops(ops[:12], log)
            import cupy as cp
            row["peak_device_bytes"] = int(cp.get_default_memory_pool().total_bytes())
            if getattr(backend, "streamer", None) is not None:   # --vram-budget: streamed experts
                from ggfuse.runtime.cuda.streaming import format_telemetry, telemetry
                row["streaming"] = telemetry(model, backend, tokens, replay_ms=ms,
                                             h2d_ceiling_gbs=(ceilings or {}).get("h2d_pinned_gbs"))
                for line in format_telemetry(row["streaming"]):
                    log(line)
        rows.append(row)
        host = (f"   host {row['host_ms_per_chunk']:.2f} ms/chunk ({100 * row['host_fraction']:.1f}% of the chunk)"
                if "host_fraction" in row else "")
        log(f"pp{n:<6} {row['tok_per_s']:10.1f} tok/s   TTFT {ms:9.2f} ms{host}")
    decode = decode_row(model, backend, tg, rng, repeat, log, depth=tg_depth) if tg else None
    if decode is not None and device == "cuda" and getattr(backend, "streamer", None) is None:
        ops = []
        try:
            decode["phases"] = replay_profile(model, backend, rng.integers(0, model.n_vocab, size=1), ops, ceilings)
            decode["ops"] = ops
            log("  decode step op profile (replayed, one token from an empty context), slowest first:")
            log_ops(ops[:16], log, us=True)
        except Exception as e:  # noqa: BLE001 -- the profile is extra information, the row stands without it
            decode["profile_error"] = f"{type(e).__name__}: {e}"
    if device == "cuda":
        backend.close()   # give the device back before anything else runs in this process
    from ggfuse.compiler.buildinfo import build_info
    return {"model": os.path.abspath(path), "model_identity": plan.source, "arch": plan.arch, "device": device,
            "chunk": chunk, "vram_budget": vram_budget, "repeat": repeat, "compile_s": t_compile, "load_s": t_load,
            "options": {**plan.options, **opts.to_json("runtime")}, "ggfuse": build_info(),
            "results": rows, "decode": decode, "prefetch": plan.stats.get("prefetch"), "ceilings": ceilings,
            "device_name": _device_name() if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}


def tg_label(n: int, depth: int = 0) -> str:
    """'tg128', or 'tg128@d4096' for a decode row at depth (llama-bench's 'tg128 @ d4096')."""
    return f"tg{n}" + (f"@d{depth}" if depth else "")


def decode_row(model, backend, n: int, rng, repeat: int, log=print, depth: int = 0) -> dict:
    """Decode speed as llama-bench's tgN measures it: n one-token steps from an empty context
    (each the captured one-token graph, its last-row logits copied to the host as sampling
    needs them), a warm-up run, then `repeat` timed runs (host clock around the whole run:
    every step waits for its logits); the median. Host time per token (staging the token and
    launching the step's graph) against the step's wall time. depth > 0: each run first
    prefills a prompt of `depth` random tokens (not timed), as llama-bench's -d: decode with
    that much context before it, the attention over the KV cache included."""
    tokens = rng.integers(0, model.n_vocab, size=n)
    before = rng.integers(0, model.n_vocab, size=depth) if depth else None

    from ggfuse.runtime.generate import decode_cache_report, expert_cache_text

    def run():
        model.reset()
        if before is not None:
            model.prefill(before, logits="last")   # returns once its logits are on the host
        decode_cache_report(backend, reset=True)
        hs = getattr(backend, "host_stats", None)
        if hs is not None:
            hs.update(chunks=0, host_s=0.0)
        t = time.perf_counter()
        for tok in tokens:
            backend.run_chunk(np.array([tok]), "last")
        return (time.perf_counter() - t) * 1e3, (hs or {}).get("host_s")
    run()
    times, host = [], []
    for _ in range(max(repeat, 1)):
        ms, h = run()
        times.append(ms)
        if h is not None:
            host.append(h * 1e3)
    ms = _median(times)
    row = {"tg": n, "depth": depth, "ms": ms, "tok_per_s": n / ms * 1e3, "ms_per_token": ms / n, "runs": times}
    if host:
        row["host_ms_per_token"] = _median(host) / n
        row["host_fraction"] = row["host_ms_per_token"] / row["ms_per_token"]
    cache = decode_cache_report(backend)      # of the last timed run (random tokens: a cache's worst case)
    if cache is not None:
        row["expert_cache"] = cache
    if getattr(backend, "pdl", None) is not None:
        row["pdl"] = bool(backend.pdl)
        row["pdl_edges"] = int(getattr(backend, "pdl_edges", 0))     # in every graph captured so far
    log(f"{tg_label(n, depth):<9} {row['tok_per_s']:10.1f} tok/s   {row['ms_per_token']:.2f} ms/token"
        + (f"   host {row['host_ms_per_token']:.3f} ms/token ({100 * row['host_fraction']:.1f}%)" if host else "")
        + (f"   pdl {row['pdl_edges']} edges" if row.get("pdl") else "")
        + expert_cache_text(cache))
    return row


def _device_name() -> str:
    import cupy as cp
    p = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = p["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def host_time(model, backend, tokens, prefill_ms: float) -> dict:
    """Host time per chunk (staging the chunk's inputs and launching its captured graph), measured
    with the device idle at each chunk's start so no wait on earlier GPU work is counted, against
    the GPU time per chunk of the timed prefill."""
    import cupy as cp
    model.reset()
    backend.host_stats.update(chunks=0, host_s=0.0)
    for i in range(0, len(tokens), backend.chunk):
        backend.run_chunk(tokens[i:i + backend.chunk], "none")
        cp.cuda.Device().synchronize()
    hs = backend.host_stats
    per = hs["host_s"] * 1e3 / max(hs["chunks"], 1)
    return {"host_ms_per_chunk": per, "host_fraction": per / (prefill_ms / max(hs["chunks"], 1))}


def phase_breakdown(model, backend, tokens, ops_out: list | None = None) -> dict:
    """One eager prefill with an event after each launch; ms per phase. With ops_out, also
    appends one row per kind of node (op and name with layer numbers folded to '#'): total ms,
    launches, useful FLOPs and TFLOP/s over the prompt, slowest first."""
    import cupy as cp
    from ggfuse.ir.ops import OPS
    model.reset()
    s = backend.stream
    totals: dict[str, float] = {}
    kinds: dict[tuple, list] = {}
    for i in range(0, len(tokens), backend.chunk):
        piece = tokens[i:i + backend.chunk]
        ex = backend.executor_for(len(piece))      # a short prompt / tail runs a smaller chunk
        ex.stage_inputs(piece)
        nodes, launches = list(ex.launch_nodes), list(ex.launches)
        if ex.head_last is not None and i + backend.chunk >= len(tokens):
            nodes.append(ex.head_node)          # the last chunk's one-row LM head
            launches += ex.head_last
        evs = [cp.cuda.Event()]
        evs[0].record(s)
        with s:
            for fn in launches:
                fn()
                e = cp.cuda.Event()
                e.record(s)
                evs.append(e)
        s.synchronize()
        env = {"T": len(piece), "P": backend.n_past}   # useful work: the valid rows
        g = ex.graph
        for node, a, b in zip(nodes, evs, evs[1:]):
            ms = cp.cuda.get_elapsed_time(a, b)
            ph = phase_of(node)
            totals[ph] = totals.get(ph, 0.0) + ms
            if ops_out is not None:
                key = (node.op.value, re.sub(r"\d+", "#", node.name))
                d = OPS.get(node.op)
                f = 0
                if d is not None and d.flops and node is not ex.head_node:
                    f = d.flops(node.attrs, [g.type_of(v) for v in node.inputs], node.outputs, env)
                k = kinds.setdefault(key, [0.0, 0, 0])
                k[0] += ms
                k[1] += 1
                k[2] += f
        backend.n_past += len(piece)
    if ops_out is not None:
        for (op, name), (ms, cnt, f) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            ops_out.append({"op": op, "name": name, "ms": ms, "launches": cnt, "gflop": f / 1e9,
                            "tflops": f / ms / 1e9 if ms > 0 else 0.0})
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def op_bytes(g, node, env) -> int:
    """Bytes an op must move at least: every input read once (weights in their device form:
    graph meta "weights"), every output written once; views and states move nothing."""
    from ggfuse.ir.ops import Op
    from ggfuse.ir.types import DType, nbytes_of
    if node.op in (Op.RESHAPE, Op.SLICE, Op.INPUT, Op.WEIGHT):
        return 0
    forms = g.meta.get("weights") or {}
    total = 0
    for v in node.inputs:
        src = g.node(v.node)
        if src.op in (Op.WEIGHT, Op.FETCH_WEIGHTS):
            try:
                w = forms.get(g.tensor_of(v))
            except KeyError:
                w = None
            total += int(w["device_bytes"]) if w else g.type_of(v).nbytes(env)
        else:
            t = g.type_of(v)
            st = (src.meta.get("storage") or [t.dtype.value] * (v.index + 1))[v.index]
            total += nbytes_of(DType(st), t.numel(env))
    for i, t in enumerate(node.outputs):
        st = (node.meta.get("storage") or [t.dtype.value] * len(node.outputs))[i]
        total += nbytes_of(DType(st), t.numel(env))
    return total


def log_ops(ops: list, log=print, *, us: bool = False) -> None:
    """One line per kind of node of an op profile (replay_profile's ops_out): time (ms, or us
    for the decode step), launches, op, name, TFLOP/s where it does useful FLOPs, share of floor."""
    for o in ops:
        t = f"{1e3 * o['ms']:8.1f} us" if us else f"{o['ms']:8.2f} ms"
        fl = f"  {100 * o['of_floor']:5.1f}% of floor" if o.get("of_floor") is not None else ""
        log(f"    {t}  x{o['launches']:<4} {o['op']:<20} {o['name']:<34}"
            + (f" {o['tflops']:6.1f} TFLOP/s" if o['gflop'] else "") + fl)


def replay_profile(model, backend, tokens, ops_out: list, ceilings: dict | None) -> dict:
    """Per-op GPU times of the replayed prefill: each launch of each chunk captured as its own
    CUDA graph, the graphs replayed in schedule order with an event between each two (the
    kernels run back to back as in the chunk's one graph; only a graph launch's gap separates
    them, not Python's). ms per phase; with ops_out, one row per kind of node (op and name with
    layer numbers folded to '#'): ms, launches, useful FLOPs, TFLOP/s, and against its floor
    (useful FLOPs at the measured matmul rate, or its bytes at the measured copy rate)."""
    import cupy as cp
    from ggfuse.ir.ops import OPS
    from ggfuse.runtime.cuda.streaming import HostStep
    if getattr(backend, "streamer", None) is not None:
        raise RuntimeError("streamed experts: a fetch cannot be captured apart from its join")
    model.reset()
    s = backend.stream
    totals: dict[str, float] = {}
    kinds: dict[tuple, list] = {}
    rate = (ceilings or {}).get("matmul_tflops")
    bw = (ceilings or {}).get("copy_gbs")
    for i in range(0, len(tokens), backend.chunk):
        piece = tokens[i:i + backend.chunk]
        ex = backend.executor_for(len(piece))
        nodes, launches = list(ex.launch_nodes), list(ex.launches)
        if ex.head_last is not None and i + backend.chunk >= len(tokens):
            nodes.append(ex.head_node)
            launches += ex.head_last
        if any(isinstance(fn, HostStep) for fn in launches):
            raise RuntimeError("the chunk has host steps (staged or routed streaming)")
        graphs = [ex._capture([fn]) for fn in launches]       # recording runs nothing
        ex.stage_inputs(piece)
        evs = [cp.cuda.Event() for _ in range(len(graphs) + 1)]
        evs[0].record(s)
        for gph, ev in zip(graphs, evs[1:]):
            gph.launch(s)
            ev.record(s)
        s.synchronize()
        env = {"T": len(piece), "P": backend.n_past}
        g = ex.graph
        for node, a, b in zip(nodes, evs, evs[1:]):
            ms = cp.cuda.get_elapsed_time(a, b)
            ph = phase_of(node)
            totals[ph] = totals.get(ph, 0.0) + ms
            key = (node.op.value, re.sub(r"\d+", "#", node.name))
            d = OPS.get(node.op)
            f = d.flops(node.attrs, [g.type_of(v) for v in node.inputs], node.outputs, env) if d and d.flops else 0
            if node is ex.head_node:
                f = f // max(len(piece), 1)            # the last row only
            k = kinds.setdefault(key, [0.0, 0, 0, 0.0])
            k[0] += ms
            k[1] += 1
            k[2] += f
            k[3] += max(f / (rate * 1e9) if rate else 0.0, op_bytes(g, node, env) / (bw * 1e6) if bw else 0.0)
        backend.n_past += len(piece)
    for (op, name), (ms, cnt, f, floor) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        ops_out.append({"op": op, "name": name, "ms": ms, "launches": cnt, "gflop": f / 1e9,
                        "tflops": f / ms / 1e9 if ms > 0 else 0.0, "floor_ms": floor if (rate or bw) else None,
                        "of_floor": floor / ms if (rate or bw) and ms > 0 else None})
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def measure_ceilings(log=print) -> dict:
    """The device's ceilings, measured in the same run as the benchmark: tensor-core matmul rate
    (cuBLAS fp16 8192^3 through CuPy: the same tensor-core rate as bf16 on Ada/Hopper), device
    copy bandwidth (bytes read + written, 1 GiB) and pinned host-to-device bandwidth (1 GiB)."""
    import cupy as cp

    def timed(fn, reps):
        fn()
        cp.cuda.Device().synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(reps):
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
        return _median(times)

    n = 8192
    x = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    y = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    ms = timed(lambda: cp.matmul(x, y), 10)
    tflops = 2 * n ** 3 / ms / 1e9
    del x, y
    nb = 1 << 30
    src, dst = cp.empty(nb, dtype=cp.uint8), cp.empty(nb, dtype=cp.uint8)
    src.fill(1)
    ms = timed(lambda: dst.__setitem__(slice(None), src), 10)
    copy_gbs = 2 * nb / ms / 1e6
    del src
    pinned = cp.cuda.alloc_pinned_memory(nb)
    host = np.frombuffer(pinned, dtype=np.uint8, count=nb)
    host[:] = 1
    ms = timed(lambda: dst.set(host), 5)
    h2d_gbs = nb / ms / 1e6
    del dst, pinned, host
    cp.get_default_memory_pool().free_all_blocks()
    out = {"matmul_tflops": tflops, "copy_gbs": copy_gbs, "h2d_pinned_gbs": h2d_gbs}
    log(f"ceilings: tensor-core matmul {tflops:.0f} TFLOP/s, device copy {copy_gbs:.0f} GB/s, "
        f"pinned host->device {h2d_gbs:.1f} GB/s")
    return out


def prompt_floor(plan, n: int, chunk: int, ceilings: dict) -> dict:
    """A lower bound on prefilling n tokens: per chunk, the larger of its useful FLOPs at the
    measured matmul rate and its weight bytes read once at the measured copy bandwidth (half
    the read+write copy figure). Counts the LM head for the last token only, as TTFT needs."""
    from ggfuse.compiler.stats import graph_stats
    from ggfuse.ir.ops import Op
    g = plan.graph
    head = next(iter(g.by_op(Op.LM_HEAD)), None)
    head_per_row = 0
    if head is not None:
        v, d = (int(x) for x in g.type_of(head.inputs[1]).shape[-2:])
        head_per_row = 2 * v * d
    flops = 0
    ms = 0.0
    rate = ceilings["matmul_tflops"] * 1e9          # FLOP per ms
    bw = ceilings["copy_gbs"] / 2 * 1e6             # bytes per ms (reads only)
    starts = list(range(0, n, chunk))
    for i in starts:
        t = min(chunk, n - i)
        st = graph_stats(g, t, past=i)
        f = st["flops_per_chunk"] - head_per_row * t + (head_per_row if i == starts[-1] else 0)
        flops += f
        ms += max(f / rate, st["weight_bytes"] / bw)
    return {"flops": flops, "floor_ms": ms}


CHUNK_CANDIDATES = (512, 1024, 2048, 4096, 8192)


def equivalent_n_cpu_moe(path: str, vram_budget, *, chunk: int, max_context: int | None = None) -> int:
    """llama.cpp's --n-cpu-moe for a budget: as many layers' worth of experts in host memory as
    our plan streams under that budget (llama.cpp keeps the first N layers' experts on the CPU;
    we stream the last experts of many layers: sum of streamed experts / experts per layer)."""
    from ggfuse.compiler.driver import compile_gguf
    kw = {"max_context": max_context} if max_context else {}
    plan = compile_gguf(path, chunk=chunk, vram_budget=vram_budget, **kw)
    p = plan.stats.get("prefetch") or {}
    split = p.get("streamed_experts")
    if split and p.get("n_experts"):
        return int(round(sum(split.values()) / p["n_experts"]))
    return len(p.get("streamed_layers") or [])


def _n_expert_layers(path: str) -> int:
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.compiler.metadata import MAX_LAYERS, Metadata
    gf = GGUFFile(path)
    return Metadata(gf).scope(f"{gf.arch}.").int("block_count", min=1, max=MAX_LAYERS)


def choose_chunk(path: str, prompt: int, *, vram_budget=None, max_context: int | None = None,
                 candidates=CHUNK_CANDIDATES) -> tuple[int, list]:
    """The chunk with the least predicted prefill time for a prompt under a budget: bytes
    moved per chunk are about fixed, so larger chunks amortise them, but a larger chunk's
    arena leaves fewer layers pinned (more bytes per chunk), and a chunk over the prompt pays
    for padding. Uses the prefetch plan's two-stream prediction (passes/schedule_expert_prefetch)
    per candidate; candidates that do not fit the budget are skipped. Returns (chunk, table)."""
    from ggfuse.compiler.driver import build_graph
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.passes.pipeline import run_pipeline
    gf = GGUFFile(path)
    g0 = build_graph(gf)
    ctx = max(max_context or 0, prompt)
    table = []
    for c in candidates:
        if c > max(prompt, candidates[0]) * 2 - 1:     # more than one padded chunk's worth of waste
            continue
        try:
            g, _ = run_pipeline(g0, chunk=c, vram_budget=vram_budget, max_context=max(ctx, c),
                                only=["fuse_moe", "rewrite_deltanet_chunked", "fuse_elementwise",
                                      "schedule_expert_prefetch"])
        except GGFuseError as e:
            table.append({"chunk": c, "error": "does not fit" if "too small" in str(e) else str(e)})
            continue
        p = g.meta["prefetch"]
        per = (p.get("predicted") or {}).get("chunk_ms")
        if per is None:            # everything resident: compute only (FLOPs at the assumed rate)
            from ggfuse.compiler.stats import graph_stats
            per = graph_stats(g, c)["flops_per_chunk"] / 300e9
        n_chunks = -(-prompt // c)
        table.append({"chunk": c, "predicted_ms": n_chunks * per, "bytes_moved_per_chunk": p["bytes_moved_per_chunk"],
                      "pinned_layers": len(p["pinned_layers"]), "streamed_layers": len(p["streamed_layers"])})
    ok = [r for r in table if "predicted_ms" in r]
    if not ok:
        raise GGFuseError(path, f"no chunk of {list(candidates)} fits --vram-budget {vram_budget}")
    return min(ok, key=lambda r: (r["predicted_ms"], -r["chunk"]))["chunk"], table


class _VramSampler:
    """Peak device memory in use (MiB, device-wide, from nvidia-smi every 50 ms) while a block
    runs, less what was in use before it; None where nvidia-smi is missing."""

    def __init__(self):
        self.peak = None
        self._p = None

    def _query(self):
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        try:
            out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            return int(out[0]) if out else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        self.base = self._query()
        if self.base is not None:
            self._p = subprocess.Popen([shutil.which("nvidia-smi"), "--query-gpu=memory.used",
                                        "--format=csv,noheader,nounits", "-i", "0", "-lms", "50"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.terminate()
            out, _ = self._p.communicate(timeout=20)
            vals = [int(x) for x in out.split() if x.strip().isdigit()]
            self.peak = (max(vals) - self.base) if vals else None
        return False


UBATCHES = (512, 2048, 4096, 8192)      # llama-bench -ub tried for a resident comparison


def run_llama_bench(exe: str, path: str, prompts, *, repeat: int, n_cpu_moe=None, vram_budget=None,
                    search_from: int | None = None, n_layers: int | None = None, log=None, tg: int = 0,
                    ubatch=(2048,), tg_depth: int = 0) -> dict:
    """llama.cpp's own benchmark on the same file: flash attention on, every layer on the GPU,
    at the micro-batch sizes `ubatch` (-ub; the best per prompt is kept). With `n_cpu_moe` (an int or a list of ints: llama-bench runs once per setting and
    the best is kept per prompt), that many layers' experts stay in host memory, loaded into
    pinned buffers (-lm none: its fastest host path; the default mmap is 5-20x slower). Each
    setting's peak device memory is measured (nvidia-smi); with `vram_budget` the best is taken
    over the settings that stayed under it ("results"), and the best over all of them is kept
    as "results_any_memory".

    search_from (with vram_budget, instead of n_cpu_moe): find the fewest layers on the CPU that
    stay under the budget (llama.cpp's fastest setting that fits): from search_from up in steps of
    2 until one fits, then the one in between; or, if search_from fits already, down one at a time
    until one does not. tg > 0: also its decode test tgN (-n tg), kept under the key "tgN"; with
    tg_depth > 0 that test runs after a tg_depth-token prompt (-d, a second command per setting
    with -p 0, so that the prompt tests stay at depth 0), still under "tgN".
    ubatch: the micro-batch sizes to try (-ub, with -b the largest); the best per prompt is kept."""
    if not (os.path.exists(exe) or shutil.which(exe)):
        raise GGFuseError(exe, "llama-bench not found (see BENCHMARKS.md for how to build it)")
    ub = sorted({int(u) for u in ubatch})
    common = ["-fa", "1", "-ngl", "99", "-ub", ",".join(map(str, ub)), "-b", str(max(ub)), "-r", str(repeat), "-o", "json"]
    bases = [[exe, "-m", path, "-p", ",".join(map(str, prompts)), "-n", str(int(tg) if not tg_depth else 0)] + common]
    if tg and tg_depth:
        bases.append([exe, "-m", path, "-p", "0", "-n", str(int(tg)), "-d", str(int(tg_depth))] + common)
    settings = [None]
    if n_cpu_moe:
        settings = [n_cpu_moe] if isinstance(n_cpu_moe, int) else list(n_cpu_moe)
    if search_from is not None and vram_budget is None:
        raise GGFuseError(None, "searching llama-bench's --n-cpu-moe needs a --vram-budget")
    budget_mib = None
    if vram_budget is not None:
        from ggfuse.passes.schedule_expert_prefetch import parse_bytes
        budget_mib = parse_bytes(vram_budget) / 2**20
    runs, build, cmds = [], {}, []
    best: dict[int, float] = {}
    best_any: dict[int, float] = {}
    def one(ncm) -> bool:
        """Run one setting; True when it stayed under the budget."""
        nonlocal build
        res = []
        with _VramSampler() as vs:
            for base in bases:
                cmd = base + (["--n-cpu-moe", str(ncm), "-lm", "none"] if ncm is not None else [])
                cmds.append(" ".join(cmd))
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    tail = " | ".join(ln.strip() for ln in p.stderr.strip().splitlines()[-4:])
                    raise GGFuseError(exe, f"llama-bench failed ({p.returncode}): {tail}")
                res += json.loads(p.stdout)
        if res and not build:
            build = {k: res[0].get(k) for k in ("build_commit", "build_number", "gpu_info", "backends")}
        fits = budget_mib is None or vs.peak is None or vs.peak <= budget_mib
        for r in res:
            n, ts = int(r["n_prompt"]), float(r["avg_ts"])
            if int(r.get("n_gen") or 0) > 0 and n == 0:
                n = f"tg{int(r['n_gen'])}"         # the decode test
            elif n == 0:
                continue
            runs.append({"n_prompt": n, "avg_ts": ts, "stddev_ts": r.get("stddev_ts"), "n_ubatch": r.get("n_ubatch"),
                         "n_depth": r.get("n_depth"),
                         "n_cpu_moe": r.get("n_cpu_moe", ncm), "peak_vram_mib": vs.peak, "fits_budget": fits})
            best_any[n] = max(best_any.get(n, 0.0), ts)
            if fits:
                best[n] = max(best.get(n, 0.0), ts)
        if log is not None and vs.peak is not None:
            log(f"llama-bench --n-cpu-moe {ncm}: peak device memory {vs.peak / 1024:.2f} GiB"
                + ("" if fits else " (over the budget)"))
        return fits

    if search_from is None:
        for ncm in settings:
            one(ncm)
    else:
        top = n_layers if n_layers is not None else 1 << 30
        n = max(0, min(int(search_from), top))
        if one(n):
            while n > 0 and one(n - 1):
                n -= 1
        else:
            while n < top:
                m = min(n + 2, top)
                if one(m):
                    if m - 1 > n:
                        one(m - 1)
                    break
                n = m
    out = {"cmd": cmds[0] if len(cmds) == 1 else cmds, "build": build, "results": best, "runs": runs}
    if budget_mib is not None:
        out["vram_budget_mib"] = budget_mib
        out["results_any_memory"] = best_any
    return out


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise GGFuseError(path, "--plot needs matplotlib (pip install 'ggfuse[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["prompt"] for r in rows]
    ax1.plot(xs, [r["tok_per_s"] for r in rows], "o-", label="ggfuse")
    if result.get("llama_bench"):
        lb = result["llama_bench"]["results"]
        lb = {int(k): v for k, v in lb.items() if k.isdigit()}   # JSON keys are strings; "tgN" is decode
        ax1.plot(xs, [lb.get(x, np.nan) for x in xs], "s--", label="llama.cpp")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("prompt tokens")
    ax1.set_ylabel("prefill tokens / s")
    ax1.legend()
    ax1.grid(alpha=0.3)
    phases = sorted({p for r in rows for p in r.get("phases", {})})
    bottom = np.zeros(len(rows))
    for ph in phases:
        vals = np.array([r.get("phases", {}).get(ph, 0.0) for r in rows])
        ax2.bar([str(x) for x in xs], vals, bottom=bottom, label=ph)
        bottom += vals
    ax2.set_xlabel("prompt tokens")
    ax2.set_ylabel("ms (eager, per phase)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['arch']} on {result['device']}, chunk {result['chunk']}")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: str) -> None:
    """A figure written atomically (the format from the name's extension, PNG without one)."""
    from ggfuse.fileio import atomic_output
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    with atomic_output(path, "wb", what="plot") as f:
        fig.savefig(f, dpi=120, format=fmt)
    import matplotlib.pyplot as plt
    plt.close(fig)


BENCH_ARGS = ("model", "prompt", "chunk", "vram_budget", "repeat", "device", "against_llama_bench", "n_cpu_moe", "tg",
              "tg_depth")
_BENCH_OWN = ("chunk", "vram_budget", "device", "max_context")     # bench's own flags, not the options'


def add_bench_parser(sub):
    from ggfuse.options import add_arguments
    b = sub.add_parser("bench", help="measure prefill throughput and time-to-first-token")
    b.add_argument("model", nargs="?", help="GGUF to benchmark (with --rerun: the JSON's model)")
    b.add_argument("--rerun", metavar="JSON", help="repeat the run a bench JSON records, with the same arguments "
                                                   "and options (the model must be the same file)")
    b.add_argument("--prompt", default="512,2048,8192", help="prompt lengths (default 512,2048,8192)")
    b.add_argument("--chunk", default="2048", help="chunk length, or 'auto': per prompt, the chunk with the best "
                                                   "predicted time under --vram-budget (default 2048)")
    b.add_argument("--vram-budget", default=None,
                   help="device memory budget, e.g. 12GiB: stream experts; each prompt length is then compiled "
                        "and run on its own, with a KV cache for that prompt (as llama-bench sizes its context)")
    b.add_argument("--repeat", default="5", help="timed runs per prompt length; the best is reported (default 5)")
    b.add_argument("--tg", default=None, help="decode row: this many one-token steps from an empty "
                                                       "context, as llama-bench's tgN (0: none; default 128 on "
                                                       "cuda, 0 on the cpu reference)")
    b.add_argument("--tg-depth", default="0", metavar="D",
                   help="the decode row after a prompt of D tokens, as llama-bench's -d D (tgN @ dD): decode "
                        "with D tokens of context, its attention over them included (default 0: from an empty "
                        "context)")
    b.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="cuda, the cpu reference (slow), or auto (cuda when available) (default auto)")
    b.add_argument("--json", dest="json_out", help="write the results as JSON")
    b.add_argument("--plot", help="write a PNG: tok/s against prompt length, stacked phases")
    b.add_argument("--against-llama-bench", metavar="PATH", help="also run llama.cpp's llama-bench on the file")
    b.add_argument("--n-cpu-moe", default=None,
                   help="llama-bench --n-cpu-moe, e.g. 40 or 40,32,24 (the best per prompt is compared); "
                        "default with --vram-budget: a search from the layers' worth of experts the plan streams "
                        "for the fewest CPU layers whose measured peak memory stays under the budget (llama.cpp's "
                        "fastest setting that fits), which is what is compared")
    add_arguments(b, skip=_BENCH_OWN)
    b.set_defaults(fn=bench_main)
    return b


def _apply_rerun(args) -> None:
    """Fill args from a bench JSON (--rerun): its recorded arguments and options."""
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.options import Options
    from ggfuse.fileio import check_input, open_input
    try:
        with open_input(args.rerun, "rb", what="bench JSON") as f:
            res = json.loads(f.read(64 << 20).decode("utf-8"))
        rec, opts = res["args"], res["options"]
        if not isinstance(rec, dict):
            raise TypeError("args is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise GGFuseError(args.rerun, f"not a bench JSON with recorded arguments ({type(e).__name__}: {e})") from None
    for k in BENCH_ARGS:
        if k == "model" and args.model:
            continue
        setattr(args, k, rec.get(k))
    Options.from_json(opts, f"{args.rerun}: options")      # validated
    for k, v in opts.items():
        if k not in _BENCH_OWN:
            setattr(args, k, v)
    ident = res.get("model_identity") or {}
    if not isinstance(ident, dict):
        ident = {}
    if not isinstance(args.model, str):
        raise GGFuseError(args.rerun, "args.model: not a file name")
    got = GGUFFile(check_input(args.model, "model")).identity()
    if ident and (ident.get("size") != got["size"] or ident.get("header_sha256") != got["header_sha256"]):
        raise GGFuseError(args.model, f"is not the file {args.rerun} benchmarked (size {ident.get('size')}, header "
                                      f"{str(ident.get('header_sha256'))[:12]}); pass that model")


def _int_list(s):
    if s is None:
        return None
    try:
        return [int(x) for x in str(s).split(",") if x]
    except ValueError:
        raise GGFuseError(None, f"--n-cpu-moe must be comma-separated integers, got {s!r}") from None


def bench_main(args) -> int:
    from ggfuse.options import from_args
    if getattr(args, "rerun", None):
        _apply_rerun(args)
    if not args.model:
        raise GGFuseError(None, "bench needs a MODEL (or --rerun JSON)")
    from ggfuse.fileio import check_input, check_output
    from ggfuse.options import count, count_list, parse_bytes
    check_input(args.model, "model")
    options = from_args(args)
    prompts = count_list(args.prompt, "--prompt", 1, 1 << 24)
    args.repeat = count(args.repeat, "--repeat", 1, 1 << 20)
    if args.tg is not None:
        args.tg = count(args.tg, "--tg", 0, 1 << 24)
    args.tg_depth = count(args.tg_depth if args.tg_depth is not None else 0, "--tg-depth", 0, 1 << 24)
    if args.device not in ("auto", "cpu", "cuda"):
        raise GGFuseError(None, f"--device: {args.device!r} is not one of auto, cpu, cuda")
    if args.vram_budget is not None:
        parse_bytes(args.vram_budget, "--vram-budget")
    if args.n_cpu_moe is not None:
        count_list(args.n_cpu_moe, "--n-cpu-moe", 0, 1 << 16)
    if args.against_llama_bench and not (os.path.isfile(args.against_llama_bench)
                                         or shutil.which(args.against_llama_bench)):
        raise GGFuseError(args.against_llama_bench, "llama-bench not found (see BENCHMARKS.md for how to build it)")
    for out in (args.json_out, args.plot):        # before the runs, not after them
        if out is not None:
            check_output(out, inputs=[args.model])
    if args.device == "cuda":
        from ggfuse.runtime.api import cuda_available
        if not cuda_available():
            from ggfuse.errors import DeviceError
            raise DeviceError(args.model, "--device cuda: no CUDA device (no GPU, or cupy / cuda-python not "
                                          "installed: pip install 'ggfuse[gpu]'); use --device cpu")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    llama = None
    auto = args.chunk == "auto"
    if not auto:
        fixed_chunk = count(args.chunk, "--chunk", 1, 1 << 20)
    # Under a budget every prompt length is its own run with a KV cache for that prompt only (as
    # llama-bench sizes its context per test): a short prompt must not pay for a long one's cache
    # in pinned layers. Resident: one run, the cache sized for the longest prompt.
    per_prompt = bool(args.vram_budget)
    chunks = {}
    for n in prompts:
        if auto:
            c, table = choose_chunk(args.model, n, vram_budget=args.vram_budget,
                                    max_context=None if per_prompt else max(prompts))
            log(f"--chunk auto, prompt {n}: chunk {c} (" + ", ".join(
                f"{r['chunk']}: {r['predicted_ms']:.0f} ms" if "predicted_ms" in r else f"{r['chunk']}: {r['error']}"
                for r in table) + ")")
        else:
            c = fixed_chunk
        chunks[n] = c
    if per_prompt:
        from ggfuse.passes.lower_cuda import capture_sizes, context_for
        runs = [(chunks[n], [n], context_for(n, chunks[n], capture_sizes(chunks[n], options.sub_chunks,
                                                                          options.sub_chunk_min, options.decode))) for n in prompts]
    elif auto:
        groups: dict[int, list] = {}
        for n in prompts:
            groups.setdefault(chunks[n], []).append(n)
        runs = [(c, ps, max(prompts)) for c, ps in groups.items()]
    else:
        runs = [(fixed_chunk, prompts, None)]
    tg = args.tg
    if tg is None:
        from ggfuse.runtime.api import cuda_available
        tg = 128 if args.device == "cuda" or (args.device == "auto" and cuda_available()) else 0
    if tg < 0:
        raise GGFuseError(None, f"--tg must be 0 or a positive number of tokens, got {tg}")
    args.tg = tg
    if args.against_llama_bench:
        n_cpu_moe = _int_list(args.n_cpu_moe)
        search = None
        if n_cpu_moe is None and args.vram_budget:
            eq = sorted({equivalent_n_cpu_moe(args.model, args.vram_budget, chunk=c,
                                              max_context=ctx or max(ps)) for c, ps, ctx in runs})
            search = eq[0]
            log(f"llama-bench --n-cpu-moe: searching from {search} (the layers' worth of experts the plan streams "
                f"under {args.vram_budget}) for the fewest CPU layers that stay under it")
        # llama.cpp first, while the device is empty: a large model does not fit beside ours
        log(f"llama-bench on {args.model} ...")
        llama = run_llama_bench(args.against_llama_bench, args.model, prompts, repeat=args.repeat,
                                n_cpu_moe=n_cpu_moe, vram_budget=args.vram_budget, search_from=search,
                                n_layers=_n_expert_layers(args.model) if search is not None else None,
                                tg=args.tg, ubatch=(2048,) if args.vram_budget else UBATCHES,
                                tg_depth=args.tg_depth)
        for r in llama["runs"]:
            if r.get("peak_vram_mib") is not None:
                log(f"llama-bench --n-cpu-moe {r['n_cpu_moe']}: pp{r['n_prompt']} {r['avg_ts']:.0f} tok/s, peak device "
                    f"memory {r['peak_vram_mib'] / 1024:.2f} GiB" + ("" if r["fits_budget"] else " (over the budget)"))
    res = None
    if per_prompt and tg:
        # under a budget the decode row is a run of its own: a prompt's KV cache stays its size
        runs.append((runs[-1][0], [], tg + 8))
    for i, (c, ps, ctx) in enumerate(runs):
        last = i == len(runs) - 1       # the decode row once, with the last run's plan
        part = bench_model(args.model, ps, chunk=c, repeat=args.repeat, vram_budget=args.vram_budget,
                           device=args.device, log=log, max_context=ctx, options=options,
                           tg=tg if last else 0, tg_depth=args.tg_depth)
        for r in part["results"]:
            if auto:
                r["chunk"] = c
            if per_prompt:
                r["prefetch"] = part["prefetch"]
        if res is None:
            res = part
        else:
            res["results"] += part["results"]
            res["decode"] = part["decode"] or res.get("decode")
    res["results"].sort(key=lambda r: r["prompt"])
    if auto:
        res["chunk"] = "auto"
    res["max_context"] = "per prompt" if per_prompt else max(prompts)
    res["args"] = {k: getattr(args, k) for k in BENCH_ARGS}
    res["command"] = "ggfuse bench " + " ".join(
        [str(args.model)] + [f"--{k.replace('_', '-')} {v}" for k, v in res["args"].items() if k != "model" and v is not None])
    if llama is not None:
        res["llama_bench"] = llama
    lb = (res.get("llama_bench") or {}).get("results", {})
    print(f"{'prompt':>8} {'ggfuse tok/s':>14} {'TTFT ms':>10} {'of floor':>9} {'peak GiB':>9}" +
          (f" {'llama.cpp tok/s':>16} {'ratio':>7}" if lb else ""))
    for r in res["results"]:
        fl = f"{100 * r['of_floor']:.0f}%" if "of_floor" in r else "-"
        pk = f"{r['peak_device_bytes'] / 2**30:.2f}" if r.get("peak_device_bytes") else "-"
        line = f"{r['prompt']:>8} {r['tok_per_s']:>14.1f} {r['ttft_ms']:>10.2f} {fl:>9} {pk:>9}"
        if lb:
            other = lb.get(r["prompt"])
            line += f" {other:>16.1f} {r['tok_per_s'] / other:>7.2f}" if other else f" {'-':>16} {'-':>7}"
        print(line)
        if r.get("streaming"):
            from ggfuse.runtime.cuda.streaming import format_telemetry
            t = r["streaming"]
            print(f"         chunk {r.get('chunk', res['chunk'])}: {t['bytes_per_chunk'] / 1e9:.2f} GB/chunk, "
                  f"{r['tok_per_s']:.0f} tok/s")
            for line in format_telemetry(t):
                print("         " + line)
        if r.get("phases"):
            tot = sum(r["phases"].values())
            print("         " + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in r["phases"].items()))
    d = res.get("decode")
    if d:
        other = lb.get(f"tg{d['tg']}")
        line = f"{tg_label(d['tg'], d.get('depth', 0)):>8} {d['tok_per_s']:>14.1f} {d['ms_per_token']:>10.2f} {'-':>9} {'-':>9}"
        if lb:
            line += f" {other:>16.1f} {d['tok_per_s'] / other:>7.2f}" if other else f" {'-':>16} {'-':>7}"
        from ggfuse.runtime.generate import expert_cache_text
        print(line + (f"   host {100 * d['host_fraction']:.1f}% of a step" if "host_fraction" in d else "")
              + expert_cache_text(d.get("expert_cache")))
    if args.json_out:
        from ggfuse.fileio import write_atomic
        write_atomic(args.json_out, json.dumps(res, indent=1), inputs=[args.model], what="bench JSON")
    if args.plot:
        plot(res, args.plot)
    return 0


def plot_runs(paths, out: str) -> None:
    """One picture of several `ggfuse bench --json` results (e.g. one per preset): tokens/s
    against prompt length, ggfuse solid and llama.cpp dashed in the same colour; and the
    ggfuse / llama.cpp ratio per prompt length."""
    try:
        import matplotlib
    except ImportError:
        raise GGFuseError(out, "plotting needs matplotlib (pip install 'ggfuse[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append((os.path.basename(p), json.load(f)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(runs), 1)
    all_x = sorted({row["prompt"] for _, r in runs for row in r["results"]})
    slot = {x: i for i, x in enumerate(all_x)}
    for k, (name, r) in enumerate(runs):
        label = os.path.splitext(name)[0].replace("bench-", "")
        if r.get("vram_budget"):
            label += f" ({r['vram_budget']})"
        xs = [row["prompt"] for row in r["results"]]
        ys = [row["tok_per_s"] for row in r["results"]]
        line, = ax1.plot(xs, ys, "o-", label=f"{label} ggfuse")
        lb = {int(a): b for a, b in ((r.get("llama_bench") or {}).get("results") or {}).items()
              if a.isdigit()}                                   # prompt rows; "tgN" is decode
        if lb:
            ax1.plot(xs, [lb.get(x, np.nan) for x in xs], "s--", color=line.get_color(), alpha=0.7,
                     label=f"{label} llama.cpp")
            ratios = [y / lb[x] if lb.get(x) else np.nan for x, y in zip(xs, ys)]
            ax2.bar(np.array([slot[x] for x in xs]) + k * width, ratios, width, color=line.get_color(), label=label)
    ax2.set_xticks(np.arange(len(all_x)) + 0.4 - width / 2)
    ax2.set_xticklabels([str(x) for x in all_x])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("prompt tokens")
    ax1.set_ylabel("prefill tokens / s")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("prompt tokens")
    ax2.set_ylabel("ggfuse / llama.cpp")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    dev = next((r.get("device_name") for _, r in runs if r.get("device_name")), "")
    fig.suptitle(f"prefill on {dev}".strip())
    fig.tight_layout()
    _save_figure(fig, out)


if __name__ == "__main__":      # python -m ggfuse.runtime.bench plot OUT.png RUN.json...
    if len(sys.argv) >= 4 and sys.argv[1] == "plot":
        plot_runs(sys.argv[3:], sys.argv[2])
    else:
        sys.exit("usage: python -m ggfuse.runtime.bench plot OUT.png RUN.json [RUN.json ...]")
