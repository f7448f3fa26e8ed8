"""Human views of a graph: one line per node, and Graphviz dot."""
from __future__ import annotations

import re

from ggfuse.ir.graph import Graph, Node
from ggfuse.ir.ops import Op


def _attrs_str(n: Node) -> str:
    if not n.attrs:
        return ""
    parts = []
    for k, v in n.attrs.items():
        s = repr(v) if not isinstance(v, tuple) else "[" + ", ".join(map(str, v)) + "]"
        parts.append(f"{k}={s}")
    return " {" + ", ".join(parts) + "}"


def node_line(g: Graph, n: Node) -> str:
    outs = ", ".join(str(n.value(i)) for i in range(len(n.outputs)))
    types = ", ".join(str(t) for t in n.outputs)
    ins = ", ".join(str(v) for v in n.inputs)
    tag = f"  # {n.name}" if n.name else ""
    return f"{outs} = {n.op.value}({ins}){_attrs_str(n)} : {types}{tag}"


def to_text(g: Graph) -> str:
    lines = [f"graph {g.name} {{"]
    for n in g.topo():
        lines.append("  " + node_line(g, n))
    for k, v in sorted(g.outputs.items()):
        lines.append(f"  output {k} = {v}")
    lines.append("}")
    return "\n".join(lines) + "\n"


_COLORS = {
    Op.INPUT: "lightblue", Op.WEIGHT: "lightgrey", Op.MATMUL: "gold", Op.MUL_MAT_ID: "orange",
    Op.ATTENTION: "salmon", Op.GATED_DELTA_RULE: "palegreen", Op.SSM_CONV: "palegreen",
}


def _layer_of(n: Node):
    m = re.match(r"blk\.([0-9]{1,6})\.", n.name)
    return int(m.group(1)) if m else None


def to_dot(g: Graph, weights: bool = False) -> str:
    """Graphviz source; one cluster per layer, weights hidden unless asked for."""
    def esc(s):       # a name as dot text: its backslashes, quotes and line breaks escaped
        return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")

    def q(s):
        return '"' + esc(s) + '"'

    lines = [f"digraph {q(g.name or 'ggfuse')} {{", "  rankdir=TB;", '  node [shape=box, style=filled, fillcolor=white, fontname="monospace", fontsize=10];']
    shown = {n.id for n in g.nodes() if weights or n.op != Op.WEIGHT}
    by_layer: dict = {}
    for n in g.nodes():
        if n.id in shown:
            by_layer.setdefault(_layer_of(n), []).append(n)
    for layer, nodes in sorted(by_layer.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
        indent = "  "
        if layer is not None:
            lines.append(f"  subgraph cluster_{layer} {{ label={q('layer ' + str(layer))}; color=grey;")
            indent = "    "
        for n in nodes:
            label = "\\n".join((esc(n.op.value), esc(n.name), esc(", ".join(str(t) for t in n.outputs))))
            color = _COLORS.get(n.op, "white")
            lines.append(f'{indent}n{n.id} [label="{label}", fillcolor={color}];')
        if layer is not None:
            lines.append("  }")
    for n in g.nodes():
        if n.id not in shown:
            continue
        for v in n.inputs:
            if v.node in shown:
                lines.append(f"  n{v.node} -> n{n.id};")
    for i, (k, v) in enumerate(sorted(g.outputs.items())):      # ids by position: the same every run
        lines.append(f"  out_{i} [label={q(k)}, shape=oval, fillcolor=lightblue];")
        lines.append(f"  n{v.node} -> out_{i};")
    lines.append("}")
    return "\n".join(lines) + "\n"
