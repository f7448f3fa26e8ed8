"""schedule_expert_prefetch: fit a model under a VRAM budget by streaming experts.

What stays resident: every dense weight in its device form (passes/lower_cuda.py), the KV cache
at `max_context` (bf16, as the CUDA runtime keeps it), the DeltaNet states, the arena of one
chunk (activations and every launch's workspace, passes/plan_memory.py) and a fixed reserve;
then as many
experts as fit, counted per expert (choose_split): a streamed layer keeps its first E - m experts
on the device and streams its last m through one of `slots` device buffers (two slots: one
layer's experts arrive while the previous streamed layer computes). The grouped GEMM reads a
split layer's experts through an expert table, resident and streamed alike. The streamed
experts are spread over the layers, so a slot holds a small part of a layer, not a whole one:
the device memory the slots take, and with it the bytes moved per chunk, shrink.

Each streamed layer gets a FETCH_WEIGHTS node in front of its expert consumers. It may start as
soon as its slot is free (the last consumer of the slot's previous layer has run) - usually long
before the layer itself - and is issued right after that dependency on the copy stream. When a
chunk is small enough that routing touches under half of the experts, the fetch is "routed":
it waits for the layer's routing, which the runtime reads on the host to copy only the routed
experts (segment_graphs cuts the capture there).

graph.meta["prefetch"] records the budget, the resident bytes by kind (never over the budget),
the pinned and streamed layers, bytes moved per chunk and a predicted timeline (transfer time,
compute time, fraction of transfer hidden under compute) for given link and compute rates.
On a lowered graph the pass also writes what the runtime must do differently: FETCH_WEIGHTS
nodes get their kernel record ("stream.fetch"), a split layer's grouped GEMM reads its experts
through expert tables, the embedding may be gathered on the host, the LM head's all-rows block
shrinks, and graph.meta["weights"] says which experts of each tensor stay resident.
"""
from __future__ import annotations

import numpy as np

from ggfuse.errors import GGFuseError
from ggfuse.ir.graph import Graph, Value
from ggfuse.ir.ops import OPS, Op
from ggfuse.ir.ops_fused_moe import moe_operands
from ggfuse.ir.types import DType, nbytes_of
from ggfuse.options import parse_bytes as _parse_bytes
from ggfuse.passes import plan_memory
from ggfuse.passes.base import PassResult
from ggfuse.passes.lower_cuda import HEAD_BLOCK_LEAN, form_bytes, state_bytes

# device memory outside the plan's buffers: CUDA graphs, NVRTC modules, expert tables, cuBLAS's
# handle. Measured on the H100 for the 35B-A3B at 2048 tokens under 12 GiB: 32.5 MiB besides
# the CuPy pool (tools/gpu_memstages.py, session 4); 96 MiB leaves room for other drivers.
RESERVE_BYTES = 96 << 20
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_H2D_GBPS = 54.0        # measured pinned host->device on the lent H100 (PCIe Gen5)
DEFAULT_TFLOPS = 300.0         # sustained tensor-core rate assumed for the prediction
DEFAULT_MOE_TFLOPS = 120.0     # the quantised grouped GEMMs (measured 124-184 on the H100, 35B-A3B)
MAX_PIECES = 4                 # fetches per streamed layer (slots = pieces + 1)

def parse_bytes(s) -> int:
    """'12GiB', '12GB', '1.5g', '12884901888' -> bytes (ggfuse.options.parse_bytes)."""
    return _parse_bytes(s, "--vram-budget")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def _wbytes(node) -> int:
    n = 1
    for d in node.outputs[0].shape:
        n *= int(d)
    return nbytes_of(DType.from_ggml(node.attrs.get("ggml_type", node.outputs[0].dtype.ggml_name)), n)


def expert_layers(g: Graph) -> dict[int, list]:
    """Stacked expert weights (rank-3 WEIGHT nodes) by layer (the frontend's meta["layer"])."""
    out: dict[int, list] = {}
    for n in g.weights():
        if n.outputs[0].rank == 3 and n.meta.get("layer") is not None:
            out.setdefault(int(n.meta["layer"]), []).append(n)
    return dict(sorted(out.items()))


