"""The plan file: what the compiler writes and the runtime executes.

Plain data, sorted JSON, no callables. Version rule (as torch/_export/serde/schema.py does):
bump MINOR for additions an older runtime can ignore; bump MAJOR when a field changes meaning or
a runtime must understand something new to execute correctly (new ops, new step semantics).
The loader refuses an unknown MAJOR and says to recompile.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ggfuse.errors import GGFuseError, PlanError
from ggfuse.ir.graph import Graph
from ggfuse.ir.serialize import graph_from_json, node_to_json

PLAN_FORMAT = "ggfuse-plan"
# History: 1.0 the frontend's plain graph (token-recurrent DeltaNet, per-token expert matmuls).
#          2.0 the pass pipeline: fused ops (moe_route, moe_grouped_gemm, chunk_gated_delta_rule,
#              elementwise fusions, fetch_weights) a 1.x runtime cannot execute, plus arena offsets,
#              the expert prefetch schedule and capture segments.
#          3.0 the logits own no arena bytes and the LM head's inputs live to the end of the chunk
#              (the runtime runs the head after the chunk's graph: all rows, the last row or none);
#              the prefetch budget counts the runtime's per-op scratch ("workspace").
#          3.1 budgeted plans: knapsack-pinned layers, slots sized to the largest streamed layer,
#              the token embedding gathered on the host, a 16-row LM head block (prefetch info
#              "embedding" / "head_block"); the workspace counts the MoE's bf16 copy of x.
#          3.2 budgeted plans keep experts resident per expert: a fetch_weights streams experts
#              [first_expert, E) of its layer (absent: 0, a 3.1 plan's whole layer), prefetch info
#              "streamed_experts" / "n_experts"; the reserve is 96 MiB (was 256).
#          4.0 the plan is the whole contract: "options" (every compile option, the target resolved)
#              and "ggfuse" (version, commit); GPU plans are lowered (lower_cuda): each step's meta
#              has its "kernel" record, "storage" dtypes and "workspace"; meta "arena" and
#              "workspace_at" map each captured chunk size to offsets; graph_meta "lowering"
#              (target, captures, precision, dense policy) and "weights" (device forms and
#              residency per tensor); new ops kv_append and lm_head (concat onto a KV cache and
#              the logits matmul before); state inputs name their kind (attrs "state"); nodes carry
#              their layer in meta "layer". A 3.x runtime would run a 4.0 plan wrongly.
#          4.1 the decode step: options decode_moe, decode_deltanet, decode_dense; the one-token
#              chunk's by_chunk records may say impl "gemv" (moe.grouped: kernels/moe/gemv.cu,
#              workspace h_gemv / slot_expert / hs_gemv; matmul), router "gemv" (moe.route), impl
#              "recurrent" (deltanet.chunk); the decode expert cache (passes/plan_decode_cache.py):
#              graph_meta "decode_cache" (slots, policy, split points after the streamed layers'
#              routers), the streamed layers' grouped GEMMs read "decode_tables" at chunk 1;
#              options decode_cache*. Fields added, none changed meaning.
#          4.2 option check_tensors (which weight values were checked for NaN / Inf).
PLAN_VERSION = (4, 2)


@dataclass(frozen=True)
class WeightEntry:
    name: str
    ggml_type: str
    shape: tuple          # numpy order (GGUF ne reversed)
    offset: int           # absolute byte offset in the GGUF file
    nbytes: int

    def to_json(self):
        return {"name": self.name, "ggml_type": self.ggml_type, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


@dataclass
class Plan:
    source: dict                       # {"path", "size", "header_sha256"}
    arch: str
    hparams: dict
    chunk: int
    graph: Graph                       # steps = graph.topo(): the op schedule
    weights: list[WeightEntry]
    passes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)     # ggfuse.options.Options.compile_json()
    ggfuse: dict = field(default_factory=dict)      # compiler/buildinfo.py: version, commit
    version: tuple = PLAN_VERSION

    @property
    def target(self) -> str:
        return self.options.get("target", "cpu")

    @property
    def lowering(self) -> dict:
        return self.graph.meta.get("lowering") or {}

    def compile_options(self):
        """The plan's options as a ggfuse.options.Options (runtime fields at their defaults)."""
        from ggfuse.options import Options
        return Options.from_json(self.options, "plan options")

    def to_json(self) -> dict:
        g = self.graph
        steps = [node_to_json(n) for n in g.topo()]
        return {
            "format": PLAN_FORMAT,
            "version": list(self.version),
            "source": self.source,
            "arch": self.arch,
            "hparams": self.hparams,
            "chunk": self.chunk,
            "options": self.options,
            "ggfuse": self.ggfuse,
            "passes": list(self.passes),
            "steps": steps,
            "outputs": {k: str(v) for k, v in sorted(g.outputs.items())},
            "states": {k: n.outputs[0].to_json() for k, n in sorted(g.states().items())},
            "buffers": buffers_of(g),
            "weights": [{**w.to_json(), **_device_of(g, w.name)} for w in sorted(self.weights, key=lambda w: w.offset)],
            "graph_meta": g.meta,
            "stats": self.stats,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, indent=1) + "\n"

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.dumps())
        os.replace(tmp, path)


