"""Time one Qwen3.5-35B-A3B MoE layer (python -m ggfuse.kernels.moe.bench).

D = 2048, 256 experts, top-8, expert FFN 512; gate/up Q4_K and down Q6_K read directly (no bf16
copy of the experts), x bf16, random routing. Ours: router GEMM (bf16 router weight) +
moe_route + moe_gate_up + moe_down, one CUDA graph; also each part alone. Anchor (if torch is
importable): the same layer with bf16 weights in torch: router mm, softmax, topk, sort, gather,
torch._grouped_mm (gate|up), SwiGLU, torch._grouped_mm (down), weight, index_add.
The grouped GEMMs are timed with each kernel family (gemm.bench.impls: mma, and wgmma /
wgmma_generic = fast / element-wise dequantisation on cc 9.0, both with persistent blocks, and
wgmma_tiles = fast dequantisation with a block per tile; small = the few-rows kernels);
the err column compares each family's h and out with the first family's (mma.sync, which
tests/test_gpu_moe.py checks against the float64 reference).

--decode: the one-token step's experts (kernels/moe/gemv.cu) of the same layer, top-8 of 256 plus
the shared expert (F 512, gate/up Q4_K, down Q6_K, x f32), 40 layers captured in one CUDA graph,
per layer: the two launches of gemv.cu against the four of the kernels it replaced
(moe/gemv_baseline.cu), whole and per half. The layers cycle through 8 distinct weight sets
(each all 256 experts and a shared expert, ~0.5 GB) and each layer picks its own random experts,
so one replay reads ~370 MB of distinct experts and the 50 MB L2 keeps little of the previous
replay. Also checks that both give the same outputs (f32 accumulation order only).
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.gemm import launch as gl
from ggfuse.kernels.gemm.bench import (ALL_FAMILIES, FAMILIES, PEAK_TBS, PEAK_TFLOPS, device_weight, err,
                                       family_kwargs, impls, time_graph, time_torch)
from ggfuse.kernels.moe import launch

D, E, K_TOP, F = 2048, 256, 8, 512
GU_TYPE, DN_TYPE = "q4_k", "q6_k"
TOKENS = (64, 256, 512, 1024, 2048, 4096)
# kernel families (--impls selects): wgmma = persistent blocks on 256-row tiles
# (moe90w_*), wgmma_persist = persistent on 128-row tiles (moe90p_*), wgmma_tiles
# = a block per tile (moe90_*), wgmma_generic = persistent with the element-wise dequantisation,
# small = the few-rows kernels (moe/grouped_small.cu, every device), smallq = the same with integer quants
MOE_FAMILIES = (*FAMILIES, "wgmma_persist", "wgmma_tiles", "small", "smallq")


def row(name, ms, flops, nbytes=0):
    floor = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_TBS * 1e12)) * 1e3
    return f"{name:40s} {ms:8.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s   floor {floor:7.3f} ms"


def torch_layer(N: int):
    import torch
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    wr = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) * 0.02
    w_gu = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) * 0.02
    w_d = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02
    w_gu_t, w_d_t = w_gu.transpose(1, 2), w_d.transpose(1, 2)   # [E, D, 2F], [E, F, D] column-major

    def layer():
        probs = torch.softmax((x @ wr.t()).float(), dim=-1)
        w, ids = torch.topk(probs, K_TOP, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        tok = order // K_TOP
        gu = torch._grouped_mm(x[tok], w_gu_t, offs=offs)
        h = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(h, w_d_t, offs=offs) * w.reshape(-1)[order, None].to(torch.bfloat16)
        out = torch.zeros(N, D, device="cuda", dtype=torch.float32)
        out.index_add_(0, tok, y.float())
        return out

    def gemms_only():
        offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (N * K_TOP // E)
        xs = x.repeat_interleave(K_TOP, 0)
        gu = torch._grouped_mm(xs, w_gu_t, offs=offs)
        torch._grouped_mm(gu[:, :F].contiguous(), w_d_t, offs=offs)

    return layer, gemms_only


def parse_args(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", help=f"comma-separated kernel families (known: {', '.join(ALL_FAMILIES)})")
    ap.add_argument("--decode", action="store_true", help="the one-token step's experts, gemv.cu against its baseline")
    ap.add_argument("--layers", type=int, default=40, help="--decode: layers per captured graph")
    ap.add_argument("--sets", type=int, default=8, help="--decode: distinct weight sets the layers cycle through")
    ap.add_argument("--reps", type=int, default=30, help="--decode: timed replays (median)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.decode:
        from ggfuse.kernels.moe.bench_decode import main as decode_main
        decode_main(args)
        return
    import cupy as cp
    try:
        import torch
    except ImportError:
        torch = None
    print(f"device: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}")
    w_gate = device_weight(GU_TYPE, E * F, D).reshape(E, F, -1)
    w_up = device_weight(GU_TYPE, E * F, D).reshape(E, F, -1)
    w_down = device_weight(DN_TYPE, E * D, F).reshape(E, D, -1)
    w_router = device_weight("bf16", E, D)
    wbytes = w_gate.nbytes + w_up.nbytes + w_down.nbytes
    print(f"expert weights {wbytes / 1e6:.0f} MB ({GU_TYPE} gate/up, {DN_TYPE} down)")
    launch.prepare("bf16", GU_TYPE, DN_TYPE)
    gl.prepare("bf16", "bf16")
    for N in TOKENS:
        rng = np.random.default_rng(N)
        x = cp.asarray(rng.standard_normal((N, D), dtype=np.float32)).view(cp.uint32)
        x = ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(cp.uint16)
        S = launch.sorted_len(N, K_TOP, E, launch.MOE_TILE)
        logits = cp.empty((N, E), cp.float32)
        ids = cp.empty((N, K_TOP), cp.int32)
        wts = cp.empty((N, K_TOP), cp.float32)
        slots = cp.empty(S, cp.int32)
        offs = cp.empty(E + 1, cp.int32)
        scratch = cp.empty(launch.route_scratch_ints(N, K_TOP, E), cp.int32)
        h = cp.empty((S, F), cp.uint16)
        out = cp.empty((N, D), cp.float32)
        nv = cp.asarray([N], cp.int32)

        def router(s):
            gl.gemm(x, "bf16", D, w_router, "bf16", E, D, logits, "f32", E, N, s)

        def route(s):
            launch.moe_route(logits, N, E, K_TOP, True, 0.0, launch.MOE_TILE, nv, ids, wts, slots, offs, scratch, s)

        kw = {}

        def gate_up(s):
            launch.moe_gate_up(x, "bf16", w_gate, w_up, GU_TYPE, E, F, D, slots, offs, K_TOP, h, s, **kw)

        def down(s):
            launch.moe_down(h, w_down, DN_TYPE, E, D, F, slots, offs, wts, K_TOP, out, s, **kw)

        def layer(s):
            router(s)
            route(s)
            gate_up(s)
            down(s)

        layer(None)
        cp.cuda.Device().synchronize()
        pad_rows = int(cp.asnumpy(offs)[-1])
        f_gu, f_dn = 2 * N * K_TOP * 2 * F * D, 2 * N * K_TOP * D * F
        print(f"--- N = {N} tokens ({N * K_TOP} slots, {pad_rows} rows after tile padding)")
        print(row("router gemm (bf16)", time_graph(router), 2 * N * E * D))
        print(row("moe_route", time_graph(route), 0))
        first = None
        for family in impls(MOE_FAMILIES, args.impls):
            if family.startswith("wgmma") and gl.device_cc() != 90:
                continue
            try:
                kw = family_kwargs(family)
                kw.pop("persist")
                launch.prepare("bf16", GU_TYPE, DN_TYPE, kw["impl"], kw["dequant"])
                layer(None)
                cp.cuda.Device().synchronize()
                valid = cp.asnumpy(slots[:pad_rows]) >= 0
                res = (cp.asnumpy(h[:pad_rows])[valid].astype(np.uint32) << 16).view(np.float32), cp.asnumpy(out)
                first = first or res
                e = f"h {err(res[0], first[0].astype(np.float64))} | out {err(res[1], first[1].astype(np.float64))}"
                print(row(f"moe_gate_up ({GU_TYPE}) {family}", time_graph(gate_up), f_gu, w_gate.nbytes + w_up.nbytes) + "   " + e)
                print(row(f"moe_down ({DN_TYPE}) {family}", time_graph(down), f_dn, w_down.nbytes))
                print(row(f"whole layer (ours) {family}", time_graph(layer), f_gu + f_dn + 2 * N * E * D, wbytes))
            except Exception as exc:   # one failing variant must not hide the others
                print(f"moe {family}: {type(exc).__name__}: {exc}")
        kw = {}
        if torch is not None:
            try:
                t_layer, t_gemms = torch_layer(N)
                print(row("torch bf16 layer (_grouped_mm)", time_torch(t_layer), f_gu + f_dn + 2 * N * E * D))
                print(row("torch bf16 two grouped GEMMs", time_torch(t_gemms), f_gu + f_dn))
            except Exception as exc:   # _grouped_mm missing or unsupported here
                print(f"torch anchor failed: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