def _host_gatherable(g: Graph, op: Op):
    """(tensor name, bytes of one row) of a table read only by one `op` node (GET_ROWS,
    PLE_GATHER) of the chunk's token ids, which the runtime can then gather on the host. Else None."""
    for n in g.by_op(op):
        w, ids = g.node(n.inputs[0].node), g.node(n.inputs[1].node)
        if w.op != Op.WEIGHT or ids.op != Op.INPUT or ids.attrs.kind != "tokens":
            continue
        same = [x for x in g.weights() if x.attrs.tensor == w.attrs.tensor]
        if [u.id for x in same for u in g.users(x.id)] != [n.id]:
            continue        # e.g. an embedding tied to the LM head: the table stays resident
        rows = int(w.outputs[0].shape[0])
        return w.attrs.tensor, _wbytes(w) // rows
    return None


def gathered_embedding(g: Graph):
    """(tensor name, bytes of one row) of an embedding table the runtime can gather on the host:
    a weight read only by one GET_ROWS of the chunk's token ids (not a tied LM head). Else None."""
    return _host_gatherable(g, Op.GET_ROWS)


def gathered_ple(g: Graph):
    """(tensor name, bytes of one row) of a per-layer-embedding table (Gemma 4's
    per_layer_token_embd: [V, L*P], 2-3 GB on E2B / E4B) the runtime can gather on the host: a
    weight read only by one PLE_GATHER of the chunk's token ids. Else None."""
    return _host_gatherable(g, Op.PLE_GATHER)


def _device_bytes(g: Graph, n) -> int:
    """Device bytes of a weight: its lowered forms (graph.meta["weights"]), else as stored."""
    w = (g.meta.get("weights") or {}).get(n.attrs.tensor)
    return int(w["device_bytes"]) if w else _wbytes(n)


def fixed_bytes(g: Graph, *, chunk: int, max_context: int, reserve: int = RESERVE_BYTES,
                lean: bool = False) -> dict:
    """What stays on the device besides the experts, by kind: the arena counts every launch's
    workspace (the lowering declares it). lean (a plan that must save memory): the embedding
    table and a per-layer-embedding table are gathered on the host (only the chunk's rows are
    on the device: "embedding_rows", "ple_rows"); the all-rows LM head's small block is the
    caller's (lean_head)."""
    experts = {n.id for ns in expert_layers(g).values() for n in ns}
    gathered = gathered_embedding(g) if lean else None
    ple = gathered_ple(g) if lean else None
    host = {t[0] for t in (gathered, ple) if t is not None}
    dense = {}
    for n in g.weights():
        if n.id not in experts and n.attrs.tensor not in host:
            dense[n.attrs.tensor] = _device_bytes(g, n)
    kv = sum(state_bytes_of(g, n, max_context) for n in g.states().values() if n.attrs.get("state") == "kv_cache")
    ssm = sum(state_bytes_of(g, n, max_context) for n in g.states().values() if n.attrs.get("state") != "kv_cache")
    out = {"dense_weights": sum(dense.values()), "kv_cache": kv, "ssm_state": ssm,
           "arena": plan_memory.arena_bytes(g, chunk), "reserve": reserve}
    if gathered is not None:
        out["embedding_rows"] = chunk * gathered[1] + chunk * 4     # the chunk's rows and their index
    if ple is not None:
        out["ple_rows"] = chunk * ple[1] + chunk * 4
    return out


def state_bytes_of(g: Graph, n, max_context: int) -> int:
    """One state input's device bytes (lower_cuda.state_bytes of a graph holding only it)."""
    sub = Graph()
    sub._insert(n)
    return state_bytes(sub, max_context)