def _device_of(g: Graph, name: str) -> dict:
    """A weight's device forms and residency (lowered plans)."""
    w = (g.meta.get("weights") or {}).get(name)
    if not w:
        return {}
    return {"device": {k: w[k] for k in ("forms", "residency", "resident_experts", "device_bytes") if k in w}}


def buffers_of(g: Graph) -> list[dict]:
    """Every activation value the schedule produces, with its type, storage dtype and arena
    offset per captured chunk size (weights excluded)."""
    out = []
    for n in g.topo():
        if n.op.value == "weight":
            continue
        for i, t in enumerate(n.outputs):
            entry = {"value": str(n.value(i)), **t.to_json()}
            st = n.meta.get("storage")
            if st:
                entry["storage"] = st[i]
            offs = {c: o[i] for c, o in (n.meta.get("arena") or {}).items() if o[i] is not None}
            if offs:
                entry["offset"] = offs
            out.append(entry)
    return out


def load_plan(path: str) -> Plan:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise PlanError(path, "no such plan file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(path, f"not a readable plan file ({e.__class__.__name__}: {e})") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise PlanError(path, f"not a ggfuse plan (format field is {d.get('format') if isinstance(d, dict) else None!r})")
    ver = tuple(d.get("version", (0, 0)))
    if len(ver) != 2 or ver[0] != PLAN_VERSION[0]:
        raise PlanError(path, f"plan format version {'.'.join(map(str, ver))} is not supported by this ggfuse "
                              f"(reads {PLAN_VERSION[0]}.x); recompile it with `ggfuse compile`")
    try:
        graph = graph_from_json({"name": d["arch"], "nodes": d["steps"], "outputs": d["outputs"],
                                 "meta": d.get("graph_meta", {})})
        weights = [WeightEntry(w["name"], w["ggml_type"], tuple(w["shape"]), int(w["offset"]), int(w["nbytes"]))
                   for w in d["weights"]]
        plan = Plan(source=d["source"], arch=d["arch"], hparams=d["hparams"], chunk=int(d["chunk"]), graph=graph,
                    weights=weights, passes=list(d.get("passes", [])), stats=d.get("stats", {}),
                    options=dict(d["options"]), ggfuse=dict(d.get("ggfuse") or {}), version=ver)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(path, f"plan is missing or has a malformed field ({e.__class__.__name__}: {e})") from None
    try:
        opts = plan.compile_options()
    except GGFuseError as e:
        raise PlanError(path, e.message) from None
    if opts.chunk != plan.chunk:
        raise PlanError(path, f"plan chunk {plan.chunk} differs from its options' chunk {opts.chunk}")
    return plan
