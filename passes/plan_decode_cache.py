"""plan_decode_cache: how a budgeted plan decodes, one token at a time, without streaming every expert.

A prefill chunk under --vram-budget copies all of a streamed layer's streamed experts
(schedule_expert_prefetch): right for 512 tokens that touch most experts, hopeless for one token
that reads k of E. For the one-token step (the decode capture, chunk size 1) this pass plans an
expert cache instead:

- Memory: one-expert cache slots (each holds one expert of one layer: its stacked tensors' rows
  back to back, every tensor 256-byte aligned), carved from device memory decoding leaves idle,
  in this order: the prefill's streaming slots, the arena above the one-token step's layout (each
  chunk size's layout starts at offset 0: plan_memory), and the part of the budget the prefill
  plan left unused (a new allocation). A prefill chunk overwrites the first two, so the runtime
  empties the cache whenever a chunk of more than one token runs. `carve` is the layout, for this
  pass and the runtime alike.
- Split points: the step is cut after each streamed layer's router (MOE_ROUTE): a host step reads
  the token's k routed experts, looks them up (runtime/cuda/decode_cache.py: LRU, or segmented
  LRU whose protected segment holds the experts hit more than once), copies the misses into
  slots as one batch of async copies on the copy stream and patches the layer's expert tables
  (the device's expert -> address map: resident experts at their upload, cached ones in their
  slot), and the compute stream waits for that batch before the layer's grouped GEMM. The
  prefill's FETCH_WEIGHTS steps do nothing at chunk 1.
- The grouped GEMM of every streamed layer reads its experts through the decode tables at chunk 1
  (kernel record "decode_tables": {"chunk": 1}), whole streamed layers included.

The alternative for a cold expert, computing it on the host for the one token (llama.cpp's
--n-cpu-moe), reads the same bytes from host memory instead of over the link. Measured with
numpy (a 35B-A3B expert: Q4_K gate+up+down, D=2048, F=512, 1.77 MB): dequantise + GEMV 75 ms,
a GEMV on rows dequantised in advance to f32 8 ms (12.6 MB per expert: 58 GB of host memory for
the 4647 experts a 12 GiB plan streams), against 0.035 ms to copy the quantised expert at
50 GB/s; only a compiled quantised dot product at host memory bandwidth would tie the copy, and
a copied expert may be hit again. So the plan copies ("cold_experts": "copy").

graph.meta["decode_cache"] = {"policy", "slots", "slot_bytes", "protected_slots", "regions"
[{"kind", "bytes", "slots"}], "layers" [{"layer", "route", "experts", "first_streamed",
"n_experts", "k", "tensors" [{"name", "role", "offset", "expert_bytes", "src_expert_bytes"}]}],
"split_points" [route node names], "bytes_per_token_all" (what streaming every expert would
move), "cold_experts", "why"}; absent where the plan does not decode or streams nothing.
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.ir.ops_fused_moe import moe_operands
from ggfuse.ir.types import DType, nbytes_of
from ggfuse.passes.base import PassResult
from ggfuse.passes.schedule_expert_prefetch import align_up

DECODE_CHUNK = 1


def carve(regions: list[int], slot_bytes: int, limit: int | None = None) -> list[list[int]]:
    """Per region (its bytes), the byte offsets of the cache slots carved from it, in order, at
    most `limit` slots in all."""
    out, left = [], (1 << 62) if limit is None else int(limit)
    for nbytes in regions:
        n = min(max(int(nbytes), 0) // slot_bytes if slot_bytes else 0, left)
        out.append([i * slot_bytes for i in range(n)])
        left -= n
    return out


def _expert_bytes(w: dict) -> tuple[int, int]:
    """(device bytes, GGUF bytes) of one expert of a stacked tensor in its device form."""
    shape = [int(d) for d in w["shape"]]
    E, numel = shape[0], 1
    for d in shape:
        numel *= d
    src = nbytes_of(DType.from_ggml(w["ggml_type"]), numel)
    dev = src if w["forms"] == ["raw"] or w["ggml_type"] == "BF16" else numel * 2
    return dev // E, src // E


def _fetch_of(g: Graph, v):
    n = g.node(v.node)
    while n.op == Op.RESHAPE:
        n = g.node(n.inputs[0].node)
    return n if n.op == Op.FETCH_WEIGHTS else None


def prefill_slot_bytes(g: Graph) -> int:
    """Bytes of one prefill streaming slot as the runtime allocates it (runtime/cuda/streaming.py):
    the largest fetch's tensors in device form (F32 / F16 experts as bf16), each 256-aligned."""
    weights = g.meta["weights"]
    out = 0
    for f in g.by_op(Op.FETCH_WEIGHTS):
        E = None
        size = 0
        for v in f.inputs[: f.attrs.n_weights]:
            w = weights[g.tensor_of(v)]
            E = int(w["shape"][0])
            first = int(f.attrs.get("first_expert", 0) or 0)
            end = f.attrs.get("end_expert")
            end = E if end is None else int(end)
            size = align_up(size + (end - first) * _expert_bytes(w)[0])
        out = max(out, align_up(size))
    return out