def lean_head(g: Graph) -> None:
    """The all-rows LM head in blocks of HEAD_BLOCK_LEAN rows (a budgeted plan: time to first
    token never runs it), its workspace resized to match, on a lowered graph."""
    from ggfuse.kernels.dense.launch import lm_head_workspace
    for n in g.by_op(Op.LM_HEAD):
        rec = n.meta.get("kernel")
        if rec is None:
            continue
        rec["block_rows"] = HEAD_BLOCK_LEAN
        N = int(g.type_of(n.inputs[1]).shape[0])
        n.meta["workspace"] = {c: lm_head_workspace(min(int(c), HEAD_BLOCK_LEAN), N) for c in n.meta.get("workspace", {})}


def stream_order(layers: list[int]) -> list[int]:
    """The order in which layers start streaming as the budget shrinks: spread through the
    stack (a van der Corput sequence over positions), so any prefix is spread too, and the first
    layer last (its fetch has no earlier compute to hide under). choose_split hands surplus
    slot capacity back to residency in the reverse of this order."""
    def vdc(i: int) -> float:
        x, f = 0.0, 0.5
        while i:
            x += f * (i & 1)
            i >>= 1
            f /= 2
        return x
    n = len(layers)
    ranks = sorted(range(n), key=lambda i: (i == 0, vdc(i)))
    return [layers[i] for i in ranks]


SLOT_ALIGN = 256      # each streamed tensor starts 256-byte aligned in its slot (runtime/cuda/streaming.py)


