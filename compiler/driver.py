"""GGUF -> IR graph -> (passes) -> plan."""
from __future__ import annotations

import os
from typing import Sequence

from ggfuse.compiler.frontends import FRONTENDS
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.compiler.plan import Plan, WeightEntry
from ggfuse.compiler.stats import graph_stats
from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError
from ggfuse.ir.graph import Graph
from ggfuse.ir.verify import verify
from ggfuse.passes.pipeline import run_pipeline

DEFAULT_CHUNK = 512


def build_graph(gf: GGUFFile) -> Graph:
    """Lower a GGUF file into the plain IR graph of its architecture."""
    fn = FRONTENDS.get(gf.arch)
    if fn is None:
        raise UnsupportedError(gf.path, f"architecture {gf.arch!r} is not supported (supported: {', '.join(sorted(FRONTENDS))})")
    g = fn(gf)
    verify(g)
    return g


def weight_table(gf: GGUFFile, g: Graph) -> list[WeightEntry]:
    out = {}
    for n in g.weights():
        info = gf.tensor(n.attrs.tensor)
        out[info.name] = WeightEntry(info.name, info.type_name, tuple(info.shape), int(info.offset), int(info.nbytes))
    return list(out.values())


def compile_gguf(path: str, *, chunk: int = DEFAULT_CHUNK, passes: Sequence[str] | None = None,
                 skip: Sequence[str] = (), dump_dir: str | None = None, gf: GGUFFile | None = None,
                 vram_budget=None, max_context: int = 8192) -> Plan:
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    gf = gf or GGUFFile(path)
    g = build_graph(gf)
    try:
        g, applied = run_pipeline(g, chunk=chunk, only=passes, skip=skip, dump_dir=dump_dir,
                                  vram_budget=vram_budget, max_context=max_context)
    except GGFuseError as e:
        if e.path is not None:
            raise
        raise type(e)(gf.path, e.message) from None   # e.g. a budget too small: name the model
    ident = gf.identity()
    stats = graph_stats(g, chunk)
    stats["op_counts_before"] = g.meta.get("op_counts_before")
    for k in ("memory", "prefetch", "segments"):
        if k in g.meta:
            stats[k] = g.meta[k]
    return Plan(
        source={"path": os.path.abspath(gf.path), **ident},
        arch=gf.arch,
        hparams=g.meta.get("hparams", {}),
        chunk=chunk,
        graph=g,
        weights=weight_table(gf, g),
        passes=applied,
        stats=stats,
    )


def check_source(plan: Plan, gf: GGUFFile, plan_path: str | None = None) -> None:
    """Refuse to run a plan against a different GGUF than it was compiled from."""
    ident = gf.identity()
    src = plan.source
    if ident["size"] != src.get("size") or ident["header_sha256"] != src.get("header_sha256"):
        from ggfuse.errors import PlanError
        raise PlanError(plan_path or gf.path,
                        f"plan was compiled from a different GGUF (plan: size {src.get('size')}, header "
                        f"{str(src.get('header_sha256'))[:12]}; {gf.path}: size {ident['size']}, header "
                        f"{ident['header_sha256'][:12]}); recompile with `ggfuse compile {gf.path}`")


__all__ = ["build_graph", "compile_gguf", "check_source", "DEFAULT_CHUNK", "GGUFFormatError"]
