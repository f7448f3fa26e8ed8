"""plan_memory: give every activation and every launch's workspace an offset in one arena, at
each chunk size the runtime captures.

Liveness over the schedule (the graph's deterministic topological order) gives each buffer a
[first step, last step] interval; buffers are placed largest first at the lowest offset that
overlaps no buffer live at the same time (greedy by size, as TFLite's arena planner does).
Sizes use each value's storage dtype (lower_cuda's meta["storage"]: bf16 activations take half).
A launch's workspace (lower_cuda's meta["workspace"]) lives during its own step only; the LM
head's runs after the chunk's last step, with the head's inputs still live. A one-row product
that another one's launch computes (by_chunk "in_group") is live from that launch's step; the
inputs of a step folded into a later one (by_chunk "folded_into") live to that one's step.
Not in the arena: weights and fetched expert slots (weight memory), carried states and the
KV-cache values that become them (state buffers, sized by the context, not the chunk), the
logits (the LM head writes them into its workspace block by block), and views (SLICE, and a
RESHAPE the lowering made a view: they own no bytes and keep their input alive; a RESHAPE that
copies owns its buffer).

Results, for each captured size c (graph.meta["lowering"]["captures"], else the chunk alone):
node.meta["arena"][str(c)] = [offset or None per output], node.meta["workspace_at"][str(c)] =
{name: offset}; graph.meta["memory"] = {"chunk", "peak_bytes", "naive_bytes", "alignment",
"n_buffers" (of the main chunk), "by_chunk": {str(c): {"peak_bytes", "naive_bytes",
"n_buffers"}}, "arena_bytes" (the largest peak: one arena serves every size)}.
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph, Value
from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType, nbytes_of, shape_eval
from ggfuse.passes.base import PassResult

ALIGN = 256
_NOT_ARENA = (Op.WEIGHT, Op.FETCH_WEIGHTS)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_view(n) -> bool:
    """SLICE, and a RESHAPE unless the lowering made it a copy."""
    if n.op == Op.SLICE:
        return True
    return n.op == Op.RESHAPE and n.meta.get("kernel", {}).get("name", "view") == "view"


def _storage(n, i: int, t) -> DType:
    st = n.meta.get("storage")
    return DType(st[i]) if st else t.dtype


def buffers(g: Graph, chunk: int):
    """(intervals, alias): intervals {key: [first step, last step, bytes]} of every arena buffer
    (key: a root Value, or ("ws", node id, name) for a launch's workspace) and the alias map
    {value: root value} of views."""
    order = g.topo()
    step = {n.id: i for i, n in enumerate(order)}
    state_vals = {g.outputs[k] for k in g.states() if k in g.outputs}
    # the logits leave through the LM head's own buffers (the head runs after the chunk's
    # graph, for every row in blocks, for the last row only, or not at all): no arena bytes
    # for them, and the head's inputs stay live to the end of the chunk
    logits = g.outputs.get("logits")
    head = g.node(logits.node) if logits is not None else None
    head_inputs = set(head.inputs) if head is not None else set()
    if logits is not None:
        state_vals.add(logits)
    alias: dict[Value, Value] = {}
    intervals: dict = {}
    env = {"T": chunk, "P": 0}
    last = len(order)
    key = str(chunk)
    by_name = {n.name: n for n in order if n.name}
    for n in order:
        if n.op in _NOT_ARENA or (n.op == Op.INPUT and n.attrs.kind == "state"):
            continue
        for i, t in enumerate(n.outputs):
            v = n.value(i)
            if v in state_vals:
                continue
            if is_view(n) and n.inputs[0] in alias:
                alias[v] = alias[n.inputs[0]]
                continue
            alias[v] = v
            nb = nbytes_of(_storage(n, i, t), max(1, _numel(t.shape, env)))
            first = step[n.id]
            lead = ((n.meta.get("kernel") or {}).get("by_chunk") or {}).get(key, {}).get("in_group")
            if lead is not None:           # written by its group's first launch (lower_cuda _group_decode_gemvs)
                first = min(first, step[by_name[lead].id])
            intervals[v] = [first, step[n.id], _aligned(nb)]
        ws = (n.meta.get("workspace") or {}).get(key) or {}
        at = last if head is not None and n.id == head.id else step[n.id]
        for name, nb in sorted(ws.items()):
            intervals[("ws", n.id, name)] = [at, at, _aligned(max(int(nb), 1))]
    for n in order:
        # a step another one does (by_chunk "folded_into": the decode delta rule's l2 norms and
        # gates) reads its inputs at that one's step
        into = ((n.meta.get("kernel") or {}).get("by_chunk") or {}).get(key, {}).get("folded_into")
        at = step[by_name[into].id] if into is not None else step[n.id]
        for v in n.inputs:
            root = alias.get(v)
            if root is not None and root in intervals:
                intervals[root][1] = max(intervals[root][1], step[n.id], at)
    for v in list(g.outputs.values()) + list(head_inputs):  # live to the end of the chunk
        root = alias.get(v)
        if root is not None and root in intervals:
            intervals[root][1] = last
    return intervals, alias


def _numel(shape, env) -> int:
    n = 1
    for d in shape_eval(shape, env):
        n *= d
    return n


def _sort_key(kv):
    k, (first, last, size) = kv
    return (-size, first, str(k))


def place(intervals: dict) -> tuple[dict, int]:
    """Greedy by size: largest buffers first, lowest non-conflicting offset."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets = {}
    peak = 0
    for v, (first, last, size) in sorted(intervals.items(), key=_sort_key):
        busy = sorted((o, o + s) for o, s, f, l in placed if not (l < first or last < f))
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        placed.append((off, size, first, last))
        offsets[v] = off
        peak = max(peak, off + size)
    return offsets, peak


def arena_bytes(g: Graph, chunk: int) -> int:
    """The planned peak of one chunk (activations and workspace)."""
    return place(buffers(g, chunk)[0])[1]


def check_no_overlap(intervals: dict, offsets: dict) -> None:
    """Raise if two buffers live at the same time share bytes (used by the tests)."""
    items = sorted(intervals.items(), key=lambda kv: offsets[kv[0]])
    for i, (v, (f1, l1, s1)) in enumerate(items):
        o1 = offsets[v]
        for w, (f2, l2, s2) in items[i + 1:]:
            o2 = offsets[w]
            if o2 >= o1 + s1:
                break
            if not (l1 < f2 or l2 < f1):
                raise AssertionError(f"{v} [{o1}, {o1 + s1}) and {w} [{o2}, {o2 + s2}) overlap while both live")


def run(g: Graph, *, chunk: int) -> PassResult:
    g = g.copy()
    sizes = list((g.meta.get("lowering") or {}).get("captures") or [chunk])
    if chunk not in sizes:
        sizes = [chunk] + sizes
    by_chunk = {}
    for n in g.nodes():
        n.meta.pop("arena", None)
        n.meta.pop("workspace_at", None)
    for c in sizes:
        key = str(c)
        intervals, alias = buffers(g, c)
        offsets, peak = place(intervals)
        for n in g.nodes():
            offs = []
            for i in range(len(n.outputs)):
                root = alias.get(n.value(i))
                offs.append(offsets.get(root) if root is not None else None)
            if any(o is not None for o in offs):
                n.meta.setdefault("arena", {})[key] = offs
        for k, off in offsets.items():
            if isinstance(k, tuple):
                _, nid, name = k
                g.node(nid).meta.setdefault("workspace_at", {}).setdefault(key, {})[name] = off
        by_chunk[key] = {"peak_bytes": peak, "naive_bytes": sum(s for _, _, s in intervals.values()),
                         "n_buffers": len(intervals)}
    main = by_chunk[str(chunk)]
    g.meta["memory"] = {"chunk": chunk, **main, "alignment": ALIGN, "by_chunk": by_chunk,
                        "arena_bytes": max(b["peak_bytes"] for b in by_chunk.values())}
    return PassResult(g, True)
