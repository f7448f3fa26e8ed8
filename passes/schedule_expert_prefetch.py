"""schedule_expert_prefetch: fit a model under a VRAM budget by streaming experts.

What stays resident: every dense weight, the KV cache at `max_context` (bf16, as the CUDA
runtime keeps it), the DeltaNet states, the activation arena of one chunk, the runtime's
per-op scratch for that chunk (runtime/cuda/workspace.py) and a fixed reserve; then the MoE layers' experts whose bytes fill the rest best ("pinned layers", a small
knapsack over the layers' sizes: choose_streamed). The other layers' experts live in host memory
and move into `slots` device buffers, each the size of the largest streamed layer (two slots:
one layer's experts arrive while the previous streamed layer computes).

Each streamed layer gets a FETCH_WEIGHTS node in front of its expert consumers. It may start as
soon as its slot is free (the last consumer of the slot's previous layer has run) - usually long
before the layer itself - and is issued right after that dependency on the copy stream. When a
chunk is small enough that routing touches under half of the experts, the fetch is "routed":
it waits for the layer's routing, which the runtime reads on the host to copy only the routed
experts (segment_graphs cuts the capture there).

graph.meta["prefetch"] records the budget, the resident bytes by kind (never over the budget),
the pinned and streamed layers, bytes moved per chunk and a predicted timeline (transfer time,
compute time, fraction of transfer hidden under compute) for given link and compute rates.
"""
from __future__ import annotations

import re

import numpy as np

from ggfuse.errors import GGFuseError
from ggfuse.ir.graph import Graph, Value
from ggfuse.ir.ops import OPS, Op
from ggfuse.ir.types import DType, nbytes_of, shape_eval
from ggfuse.passes import plan_memory
from ggfuse.passes.base import PassResult

RESERVE_BYTES = 256 << 20      # CUDA graphs, NVRTC modules, routing scratch
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_H2D_GBPS = 54.0        # measured pinned host->device on the lent H100 (PCIe Gen5)
DEFAULT_TFLOPS = 300.0         # sustained tensor-core rate assumed for the prediction

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(s) -> int:
    """'12GiB', '12GB', '1.5g', '12884901888' -> bytes."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise GGFuseError(None, f"cannot read {s!r} as a size (use e.g. 12GiB, 12GB, 12000000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def _layer(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _wbytes(node) -> int:
    n = 1
    for d in node.outputs[0].shape:
        n *= int(d)
    return nbytes_of(DType.from_ggml(node.attrs.get("ggml_type", node.outputs[0].dtype.ggml_name)), n)


def expert_layers(g: Graph) -> dict[int, list]:
    """Stacked expert weights (rank-3 WEIGHT nodes) by layer."""
    out: dict[int, list] = {}
    for n in g.weights():
        if n.outputs[0].rank == 3 and _layer(n.attrs.tensor) is not None:
            out.setdefault(_layer(n.attrs.tensor), []).append(n)
    return dict(sorted(out.items()))


def gathered_embedding(g: Graph):
    """(tensor name, bytes of one row) of an embedding table the runtime can gather on the host:
    a weight read only by one GET_ROWS of the chunk's token ids (not a tied LM head). Else None."""
    for n in g.by_op(Op.GET_ROWS):
        w, ids = g.node(n.inputs[0].node), g.node(n.inputs[1].node)
        if w.op != Op.WEIGHT or ids.op != Op.INPUT or ids.attrs.kind != "tokens":
            continue
        same = [x for x in g.weights() if x.attrs.tensor == w.attrs.tensor]
        if [u.id for x in same for u in g.users(x.id)] != [n.id]:
            continue        # e.g. tied to the LM head: the table stays resident
        rows = int(w.outputs[0].shape[0])
        return w.attrs.tensor, _wbytes(w) // rows
    return None


