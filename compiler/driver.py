"""GGUF -> IR graph -> (passes) -> plan."""
from __future__ import annotations

import os
from typing import Sequence

from ggfuse.compiler.check_tensors import check_weights
from ggfuse.compiler.frontends import FRONTENDS
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.compiler.plan import Plan, WeightEntry
from ggfuse.compiler.stats import graph_stats
from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError
from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import InferError
from ggfuse.ir.verify import VerifyError, verify
from ggfuse.options import quiet
from ggfuse.passes.pipeline import run_pipeline

DEFAULT_CHUNK = 512      # ggfuse.options.Options.chunk's default


def build_graph(gf: GGUFFile) -> Graph:
    """Lower a GGUF file into the plain IR graph of its architecture."""
    fn = FRONTENDS.get(gf.arch)
    if fn is None:
        raise UnsupportedError(gf.path, f"architecture {gf.arch!r} is not supported (supported: {', '.join(sorted(FRONTENDS))})")
    try:
        g = fn(gf)
        verify(g)
    except (InferError, VerifyError) as e:
        # shapes that do not fit each other come from the file's metadata / tensors
        raise GGUFFormatError(gf.path, f"the {gf.arch} graph does not fit this file's shapes: {e}") from None
    return g


def weight_table(gf: GGUFFile, g: Graph) -> list[WeightEntry]:
    out = {}
    for n in g.weights():
        info = gf.tensor(n.attrs.tensor)
        out[info.name] = WeightEntry(info.name, info.type_name, tuple(info.shape), int(info.offset), int(info.nbytes))
    return list(out.values())


def resolve_target(options):
    """options with target "auto" made concrete: this machine's GPU, else cpu. Returns
    (options, free device bytes when the plan's target runs on this machine's GPU, else None:
    the dense-weight policy fits against it)."""
    from ggfuse.kernels import target as tgt
    if options.target == "cpu":
        return options, None
    dev = tgt.detect()
    if options.target == "auto":
        options = options.replace(target=dev.name if dev is not None else "cpu")
    free = None
    if dev is not None and options.target in tgt.TARGETS and tgt.TARGETS[options.target].runs_on(dev.cc):
        try:
            import cupy
            free = int(cupy.cuda.runtime.memGetInfo()[0])
        except Exception:  # noqa: BLE001 -- no measurement: the policy goes by the budget alone
            free = None
    return options, free


def compile_gguf(path: str, *, options=None, passes: Sequence[str] | None = None, skip: Sequence[str] = (),
                 dump_dir: str | None = None, gf: GGUFFile | None = None, progress=None, **kw) -> Plan:
    """Compile a GGUF into a plan. options: ggfuse.options.Options (keyword arguments such as
    chunk=, vram_budget=, max_context=, target=, precision= build or override it)."""
    from ggfuse.options import Options
    options = Options.make(options, **kw)
    options, device_free = resolve_target(options)
    gf = gf or GGUFFile(path)
    g = build_graph(gf)
    check_weights(gf, [n.attrs.tensor for n in g.weights()], options.check_tensors, progress=not quiet())
    try:
        g, applied = run_pipeline(g, options=options, only=passes, skip=skip, dump_dir=dump_dir,
                                  device_free=device_free)
    except GGFuseError as e:
        if e.path is not None:
            raise
        raise type(e)(gf.path, e.message) from None   # e.g. a budget too small: name the model
    ident = gf.identity()
    stats = graph_stats(g, options.chunk)
    stats["op_counts_before"] = g.meta.get("op_counts_before")
    for k in ("memory", "prefetch", "segments", "decode_cache"):
        if k in g.meta:
            stats[k] = g.meta[k]
    from ggfuse.compiler.buildinfo import build_info
    return Plan(
        source={"path": os.path.abspath(gf.path), **ident},
        arch=gf.arch,
        hparams=g.meta.get("hparams", {}),
        chunk=options.chunk,
        graph=g,
        weights=weight_table(gf, g),
        passes=applied,
        stats=stats,
        options=options.compile_json(),
        ggfuse=build_info(),
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