def streamed_layers(g: Graph) -> list[tuple]:
    """(layer, route node, grouped GEMM node, {role: expert tensor name}) of every layer whose
    experts pass through FETCH_WEIGHTS, in schedule order (roles gate, up, down, or gate_up)."""
    out = []
    for n in g.topo():
        if n.op != Op.MOE_GROUPED_GEMM:
            continue
        ops = moe_operands(n.attrs, n.inputs)
        fetches = [f for f in (_fetch_of(g, v) for v in ops.experts) if f is not None]
        if not fetches:
            continue
        route = g.node(ops.offsets.node)
        if route.op != Op.MOE_ROUTE:
            raise ValueError(f"{n.name}: its expert offsets come from {route.op.value}, not moe_route")
        roles = {"gate": ops.gate, "up": ops.up, "gate_up": ops.gate_up, "down": ops.down}
        out.append((int(fetches[0].attrs.layer), route, n,
                    {r: g.tensor_of(v) for r, v in roles.items() if v is not None}))
    return out


def run(g: Graph, *, options) -> PassResult:
    low = g.meta.get("lowering")
    pre = g.meta.get("prefetch") or {}
    if low is None or DECODE_CHUNK not in [int(c) for c in low.get("captures", [])] \
            or not pre.get("streamed_layers") or options.decode_cache == "off":
        return PassResult(g, False)
    g = g.copy()
    weights = g.meta["weights"]
    layers, slot_bytes, split = [], 0, []
    for layer, route, gemm, names in streamed_layers(g):
        tensors, off = [], 0
        for role, name in names.items():
            dev_e, src_e = _expert_bytes(weights[name])
            tensors.append({"name": name, "role": role, "offset": off, "expert_bytes": dev_e,
                            "src_expert_bytes": src_e})
            off = align_up(off + dev_e)
        slot_bytes = max(slot_bytes, off)
        first = next(iter(names.values()))
        E = int(weights[first]["shape"][0])
        layers.append({"layer": layer, "route": route.name, "experts": gemm.name, "n_experts": E,
                       "first_streamed": int(weights[first].get("resident_experts", 0)),
                       "k": int(g.type_of(route.value(0)).shape[1]), "tensors": tensors})
        split.append(route.name)
        gemm.meta["kernel"]["decode_tables"] = {"chunk": DECODE_CHUNK}
    mem = g.meta["memory"]
    one = align_up(int(mem["by_chunk"][str(DECODE_CHUNK)]["peak_bytes"]))
    arena = int(mem["arena_bytes"])
    spare = max(int(pre.get("budget_bytes") or 0) - int(pre.get("resident_bytes") or 0), 0)
    kinds = ["prefill_slot"] * int(pre.get("slots", 0)) + ["arena_tail", "spare_budget"]
    sizes = [prefill_slot_bytes(g)] * int(pre.get("slots", 0)) + [max(arena - one, 0), spare]
    streamed = sum(l["n_experts"] - l["first_streamed"] for l in layers)
    cap = min(streamed, options.decode_cache_slots or streamed)
    offsets = carve(sizes, slot_bytes, cap)
    n = sum(len(o) for o in offsets)
    # one token's streamed experts of one layer must all be on the device at once
    k = max(min(l["k"], l["n_experts"] - l["first_streamed"]) for l in layers)
    info = {"policy": options.decode_cache, "slot_bytes": slot_bytes, "slots": n, "split_points": split,
            "layers": layers, "cold_experts": "copy", "decode_chunk": DECODE_CHUNK,
            "bytes_per_token_all": sum((l["n_experts"] - l["first_streamed"]) *
                                       sum(t["src_expert_bytes"] for t in l["tensors"]) for l in layers),
            "regions": [{"kind": kind, "bytes": b, "slots": len(o)} for kind, b, o in zip(kinds, sizes, offsets)]}
    info["protected_slots"] = int(n * options.decode_cache_protected) if options.decode_cache == "slru" else 0
    if n < k:
        info.update(policy="off", slots=0, protected_slots=0, regions=[],
                    why=f"the spare memory holds {n} expert slots of {slot_bytes} bytes, fewer than the {k} "
                        f"streamed experts a token may route to in one layer: decode streams every expert "
                        f"as prefill does")
        for nd in g.by_op(Op.MOE_GROUPED_GEMM):
            nd.meta.get("kernel", {}).pop("decode_tables", None)
    else:
        info["why"] = (f"{n} one-expert slots ({n * slot_bytes / 2**20:.1f} MiB) of {streamed} streamed experts "
                       f"in memory idle while decoding; misses copied after each streamed layer's router")
    g.meta["decode_cache"] = info
    return PassResult(g, True)