def fixed_bytes(g: Graph, *, chunk: int, max_context: int, reserve: int = RESERVE_BYTES,
                lean: bool = False) -> dict:
    """What stays on the device besides the experts, by kind. lean (a plan that must save
    memory): the embedding table is gathered on the host (only the chunk's rows are on the
    device: "embedding_rows") and the all-rows LM head uses small blocks (workspace.head_block)."""
    experts = {n.id for ns in expert_layers(g).values() for n in ns}
    gathered = gathered_embedding(g) if lean else None
    dense = {}
    for n in g.weights():
        if n.id not in experts and (gathered is None or n.attrs.tensor != gathered[0]):
            dense[n.attrs.tensor] = _wbytes(n)
    kv = ssm = 0
    for name, n in g.states().items():
        t = n.outputs[0]
        numel = 1
        for d in shape_eval(t.shape, {"P": max_context, "T": 0}):
            numel *= d
        if "P" in str(t.shape[0]):
            kv += numel * 2          # bf16 KV cache
        else:
            ssm += numel * 4         # f32 conv window and recurrent state
    intervals, _ = plan_memory.buffers(g, chunk)
    _, arena = plan_memory.place(intervals)
    from ggfuse.runtime.cuda.workspace import head_block, total_workspace_bytes
    out = {"dense_weights": sum(dense.values()), "kv_cache": kv, "ssm_state": ssm, "arena": arena,
           "workspace": total_workspace_bytes(g, chunk, head_block=head_block(lean)), "reserve": reserve}
    if gathered is not None:
        out["embedding_rows"] = chunk * gathered[1] + chunk * 4     # the chunk's rows and their index
    return out


def stream_order(layers: list[int]) -> list[int]:
    """The order in which layers start streaming as the budget shrinks: spread through the
    stack (a van der Corput sequence over positions), so any prefix is spread too, and the first
    layer last (its fetch has no earlier compute to hide under). choose_streamed decides how
    many layers of each size stream and takes them in this order."""
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


KNAPSACK_UNITS = 1 << 17     # the pinned-set knapsack counts bytes in units of total/KNAPSACK_UNITS


