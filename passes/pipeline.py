"""The pass pipeline: one ordered list, in phases.

`ggfuse compile --passes a,b` runs only those (in pipeline order), `--skip-pass x` drops one,
`--dump-dir DIR` writes the graph as text after each pass (NN-name.txt). The verifier runs after
every pass. Memory planning comes before capture segmentation; the prefetch schedule before both,
since its transfer nodes change what is live and where the host must step in.
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

from ggfuse.errors import GGFuseError
from ggfuse.fileio import write_atomic
from ggfuse.ir.graph import Graph
from ggfuse.ir.printer import to_text
from ggfuse.ir.verify import verify

PIPELINE: list[str] = [
    # 1. rewrites of the math into fused / chunked forms (each can be switched off and compared)
    "fuse_moe",                   # router + top-k + grouped-GEMM experts
    "rewrite_deltanet_chunked",   # token-recurrent delta rule -> chunked WY form
    "fuse_elementwise",           # add+norm, norm+rope, output gates, SwiGLU
    # 2. lowering for a GPU target: every kernel, variant, weight form, storage dtype and
    #    workspace (skipped for the cpu target, whose runtime interprets the graph)
    "lower_cuda",
    # 3. fitting the budget (counts the lowered weight forms and workspace)
    "schedule_expert_prefetch",   # resident vs streamed experts, transfer steps
    # 4. memory and capture
    "plan_memory",                # one arena per captured chunk size: activations and workspace
    "segment_graphs",             # host-sync-free regions = CUDA graphs
    # 5. decoding under a budget (needs the one-token step's memory plan)
    "plan_decode_cache",          # expert cache slots in idle memory, the step cut after routers
]


# Expert segments are padded to the grouped GEMM's row tile, so a tile never mixes two experts
# (kernels/moe/launch.py MOE_TILE).
MOE_TILE = 128


def _pass_kwargs(name: str, options, device_free) -> dict:
    if name == "fuse_moe":
        return {"tile": MOE_TILE}
    if name == "rewrite_deltanet_chunked":
        return {"chunk": options.deltanet_chunk}
    if name == "lower_cuda":
        return {"options": options, "device_free": device_free}
    if name == "schedule_expert_prefetch":
        return {"chunk": options.chunk, "budget": options.vram_budget, "max_context": options.max_context}
    if name == "plan_decode_cache":
        return {"options": options}
    if name == "plan_memory":
        return {"chunk": options.chunk}
    return {}


def run_pipeline(g: Graph, *, options=None, only: Sequence[str] | None = None, skip: Sequence[str] = (),
                 dump_dir: str | None = None, device_free: int | None = None, **kw) -> tuple[Graph, list[str]]:
    """Run the passes in order. options: ggfuse.options.Options (its target resolved; "cpu"
    skips the lowering); keyword arguments (chunk=, vram_budget=, max_context=, target=, ...)
    build one when none is given."""
    from ggfuse.options import Options
    options = Options.make(options, **kw) if kw or options is None else options
    if options.target == "auto":
        options = options.replace(target="cpu")
    unknown = [p for p in list(only or []) + list(skip) if p not in PIPELINE]
    if unknown:
        raise GGFuseError(None, f"unknown pass {unknown[0]!r} (passes: {', '.join(PIPELINE)})")
    names = [p for p in PIPELINE if (only is None or p in only) and p not in skip]
    if options.target == "cpu":
        names = [p for p in names if p != "lower_cuda"]
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        write_atomic(os.path.join(dump_dir, "00-frontend.txt"), to_text(g), what="dump")
    counts_before = g.op_counts()
    applied = []
    for i, name in enumerate(names, 1):
        mod = importlib.import_module(f"ggfuse.passes.{name}")
        res = mod.run(g, **_pass_kwargs(name, options, device_free))
        g = res.graph
        verify(g)
        applied.append(name)
        if dump_dir:
            write_atomic(os.path.join(dump_dir, f"{i:02d}-{name}.txt"), to_text(g), what="dump")
    g.meta["op_counts_before"] = counts_before
    return g, applied
