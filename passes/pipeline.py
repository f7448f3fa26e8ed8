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
from ggfuse.ir.graph import Graph
from ggfuse.ir.printer import to_text
from ggfuse.ir.verify import verify

PIPELINE: list[str] = [
    # 1. rewrites of the math into fused / chunked forms (each can be switched off and compared)
    "fuse_moe",                   # router + top-k + grouped-GEMM experts
    "rewrite_deltanet_chunked",   # token-recurrent delta rule -> chunked WY form
    "fuse_elementwise",           # add+norm, norm+rope, output gates, SwiGLU
    # 2. fitting the budget
    "schedule_expert_prefetch",   # resident vs streamed experts, transfer steps
    # 3. memory and capture
    "plan_memory",                # one activation arena per chunk
    "segment_graphs",             # host-sync-free regions = CUDA graphs
]


# Expert segments are padded to the grouped GEMM's row tile, so a tile never mixes two experts
# (kernels/moe/launch.py MOE_TILE).
MOE_TILE = 128


def _options(name: str, *, chunk: int, vram_budget, max_context: int, deltanet_chunk: int) -> dict:
    if name == "fuse_moe":
        return {"tile": MOE_TILE}
    if name == "rewrite_deltanet_chunked":
        return {"chunk": deltanet_chunk}
    if name == "schedule_expert_prefetch":
        return {"chunk": chunk, "budget": vram_budget, "max_context": max_context}
    if name == "plan_memory":
        return {"chunk": chunk}
    return {}


def run_pipeline(g: Graph, *, chunk: int, only: Sequence[str] | None = None, skip: Sequence[str] = (),
                 dump_dir: str | None = None, vram_budget=None, max_context: int = 8192,
                 deltanet_chunk: int = 64) -> tuple[Graph, list[str]]:
    unknown = [p for p in list(only or []) + list(skip) if p not in PIPELINE]
    if unknown:
        raise GGFuseError(None, f"unknown pass {unknown[0]!r} (passes: {', '.join(PIPELINE)})")
    names = [p for p in PIPELINE if (only is None or p in only) and p not in skip]
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, "00-frontend.txt"), "w") as f:
            f.write(to_text(g))
    counts_before = g.op_counts()
    applied = []
    for i, name in enumerate(names, 1):
        mod = importlib.import_module(f"ggfuse.passes.{name}")
        res = mod.run(g, **_options(name, chunk=chunk, vram_budget=vram_budget, max_context=max_context,
                                     deltanet_chunk=deltanet_chunk))
        g = res.graph
        verify(g)
        applied.append(name)
        if dump_dir:
            with open(os.path.join(dump_dir, f"{i:02d}-{name}.txt"), "w") as f:
                f.write(to_text(g))
    g.meta["op_counts_before"] = counts_before
    return g, applied