def align_up(n: int, a: int = SLOT_ALIGN) -> int:
    """n rounded up to a multiple of a (default: the slot layout's alignment, which the runtime's
    slots and weight block use too)."""
    return -(-n // a) * a


def slot_size(expert_bytes: list[int], m: int) -> int:
    """Slot bytes for the last m experts of a layer whose tensors have these per-expert bytes:
    each tensor's part 256-byte aligned, back to back (the runtime's slot layout)."""
    return sum(align_up(m * b) for b in expert_bytes) if m else 0


def piece_sizes(m: int, k: int) -> list[int]:
    """m streamed experts cut into k contiguous pieces, as even as can be (larger first), no
    empty piece (fewer pieces when m < k)."""
    k = max(1, min(k, m))
    return [m // k + (1 if i < m % k else 0) for i in range(k)] if m else []


def _least_slot(expert_bytes, cand_layers, E, per, total, avail, slots, pieces, order):
    """choose_split over the layers cand_layers (the others whole): ({layer: m}, slot bytes) of
    the least slot that carries what must move, or None."""
    tables = {l: np.array([slot_size(expert_bytes[l], m) for m in range(E + 1)], dtype=np.int64)
              for l in cand_layers}
    cands = np.unique(np.concatenate([t[1:] for t in tables.values()]))
    # experts per piece a slot of c bytes holds; a layer streams up to `pieces` such pieces
    ms = np.stack([np.minimum(E, pieces * (np.searchsorted(tables[l], cands, side="right") - 1))
                   for l in cand_layers])
    b = np.array([per[l] for l in cand_layers], dtype=np.int64)
    moved = (ms * b[:, None]).sum(0)
    need = total - avail + slots * cands
    ok = np.flatnonzero((moved >= need) & (slots * cands <= avail))
    if not ok.size:
        return None
    i = int(ok[0])
    m = {l: int(ms[j, i]) for j, l in enumerate(cand_layers)}
    excess = int(moved[i] - need[i])
    first = next(iter(expert_bytes))
    for l in [first] + [x for x in reversed(order) if x != first]:
        if l in m and excess > 0:
            d = min(m[l], excess // per[l])
            m[l] -= d
            excess -= d * per[l]
    m = {l: v for l, v in m.items() if v > 0}
    s = max(slot_size(expert_bytes[l], piece_sizes(v, pieces)[0]) for l, v in m.items())
    resident = total - sum(v * per[l] for l, v in m.items())
    assert resident + slots * s <= avail, "choose_split over the room"
    return dict(sorted(m.items())), s


def choose_split(expert_bytes: dict[int, list[int]], n_experts: int, avail: int, pieces: int = 1):
    """How many experts of each MoE layer stream: ({layer: m}, slots, slot bytes), or
    (None, None, None) when not even one layer's experts fit beside a slot.

    expert_bytes: per layer, the bytes of one expert of each stacked tensor. A streamed layer
    keeps its first E - m experts resident and streams its last m (the grouped GEMM reads both
    through an expert table), so residency is per expert, not per layer: the resident expert
    bytes fill the budget to within an expert per layer.

    The streamed experts of a layer arrive in `pieces` fetches (contiguous expert ranges), each
    into its own slot, through pieces + 1 slots: while a layer computes, the next layer's first
    piece already lands in the spare slot, and its other pieces follow into the slots the layer
    before it just released. With one piece that is the classic two buffers; with k pieces the
    slots hold (k + 1) / k of a layer's streamed bytes instead of 2.

    Bytes moved per chunk = everything that is not resident = total - (avail - slots * s) for
    slots of s bytes; so the plan wants the smallest slot that can still carry the rest: the
    least s with sum_l m_l(s) * b_l >= total - avail + slots * s, m_l(s) the most experts of
    layer l that `pieces` slots of s bytes hold. Spreading the streamed experts over every layer
    makes s a small part of a layer. With no room for pieces + 1 slots, one slot (one piece).
    The first layer stays whole unless that moves over 1% more (its fetch has no earlier compute
    to hide under). Where the least slot carries more than needed, the surplus goes back to
    residency, layer 0 first, then in reverse stream_order."""
    E = n_experts
    per = {l: sum(bs) for l, bs in expert_bytes.items()}
    total = E * sum(per.values())
    if total <= avail:
        return {}, 0, 0
    layers = list(expert_bytes)
    order = stream_order(layers)
    for slots, k in ((pieces + 1, pieces), (1, 1)):
        plans = []
        for cand_layers in ([l for l in layers if l != layers[0]], layers):
            if len(cand_layers) * k > slots:
                plan = _least_slot(expert_bytes, cand_layers, E, per, total, avail, slots, k, order)
                if plan is not None:
                    plans.append(plan)
        if plans:
            # the first layer whole unless that moves over 1% more
            moved = [sum(v * per[l] for l, v in m.items()) for m, _ in plans]
            m, s = plans[0] if moved[0] <= 1.01 * moved[-1] else plans[-1]
            return m, slots, s
    return None, None, None


def _routing_input(g: Graph, consumer) -> Value | None:
    """The routing value a routed fetch waits for: the expert offsets of a fused grouped GEMM
    (which experts got tokens), or the expert ids of a plain per-token expert matmul."""
    i32 = [v for v in consumer.inputs if g.type_of(v).dtype == DType.I32]
    return i32[-1] if i32 else None


def _layer_flops(g: Graph, chunk: int, only=None) -> dict[int, float]:
    env = {"T": chunk, "P": 0}
    per: dict[int, float] = {}
    for n in g.nodes():
        d = OPS[n.op]
        if not d.flops or n.op == Op.WEIGHT or (only is not None and n.op not in only):
            continue
        f = d.flops(n.attrs, [g.type_of(v) for v in n.inputs], n.outputs, env)
        layer = n.meta.get("layer")
        key = -1 if layer is None else int(layer)   # -1: outside the layers (embedding, LM head)
        per[key] = per.get(key, 0) + f
    return per


def simulate(layers: list[int], fetches: list[tuple[int, int]], slots: int, pre_ms: dict[int, float],
             moe_ms: dict[int, float], *, h2d_gbps: float, routed: bool, tail_ms: float = 0.0) -> dict:
    """A two-stream timeline of one chunk. Compute runs the layers in order, each its pre-MoE
    part (pre_ms: attention or DeltaNet, routing) then its MoE (moe_ms), which waits for all of
    the layer's fetches. The copy stream runs the fetches (layer, bytes) in order, fetch i into
    slot i % slots once that slot's previous layer has run its MoE (and, routed, once its own
    layer's routing is known)."""
    by_layer: dict[int, list] = {}
    for i, (l, nb) in enumerate(fetches):
        by_layer.setdefault(l, []).append((i % slots, nb / (h2d_gbps * 1e9) * 1e3))
    t = copy_free = stall = 0.0
    slot_free = [0.0] * max(slots, 1)
    total_x = 0.0
    for l in layers:
        attn_end = t + pre_ms.get(l, 0.0)
        ready = attn_end
        mine = by_layer.get(l, [])
        for slot, ms in mine:
            start = max(copy_free, slot_free[slot], attn_end if routed else 0.0)
            copy_free = start + ms
            total_x += ms
            ready = max(ready, copy_free)
        stall += ready - attn_end
        t = ready + moe_ms.get(l, 0.0)
        for slot, _ in mine:
            slot_free[slot] = t
    return {"compute_ms": round(sum(pre_ms.values()) + sum(moe_ms.values()) + tail_ms, 4),
            "transfer_ms": round(total_x, 4), "chunk_ms": round(t + tail_ms, 4),
            "hidden_fraction": round(1.0 - stall / total_x, 4) if total_x else 1.0}


def run(g: Graph, *, chunk: int, budget=None, max_context: int = DEFAULT_MAX_CONTEXT,
        h2d_gbps: float = DEFAULT_H2D_GBPS, tflops: float = DEFAULT_TFLOPS,
        moe_tflops: float = DEFAULT_MOE_TFLOPS) -> PassResult:
    g = g.copy()
    layers = expert_layers(g)
    # the runtime reserve scales down for toy budgets (tests force streaming on tiny models)
    reserve = RESERVE_BYTES if budget is None else min(RESERVE_BYTES, parse_bytes(budget) // 16)
    fixed = fixed_bytes(g, chunk=chunk, max_context=max_context, reserve=reserve)
    layer_bytes = {l: sum(_wbytes(n) for n in ns) for l, ns in layers.items()}
    total_experts = sum(layer_bytes.values())
    fixed_total = sum(fixed.values())
    info = {"budget_bytes": None, "fixed_bytes": fixed, "expert_bytes_total": total_experts,
            "max_context": max_context, "chunk": chunk, "pinned_layers": list(layers), "streamed_layers": [],
            "slots": 0, "slot_bytes": 0, "mode": "resident", "bytes_moved_per_chunk": 0,
            "resident_bytes": fixed_total + total_experts, "policy": "all resident"}
    if budget is None:
        g.meta["prefetch"] = info
        return PassResult(g, False)
    budget = parse_bytes(budget)
    info["budget_bytes"] = budget
    if fixed_total + total_experts <= budget:
        info["policy"] = "all resident (fits the budget)"
        g.meta["prefetch"] = info
        return PassResult(g, False)
    # the budget is short: shed the fixed costs the prefill does not need on the device (the
    # embedding table: the runtime gathers the chunk's rows on the host; the all-rows LM head's
    # block: small), then stream experts
    lean_head(g)
    fixed = fixed_bytes(g, chunk=chunk, max_context=max_context, reserve=reserve, lean=True)
    fixed_total = sum(fixed.values())
    emb = gathered_embedding(g)
    # recorded for the runtime (absent from resident plans: embedding resident, a 128-row head block)
    info.update(fixed_bytes=fixed, head_block=HEAD_BLOCK_LEAN, resident_bytes=fixed_total + total_experts,
                embedding="resident")
    if emb is not None:
        info.update(embedding="host-gathered", embedding_tensor=emb[0], embedding_row_bytes=emb[1])
        _gather_on_host(g, emb[0])
    ple = gathered_ple(g)
    if ple is not None:
        # Gemma 4's per-layer embeddings: the chunk's rows gathered from the mapped file on the
        # host and uploaded with the chunk's inputs (the previous chunk runs meanwhile)
        info.update(ple="host-gathered", ple_tensor=ple[0], ple_row_bytes=ple[1])
        _gather_on_host(g, ple[0], op=Op.PLE_GATHER)
    avail = budget - fixed_total
    E = next(iter(layers.values()))[0].outputs[0].shape[0] if layers else 0
    per_expert = {l: [_wbytes(n) // E for n in ns] for l, ns in layers.items()}
    per = {l: sum(b) for l, b in per_expert.items()}
    k_used = int(g.meta.get("hparams", {}).get("n_expert_used", 1) or 1)
    hit = E * (1.0 - (1.0 - k_used / E) ** chunk) if E else 0.0  # expected distinct experts per layer
    routed = hit < 0.5 * E
    frac = hit / E if routed else 1.0
    flops = _layer_flops(g, chunk)
    moe_fl = _layer_flops(g, chunk, only=(Op.MOE_GROUPED_GEMM,))
    model_layers = sorted(set(flops) - {-1})
    pre_ms = {l: (flops.get(l, 0.0) - moe_fl.get(l, 0.0)) / (tflops * 1e12) * 1e3 for l in model_layers}
    moe_ms = {l: moe_fl.get(l, 0.0) / (moe_tflops * 1e12) * 1e3 for l in model_layers}
    tail_ms = flops.get(-1, 0.0) / (tflops * 1e12) * 1e3

    def plan_for(pieces):
        split, slots, slot_bytes = choose_split(per_expert, E, avail, pieces) if layers else ({}, 0, 0)
        if not split:
            return split, slots, slot_bytes, 1, [], None
        k = pieces if slots == pieces + 1 else 1
        fetches = [(l, int(m * per[l] * frac)) for l in sorted(split) for m in piece_sizes(split[l], k)]
        pred = simulate(model_layers, fetches, slots, pre_ms, moe_ms, h2d_gbps=h2d_gbps, routed=routed,
                        tail_ms=tail_ms)
        return split, slots, slot_bytes, k, fetches, pred

    # pieces per layer: the most that the predicted timeline still likes (each piece must cover
    # the previous layer's MoE with copies); ties within 0.5% go to fewer pieces
    options = [plan_for(k) for k in range(1, MAX_PIECES + 1)]
    best = options[0]
    for o in options[1:]:
        if o[5] is not None and best[5] is not None and o[5]["chunk_ms"] < 0.995 * best[5]["chunk_ms"]:
            best = o
    split, slots, slot_bytes, pieces, fetch_list, pred = best
    if split is None:
        need = fixed_total + (max(layer_bytes.values()) if layer_bytes else 0)
        raise GGFuseError(None, f"--vram-budget {_gib(budget)} is too small: dense weights, KV cache at "
                                f"{max_context} tokens, states, arena and reserve take {_gib(fixed_total)} and one "
                                f"layer's experts {_gib(max(layer_bytes.values(), default=0))} more; the minimum is "
                                f"{_gib(need)} (or lower --max-context / --chunk)")
    if not split:
        info["policy"] = "all experts resident (fits the budget with the embedding gathered on the host)"
        g.meta["prefetch"] = info
        return PassResult(g, False)

    streamed = sorted(split)
    moved = {l: int(split[l] * per[l] * frac) for l in streamed}
    # one FETCH_WEIGHTS per piece, chained (each passes the layer's weights on to the next, the
    # layer's expert consumers read the last one's); fetch i into slot i % slots, after the last
    # consumer of that slot's previous layer (and, routed, after the layer's routing)
    slot_release: list = [None] * slots
    i = 0
    for l in streamed:
        ws = layers[l]
        users = [g.node(u) for u in sorted({u.id for w in ws for u in g.users(w.id)})]
        cur = [w.out for w in ws]
        e0 = E - split[l]
        used_slots = []
        for q, m in enumerate(piece_sizes(split[l], pieces)):
            s_ = i % slots
            control = [slot_release[s_]] if slot_release[s_] is not None else []
            if routed:
                ids = _routing_input(g, users[0])
                if ids is not None:
                    control.append(ids)
            dep = max((v.node for v in control), default=-1)
            fetched = g.add(Op.FETCH_WEIGHTS, cur + control, name=f"blk.{l}.fetch_experts" + (f".{q}" if q else ""),
                            n_weights=len(ws), mode="routed" if routed else "all", layer=l, slot=s_,
                            bytes=int(m * per[l] * frac), stream="copy", first_expert=e0, end_expert=e0 + m,
                            meta={"sched_key": dep + 0.5})
            cur = list(fetched) if isinstance(fetched, tuple) else [fetched]
            used_slots.append(s_)
            e0 += m
            i += 1
        for w, fv in zip(ws, cur):
            for u in users:
                if w.out in u.inputs:
                    g.replace_node(u.id, inputs=tuple(fv if x == w.out else x for x in g.node(u.id).inputs))
        # the slots are free again once the layer's last expert consumer has run
        last = max(users, key=lambda u: u.id)
        for s_ in used_slots:
            slot_release[s_] = last.out
    pinned = [l for l in layers if l not in split]
    resident_experts = sum(layer_bytes.values()) - sum(split[l] * per[l] for l in streamed)
    info.update({
        "pinned_layers": pinned, "streamed_layers": streamed, "slots": slots, "slot_bytes": slot_bytes,
        "pieces_per_layer": pieces,
        "streamed_experts": {str(l): split[l] for l in streamed}, "n_experts": int(E),
        "mode": "routed" if routed else "all",
        "expected_experts_hit_per_layer": round(hit, 2),
        "bytes_moved_per_chunk": sum(moved.values()),
        "resident_bytes": fixed_total + resident_experts + slots * slot_bytes,
        "policy": "experts resident per layer (each streamed layer keeps its first experts and streams its last "
                  f"ones in {pieces} piece(s) through {slots} slot(s), spread over the layers so the slots are "
                  "small); layers whole where they fit",
        "predicted": {**pred, "h2d_gbps": h2d_gbps, "tflops": tflops, "moe_tflops": moe_tflops},
    })
    assert info["resident_bytes"] <= budget, "prefetch plan over budget"
    _record_streaming(g, layers, split, E)
    g.meta["prefetch"] = info
    return PassResult(g, True)


def _gather_on_host(g: Graph, tensor: str, op: Op = Op.GET_ROWS) -> None:
    """The runtime gathers the embedding's rows on the host (lowered graphs: the lookup's kernel
    reads the chunk's uploaded rows; the table is not uploaded); op PLE_GATHER: a per-layer
    embedding table's."""
    for n in g.by_op(op):
        if g.node(n.inputs[0].node).op == Op.WEIGHT and g.tensor_of(n.inputs[0]) == tensor and "kernel" in n.meta:
            n.meta["kernel"]["source"] = "host"
    w = (g.meta.get("weights") or {}).get(tensor)
    if w is not None:
        w["residency"] = "host-gathered"
        w["device_bytes"] = 0


def _record_streaming(g: Graph, layers: dict, split: dict, E: int) -> None:
    """On a lowered graph: each fetch's kernel, which experts of each tensor stay resident, and
    the grouped GEMMs that read a split layer through expert tables."""
    if "lowering" not in g.meta:
        return
    for n in g.by_op(Op.FETCH_WEIGHTS):
        n.meta["kernel"] = {"name": "stream.fetch", "mode": n.attrs.mode, "slot": int(n.attrs.slot)}
    weights = g.meta.get("weights") or {}
    for l, m in split.items():
        first = E - m
        whole = first == 0 and len([f for f in g.by_op(Op.FETCH_WEIGHTS) if int(f.attrs.layer) == l]) == 1
        for w in layers[l]:
            rec = weights.get(w.attrs.tensor)
            if rec is not None:
                rec["residency"] = "streamed" if whole else "split"
                rec["resident_experts"] = first
                rec["device_bytes"] = int(rec["device_bytes"]) * first // E
        if not whole:
            mine = {w.attrs.tensor for w in layers[l]}
            for n in g.by_op(Op.MOE_GROUPED_GEMM):
                experts = moe_operands(n.attrs, n.inputs).experts
                if {g.tensor_of(v) for v in experts} & mine and "kernel" in n.meta:
                    n.meta["kernel"]["expert_tables"] = True
