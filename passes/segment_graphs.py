"""segment_graphs: cut a chunk's schedule into capturable regions.

A region is a maximal run of the schedule with no host synchronisation inside; the CUDA runtime
captures each region as one CUDA graph and replays it. The only ops that need the host are
routed-only expert fetches: the runtime must read the layer's routing on the host to know which
experts to copy, so a new region starts at each of them. With everything resident a whole chunk
is one region.

Results: node.meta["segment"] = region index; graph.meta["segments"] = [{"id", "n_nodes",
"first", "last", "starts_with"}].
"""
from __future__ import annotations

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.passes.base import PassResult


def needs_host(node) -> bool:
    return node.op == Op.FETCH_WEIGHTS and node.attrs.mode == "routed"


def run(g: Graph) -> PassResult:
    g = g.copy()
    seg = 0
    segments = [{"id": 0, "n_nodes": 0, "first": None, "last": None, "starts_with": "chunk start"}]
    for n in g.topo():
        if needs_host(n) and segments[-1]["n_nodes"] > 0:
            seg += 1
            segments.append({"id": seg, "n_nodes": 0, "first": None, "last": None,
                             "starts_with": f"host sync: routed fetch {n.name or n.id}"})
        n.meta["segment"] = seg
        s = segments[-1]
        s["n_nodes"] += 1
        s["first"] = n.id if s["first"] is None else s["first"]
        s["last"] = n.id
    g.meta["segments"] = segments
    return PassResult(g, True)