def _knapsack(sizes: list[int], room: int, unit: int) -> list[int]:
    """Indices of `sizes` to pin: the most bytes whose sizes, each rounded up to whole `unit`s,
    fit `room // unit` units (so they fit `room` bytes). 0/1 knapsack by dynamic programming
    over units: exact up to less than one unit per layer."""
    cap = room // unit
    if cap < 0:
        return None
    w = [-(-s // unit) for s in sizes]
    best = np.full(cap + 1, -1, dtype=np.int64)    # most bytes using exactly u units
    best[0] = 0
    take = np.zeros((len(sizes), cap + 1), dtype=bool)
    for i, (s, wi) in enumerate(zip(sizes, w)):
        if wi > cap:
            continue
        prev = best[: cap + 1 - wi]
        cand = np.where(prev >= 0, prev + s, -1)
        better = cand > best[wi:]
        take[i, wi:] = better
        best[wi:] = np.where(better, cand, best[wi:])
    u = int(np.argmax(best))                        # ties: the fewest units
    out = []
    for i in range(len(sizes) - 1, -1, -1):
        if take[i, u]:
            out.append(i)
            u -= w[i]
    return sorted(out)


def choose_streamed(layer_bytes: dict[int, int], avail: int):
    """(streamed layers, slots), or (None, None) when not even one layer's slot fits.

    Two slots whenever they fit, so one layer's experts arrive while the previous streamed layer
    computes: at real sizes a chunk's compute is shorter than its transfers, so hiding transfer
    under compute beats pinning one more layer. A slot holds the largest STREAMED layer, so the
    pinned set and the slot size are chosen together: for each layer size s that could be the
    largest streamed one, every larger layer is pinned, and among the layers of size <= s the
    pinned set with the most bytes that fits the room left (avail - 2 s - the larger layers) is
    a small knapsack (_knapsack); the candidate pinning the most bytes wins (ties: the smaller
    slot). A larger budget leaves every candidate more room, so it never streams more bytes.
    Which layers of a size stream follows stream_order (spread through the stack, layer 0 last).
    With room for one slot only, every layer streams through it."""
    total = sum(layer_bytes.values())
    if total <= avail:
        return [], 0
    order = stream_order(list(layer_bytes))
    unit = max(1, -(-total // KNAPSACK_UNITS))
    best = None                                     # (pinned bytes, -slot bytes, pinned layers)
    for s in sorted(set(layer_bytes.values())):
        forced = [l for l, b in layer_bytes.items() if b > s]
        room = avail - 2 * s - sum(layer_bytes[l] for l in forced)
        if room < 0:
            continue
        cands = [l for l, b in layer_bytes.items() if b <= s]
        picked = _knapsack([layer_bytes[l] for l in cands], room, unit)
        count: dict[int, int] = {}
        for i in picked:
            count[layer_bytes[cands[i]]] = count.get(layer_bytes[cands[i]], 0) + 1
        # which layers of each size: the last ones in stream order stay (layer 0 first of all)
        pinned = set(forced)
        for size, k in count.items():
            same = [l for l in order if layer_bytes[l] == size]
            pinned.update(same[len(same) - k:])
        key = (sum(layer_bytes[l] for l in pinned), -s)
        if len(pinned) < len(layer_bytes) and (best is None or key > best[:2]):
            best = (*key, pinned)
    if best is not None:
        return sorted(l for l in layer_bytes if l not in best[2]), 2
    if avail < max(layer_bytes.values()):
        return None, None
    return sorted(order), 1


def _routing_input(g: Graph, consumer) -> Value | None:
    """The routing value a routed fetch waits for: the expert offsets of a fused grouped GEMM
    (which experts got tokens), or the expert ids of a plain per-token expert matmul."""
    i32 = [v for v in consumer.inputs if g.type_of(v).dtype == DType.I32]
    return i32[-1] if i32 else None


def _layer_flops(g: Graph, chunk: int) -> dict[int, float]:
    env = {"T": chunk, "P": 0}
    per: dict[int, float] = {}
    for n in g.nodes():
        d = OPS[n.op]
        if not d.flops or n.op == Op.WEIGHT:
            continue
        f = d.flops(n.attrs, [g.type_of(v) for v in n.inputs], n.outputs, env)
        layer = _layer(n.name)
        key = -1 if layer is None else layer   # -1: outside the layers (embedding, LM head)
        per[key] = per.get(key, 0) + f
    return per


def simulate(layers: list[int], streamed: list[int], slots: int, bytes_moved: dict[int, int],
             flops: dict[int, float], *, h2d_gbps: float, tflops: float, routed: bool) -> dict:
    """A two-stream timeline of one chunk: compute runs the layers in order; the copy stream
    runs the fetches in order, each once its slot is free (and, routed, once routing is known)."""
    comp = {l: flops.get(l, 0.0) / (tflops * 1e12) * 1e3 for l in layers}  # ms
    xfer = {l: bytes_moved[l] / (h2d_gbps * 1e9) * 1e3 for l in streamed}
    t = 0.0
    copy_free = 0.0
    slot_free = [0.0] * max(slots, 1)
    done = {}
    stall = 0.0
    fetch_end = {}
    order = {l: j for j, l in enumerate(streamed)}
    for l in layers:
        attn_end = t + comp[l] * 0.5           # routing is known mid-layer
        if l in order:
            j = order[l]
            s = j % slots
            start = max(copy_free, slot_free[s], attn_end if routed else 0.0)
            fetch_end[l] = start + xfer[l]
            copy_free = fetch_end[l]
            ready = fetch_end[l]
            if ready > attn_end:
                stall += ready - attn_end
            t = max(attn_end, ready) + comp[l] * 0.5
            slot_free[s] = t
        else:
            t = attn_end + comp[l] * 0.5
        done[l] = t
    total_x = sum(xfer.values())
    return {"compute_ms": round(sum(comp.values()), 4), "transfer_ms": round(total_x, 4),
            "chunk_ms": round(t + comp.get(-1, 0.0), 4),
            "hidden_fraction": round(1.0 - stall / total_x, 4) if total_x else 1.0}


def run(g: Graph, *, chunk: int, budget=None, max_context: int = DEFAULT_MAX_CONTEXT,
        h2d_gbps: float = DEFAULT_H2D_GBPS, tflops: float = DEFAULT_TFLOPS) -> PassResult:
    from ggfuse.runtime.cuda.workspace import head_block
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
    fixed = fixed_bytes(g, chunk=chunk, max_context=max_context, reserve=reserve, lean=True)
    fixed_total = sum(fixed.values())
    emb = gathered_embedding(g)
    # recorded for the runtime (absent from resident plans: embedding resident, workspace.HEAD_BLOCK)
    info.update(fixed_bytes=fixed, head_block=head_block(True), resident_bytes=fixed_total + total_experts,
                embedding="resident")
    if emb is not None:
        info.update(embedding="host-gathered", embedding_tensor=emb[0], embedding_row_bytes=emb[1])
    avail = budget - fixed_total
    streamed, slots = choose_streamed(layer_bytes, avail) if layers else ([], 0)
    if streamed is None:
        need = fixed_total + (max(layer_bytes.values()) if layer_bytes else 0)
        raise GGFuseError(None, f"--vram-budget {_gib(budget)} is too small: dense weights, KV cache at "
                                f"{max_context} tokens, states, arena and reserve take {_gib(fixed_total)} and one "
                                f"layer's experts {_gib(max(layer_bytes.values(), default=0))} more; the minimum is "
                                f"{_gib(need)} (or lower --max-context / --chunk)")
    if not streamed:
        info["policy"] = "all experts resident (fits the budget with the embedding gathered on the host)"
        g.meta["prefetch"] = info
        return PassResult(g, False)

    E = next(iter(layers.values()))[0].outputs[0].shape[0]
    k = int(g.meta.get("hparams", {}).get("n_expert_used", 1) or 1)
    hit = E * (1.0 - (1.0 - k / E) ** chunk)  # expected distinct experts per layer (uniform routing)
    routed = hit < 0.5 * E
    frac = hit / E if routed else 1.0
    slot_bytes = max(layer_bytes[l] for l in streamed)     # the largest streamed layer
    moved = {l: int(layer_bytes[l] * frac) for l in streamed}

    prev_release: list = [None] * slots
    for j, l in enumerate(streamed):
        ws = layers[l]
        users = [g.node(u) for u in sorted({u.id for w in ws for u in g.users(w.id)})]
        control = []
        s = j % slots
        if prev_release[s] is not None:
            control.append(prev_release[s])
        if routed:
            ids = _routing_input(g, users[0])
            if ids is not None:
                control.append(ids)
        inputs = [w.out for w in ws] + control
        dep = max((v.node for v in control), default=-1)
        fetched = g.add(Op.FETCH_WEIGHTS, inputs, name=f"blk.{l}.fetch_experts", n_weights=len(ws),
                        mode="routed" if routed else "all", layer=l, slot=s, bytes=moved[l], stream="copy",
                        meta={"sched_key": dep + 0.5})
        fetched = fetched if isinstance(fetched, tuple) else (fetched,)
        fetch_id = fetched[0].node
        for w, fv in zip(ws, fetched):
            for u in users:
                if w.out in u.inputs:
                    g.replace_node(u.id, inputs=tuple(fv if x == w.out else x for x in g.node(u.id).inputs))
        # the slot is free again once the layer's last expert consumer has run
        last = max(users, key=lambda u: u.id)
        prev_release[s] = last.out
        assert fetch_id in g
    flops = _layer_flops(g, chunk)
    pred = simulate(sorted(set(flops) - {-1}), streamed, slots, moved, flops,
                    h2d_gbps=h2d_gbps, tflops=tflops, routed=routed)
    pinned = [l for l in layers if l not in streamed]
    info.update({
        "pinned_layers": pinned, "streamed_layers": streamed, "slots": slots, "slot_bytes": slot_bytes,
        "mode": "routed" if routed else "all",
        "expected_experts_hit_per_layer": round(hit, 2),
        "bytes_moved_per_chunk": sum(moved.values()),
        "resident_bytes": fixed_total + sum(layer_bytes[l] for l in pinned) + slots * slot_bytes,
        "policy": "pinned layers: the most expert bytes that fit (knapsack over layer sizes); the others "
                  f"stream through {slots} slot(s) of the largest streamed layer",
        "predicted": {**pred, "h2d_gbps": h2d_gbps, "tflops": tflops},
    })
    assert info["resident_bytes"] <= budget, "prefetch plan over budget"
    g.meta["prefetch"] = info
    return PassResult(g, True)
