"""Deterministic (de)serialisation of graphs: sorted JSON, nodes in id order."""
from __future__ import annotations

import json

from ggfuse.ir.graph import Attrs, Graph, Node, Value
from ggfuse.ir.ops import Op
from ggfuse.ir.types import TensorType


def node_to_json(n: Node, with_meta: bool = True) -> dict:
    d = {
        "id": n.id,
        "op": n.op.value,
        "name": n.name,
        "inputs": [str(v) for v in n.inputs],
        "attrs": n.attrs.to_json(),
        "outputs": [t.to_json() for t in n.outputs],
    }
    if with_meta and n.meta:
        d["meta"] = json.loads(json.dumps(n.meta, sort_keys=True, default=str))
    return d


def graph_to_json(g: Graph, with_meta: bool = True) -> dict:
    return {
        "name": g.name,
        "nodes": [node_to_json(n, with_meta) for n in g.nodes()],
        "outputs": {k: str(v) for k, v in sorted(g.outputs.items())},
        "meta": g.meta,
    }


def graph_from_json(d: dict) -> Graph:
    g = Graph(d.get("name", ""))
    for nd in d["nodes"]:
        node = Node(
            id=int(nd["id"]),
            op=Op(nd["op"]),
            inputs=tuple(Value.parse(s) for s in nd["inputs"]),
            attrs=Attrs(nd["attrs"]),
            outputs=tuple(TensorType.from_json(t) for t in nd["outputs"]),
            name=nd.get("name", ""),
            meta=dict(nd.get("meta", {})),
        )
        g._insert(node)
    g.outputs = {k: Value.parse(v) for k, v in d["outputs"].items()}
    g.meta = d.get("meta", {})
    return g


def dumps(g: Graph) -> str:
    return json.dumps(graph_to_json(g), sort_keys=True, indent=1)


def loads(s: str) -> Graph:
    return graph_from_json(json.loads(s))
