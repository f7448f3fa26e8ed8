"""Cost figures of a graph at a given chunk: FLOPs, weight bytes, activation bytes."""
from __future__ import annotations

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import OPS, Op
from ggfuse.ir.types import DType, nbytes_of, shape_eval


def weight_bytes(g: Graph) -> dict[str, dict]:
    """Bytes and count of the distinct weights, by ggml type."""
    seen = {}
    for n in g.weights():
        t = n.attrs.get("ggml_type", n.outputs[0].dtype.ggml_name)
        numel = 1
        for d in n.outputs[0].shape:
            numel *= int(d)
        seen[n.attrs.tensor] = (t, nbytes_of(DType.from_ggml(t), numel))
    by_type: dict[str, dict] = {}
    for t, nb in seen.values():
        e = by_type.setdefault(t, {"count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += nb
    return dict(sorted(by_type.items()))


def graph_stats(g: Graph, chunk: int, past: int = 0) -> dict:
    env = {"T": chunk, "P": past}
    flops = 0
    act_bytes = 0
    flops_by_op: dict[str, int] = {}
    for n in g.nodes():
        if n.op in (Op.WEIGHT,):
            continue
        ins = [g.type_of(v) for v in n.inputs]
        d = OPS[n.op]
        f = d.flops(n.attrs, ins, n.outputs, env) if d.flops else 0
        flops += f
        if f:
            flops_by_op[n.op.value] = flops_by_op.get(n.op.value, 0) + f
        for t in n.outputs:
            act_bytes += t.nbytes(env)
    wb = weight_bytes(g)
    return {
        "chunk": chunk,
        "past": past,
        "flops_per_chunk": flops,
        "flops_by_op": dict(sorted(flops_by_op.items())),
        "weight_bytes": sum(e["bytes"] for e in wb.values()),
        "weights_by_type": wb,
        "activation_bytes_naive": act_bytes,
        "bytes_per_chunk": sum(e["bytes"] for e in wb.values()) + act_bytes,
        "op_counts": g.op_counts(),
    }
