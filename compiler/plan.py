"""The plan file: what the compiler writes and the runtime executes.

Plain data, sorted JSON, no callables. Version rule (as torch/_export/serde/schema.py does):
bump MINOR for additions an older runtime can ignore; bump MAJOR when a field changes meaning or
a runtime must understand something new to execute correctly (new ops, new step semantics).
The loader refuses an unknown MAJOR and says to recompile.
"""
from __future__ import annotations

import json
import math
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
#          5.0 new kernel records and variants a 4.x runtime cannot run: the decode step's
#              (options decode_moe, decode_deltanet, decode_dense: by_chunk impl "gemv" on
#              moe.grouped (kernels/moe/gemv.cu, workspace h_gemv / slot_expert / hs_gemv) and
#              matmul, router "gemv" on moe.route, impl "recurrent" on deltanet.chunk); the
#              decode expert cache (passes/plan_decode_cache.py: graph_meta "decode_cache", the
#              streamed layers' grouped GEMMs read "decode_tables" at chunk 1; options
#              decode_cache*); Gemma 4's records (attention.window, kv_ring_append, ple_gather,
#              norm_add, act "gelu", the LM head's softcap, expert_scale); option check_tensors.
#          6.0 the grouped GEMMs' few-rows schedules small / smallq. 7.0 the decode router's
#              slot_expert layout.
#          8.0 one-row products read the stored quantised rows (option decode_dense auto): a
#              matmul's by_chunk gemv entry names the form it reads ("w"), the LM head's "last"
#              record may name a GGUF type while "all" reads bf16, and a matrix's forms may be
#              both "bf16" and "raw". A 7.x runtime would read the bf16 copy. The one-token
#              delta rule names its kernel (by_chunk "kernel": "step" gdr_step_*, or "loop").
#          8.1 lowering "pdl" (option pdl): whether the captured graphs' kernel-to-kernel edges are
#              programmatic (kernels/graph.py); an 8.0 runtime ignores it and runs them in full order.
#          8.2 option decode_norm_fold: the one-token step's add_rms_norm may run inside the next
#              launch (the norm's by_chunk "folded_into", that step's "norm"); an 8.1 runtime
#              ignores both records and runs the norm's own launch.
#          8.3 option decode_attention: an attention's by_chunk "1" may say impl "split" (the
#              one-token step's key-split kernel, its "splits" and workspace "split"); an 8.2
#              runtime ignores it and runs the record's prefill kernel for that step too.
PLAN_VERSION = (8, 3)


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

    def save(self, path: str, inputs=()) -> None:
        """Write the plan atomically (ggfuse/fileio.py); `inputs` are files it must not replace."""
        from ggfuse.fileio import write_atomic
        write_atomic(path, self.dumps(), inputs=inputs, what="plan")


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
    """Read and check a plan file: bounded JSON, the schema (compiler/plan_schema.py), the graph
    (ids, references, the IR verifier), its outputs and options. Every failure is one PlanError
    naming the file and the field."""
    from ggfuse.compiler.plan_schema import MAX_PLAN_BYTES, PlanSchemaError, parse_plan_text, validate_plan_json
    from ggfuse.fileio import open_input
    try:
        with open_input(path, "rb", what="plan file") as f:
            head = f.read(4)
            if head == b"GGUF":
                raise PlanError(path, f"is a GGUF model, not a plan: compile it first with `ggfuse compile {path}` "
                                      f"(ggfuse run accepts either)")
            if os.fstat(f.fileno()).st_size > MAX_PLAN_BYTES:
                raise PlanError(path, f"larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan file")
            raw = head + f.read(MAX_PLAN_BYTES)
    except GGFuseError as e:
        raise PlanError(e.path, e.message) from None
    except OSError as e:
        raise PlanError(path, f"cannot read the plan file: {e.strerror or e}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(path, f"larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(path, "not a plan file (not UTF-8 text; a GGUF? compile it first with `ggfuse compile`)") from None
    try:
        d = parse_plan_text(text)
    except PlanSchemaError as e:
        raise PlanError(path, f"not a readable plan file: {e}") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        got = d.get("format") if isinstance(d, dict) else None
        raise PlanError(path, f"not a ggfuse plan (format field is {str(got)[:40]!r})")
    ver = d.get("version")
    if not (isinstance(ver, list) and len(ver) == 2 and all(type(x) is int for x in ver)):
        raise PlanError(path, f"version: expected [major, minor], got {json.dumps(ver)[:40]}; recompile the plan "
                              f"with `ggfuse compile`")
    if ver[0] != PLAN_VERSION[0]:
        raise PlanError(path, f"plan format version {ver[0]}.{ver[1]} is not supported by this ggfuse "
                              f"(reads {PLAN_VERSION[0]}.x); recompile it with `ggfuse compile`")
    try:
        p = validate_plan_json(d)
    except PlanSchemaError as e:
        raise PlanError(path, str(e)) from None
    try:
        graph = _graph_of(p, d)
    except PlanSchemaError as e:
        raise PlanError(path, str(e)) from None
    from ggfuse.ir.verify import VerifyError, verify
    try:
        verify(graph)
    except VerifyError as e:
        lines = str(e).splitlines()
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise PlanError(path, f"steps: {lines[1].strip()}{more}") from None
    try:
        _check_graph_contract(p, graph)
    except PlanSchemaError as e:
        raise PlanError(path, str(e)) from None
    weights = [WeightEntry(w.name, w.ggml_type, tuple(w.shape), w.offset, w.nbytes) for w in p.weights]
    plan = Plan(source=dict(d["source"]), arch=p.arch, hparams=dict(d["hparams"]), chunk=p.chunk, graph=graph,
                weights=weights, passes=list(p.passes), stats=_filled(d.get("stats") or {}, p.stats),
                options=dict(d["options"]), ggfuse=dict(d.get("ggfuse") or {}), version=tuple(ver))
    try:
        opts = plan.compile_options()
    except GGFuseError as e:
        raise PlanError(path, f"options: {e.message}") from None
    if opts.chunk != plan.chunk:
        raise PlanError(path, f"chunk: plan chunk {plan.chunk} differs from its options' chunk {opts.chunk}")
    return plan


def _filled(raw: dict, checked) -> dict:
    """The raw section with the schema's view laid over it: every field the schema knows present
    (its default where the file left it out) and of its checked type; fields it does not know
    (a later minor version's) kept as they are."""
    def merge(r, c):
        if isinstance(r, dict) and isinstance(c, dict):
            return {**r, **{k: merge(r.get(k), v) for k, v in c.items() if not (v is None and k not in r)}}
        return c
    return merge(dict(raw), checked.model_dump(exclude_none=False))


def _graph_of(p, d) -> Graph:
    """The graph of a schema-checked plan: unique step ids, inputs naming existing outputs, a
    "logits" output. (Graph construction itself trusts its input: this is the check before it.)"""
    from ggfuse.compiler.plan_schema import PlanSchemaError
    n_out = {}
    for i, st in enumerate(p.steps):
        if st.id in n_out:
            raise PlanSchemaError(f"steps[{i}].id: step id {st.id} is used twice")
        n_out[st.id] = len(st.outputs)

    def ref_ok(s: str) -> bool:
        node, _, idx = s[1:].partition(".")
        return int(node) in n_out and int(idx or 0) < n_out[int(node)]

    for i, st in enumerate(p.steps):
        for j, s in enumerate(st.inputs):
            if not ref_ok(s):
                raise PlanSchemaError(f"steps[{i}].inputs[{j}]: {s} names no step output")
    if "logits" not in p.outputs:
        raise PlanSchemaError("outputs: no \"logits\" output")
    for k, s in p.outputs.items():
        if not ref_ok(s):
            raise PlanSchemaError(f"outputs.{k}: {s} names no step output")
    try:
        return graph_from_json({"name": p.arch, "nodes": d["steps"], "outputs": d["outputs"],
                                "meta": _filled(d.get("graph_meta") or {}, p.graph_meta)})
    except (KeyError, TypeError, ValueError) as e:   # the schema should have said: name the class anyway
        raise PlanSchemaError(f"steps: malformed ({e.__class__.__name__}: {e})") from None


_MAX_ELEMENTS_PER_TOKEN = 1 << 34    # 64 GiB of f32 at T=1, P=1: far past any real weight or state


def _check_graph_contract(p, g: Graph) -> None:
    """What the runtime assumes of a verified graph: its inputs are the tokens, the positions
    and carried states; the logits are [T, n_vocab]; every weight is in the weights table."""
    from ggfuse.compiler.plan_schema import PlanSchemaError
    for key, n in g.inputs().items():
        if key not in ("tokens", "positions") and n.attrs.get("kind") != "state":
            raise PlanSchemaError(f"steps: input %{n.id} {key!r} is neither the tokens, the positions nor a state")
    from ggfuse.ir.types import shape_eval
    for n in g.nodes():                       # no value absurdly large even for one token
        for t in n.outputs:
            if math.prod(shape_eval(t.shape, {"T": 1, "P": 1})) > _MAX_ELEMENTS_PER_TOKEN:
                raise PlanSchemaError(f"steps: %{n.id} ({n.op.value} {n.name!r}) has a value of {t} elements "
                                      f"for a single token: not a model this plan could come from")
    lt = g.type_of(g.outputs["logits"])
    if lt.rank != 2 or lt.shape[0] != "T" or lt.shape[1] != p.hparams.n_vocab:
        raise PlanSchemaError(f"outputs.logits: type {lt} is not [T, hparams.n_vocab={p.hparams.n_vocab}]")
    table = {}
    for i, w in enumerate(p.weights):
        if w.name in table:
            raise PlanSchemaError(f"weights[{i}].name: {w.name!r} is listed twice")
        table[w.name] = w
    for n in g.weights():
        w = table.get(n.attrs.tensor)
        if w is None:
            raise PlanSchemaError(f"weights: step %{n.id} reads tensor {n.attrs.tensor!r}, which the weights table "
                                  f"does not list")
        shape = n.outputs[0].shape
        if not all(isinstance(x, int) for x in shape) or math.prod(shape) != math.prod(w.shape) or \
                n.attrs.get("ggml_type") not in (None, w.ggml_type):
            raise PlanSchemaError(f"weights: step %{n.id} reads {n.attrs.tensor!r} as {n.outputs[0]} "
                                  f"({n.attrs.get('ggml_type')}), the table lists {w.ggml_type} {list(w.shape)}")


def check_weights(plan: Plan, gf, plan_path: str) -> None:
    """The plan's weights table against the GGUF's own tensor table (name, type, shape, offset,
    size): a plan edited by hand, or made from another file of the same header, must not read
    bytes the GGUF does not hold where the plan says."""
    for w in plan.weights:
        try:
            t = gf.tensor(w.name)
        except GGFuseError:
            raise PlanError(plan_path, f"weights: tensor {w.name!r} is not in {gf.path}") from None
        have = (t.type_name, tuple(t.shape), int(t.offset), int(t.nbytes))
        want = (w.ggml_type, tuple(w.shape), w.offset, w.nbytes)
        if have != want:
            names = ("ggml_type", "shape", "offset", "nbytes")
            k = next(i for i in range(4) if have[i] != want[i])
            raise PlanError(plan_path, f"weights: tensor {w.name!r} has {names[k]} {want[k]} in the plan but "
                                       f"{have[k]} in {gf.path}; recompile the plan")
