"""plan_memory: give every activation of a chunk an offset in one arena.

Liveness over the schedule (the graph's deterministic topological order) gives each buffer a
[first step, last step] interval; buffers are placed largest first at the lowest offset that
overlaps no buffer live at the same time (greedy by size, as TFLite's arena planner does).
Not in the arena: weights and fetched expert slots (weight memory), carried states and the
KV-cache values that become them (state buffers, sized by the context, not the chunk), the
logits (the runtime writes them to its own output buffer: the LM head runs after the chunk), and
RESHAPE and SLICE outputs (views of their input, whose lifetime they extend: a column slice of
the conv output read after q's norm has run must still find its bytes).

Results: node.meta["arena"] = [offset or None per output]; graph.meta["memory"] =
{"chunk", "peak_bytes", "naive_bytes", "alignment", "n_buffers"}.
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph, Value
from ggfuse.ir.ops import Op
from ggfuse.ir.types import shape_eval, nbytes_of
from ggfuse.passes.base import PassResult

ALIGN = 256
_NOT_ARENA = (Op.WEIGHT, Op.FETCH_WEIGHTS)
# Views of their input, as the runtimes execute them: they own no bytes and keep the input alive.
_VIEWS = (Op.RESHAPE, Op.SLICE)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def buffers(g: Graph, chunk: int):
    """(root value, size, first step, last step) of every arena buffer, and the alias map."""
    order = g.topo()
    step = {n.id: i for i, n in enumerate(order)}
    state_vals = {g.outputs[k] for k in g.states() if k in g.outputs}
    # the logits leave through the runtime's own output buffer (the LM head runs after the
    # chunk's graph, for every row in blocks, for the last row only, or not at all): no arena
    # bytes for them, and the head's inputs stay live to the end of the chunk
    logits = g.outputs.get("logits")
    head_inputs = set(g.node(logits.node).inputs) if logits is not None else set()
    if logits is not None:
        state_vals.add(logits)
    alias: dict[Value, Value] = {}
    intervals: dict[Value, list] = {}
    env = {"T": chunk, "P": 0}
    for n in order:
        if n.op in _NOT_ARENA or (n.op == Op.INPUT and n.attrs.kind == "state"):
            continue
        for i, t in enumerate(n.outputs):
            v = n.value(i)
            if v in state_vals:
                continue
            if n.op in _VIEWS and n.inputs[0] in alias:
                alias[v] = alias[n.inputs[0]]
                continue
            alias[v] = v
            intervals[v] = [step[n.id], step[n.id], _aligned(nbytes_of(t.dtype, max(1, _numel(t.shape, env))))]
    for n in order:
        for v in n.inputs:
            root = alias.get(v)
            if root is not None and root in intervals:
                intervals[root][1] = max(intervals[root][1], step[n.id])
    last = len(order)
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


def place(intervals: dict) -> tuple[dict, int]:
    """Greedy by size: largest buffers first, lowest non-conflicting offset."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets = {}
    peak = 0
    for v, (first, last, size) in sorted(intervals.items(), key=lambda kv: (-kv[1][2], kv[1][0], kv[0])):
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
    intervals, alias = buffers(g, chunk)
    offsets, peak = place(intervals)
    for n in g.nodes():
        offs = []
        for i in range(len(n.outputs)):
            root = alias.get(n.value(i))
            offs.append(offsets.get(root) if root is not None else None)
        if any(o is not None for o in offs):
            n.meta["arena"] = offs
    g.meta["memory"] = {
        "chunk": chunk,
        "peak_bytes": peak,
        "naive_bytes": sum(s for _, _, s in intervals.values()),
        "alignment": ALIGN,
        "n_buffers": len(intervals),
    }
    return PassResult(g, True)
