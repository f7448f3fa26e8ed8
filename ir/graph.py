"""The dataflow graph: frozen nodes in a networkx DiGraph.

A node has an op, named attributes, typed outputs and a `meta` dict for analyses (liveness,
segment ids, ...). Values are (node, output index) pairs, written %12 or %12.1. Graph outputs
are named values: "logits" and one per carried state, whose name equals its INPUT's name, so
the runtime feeds each state output back as the next chunk's input.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping

import networkx as nx

from ggfuse.ir.ops import OPS, Op, infer
from ggfuse.ir.types import TensorType


class Attrs(Mapping):
    """Frozen, attribute-accessed node attributes with JSON-able values (lists become tuples)."""

    __slots__ = ("_d",)

    def __init__(self, d: Mapping | None = None, **kw):
        items = {**(dict(d) if d else {}), **kw}
        object.__setattr__(self, "_d", {k: _freeze(v) for k, v in sorted(items.items())})

    def __getattr__(self, k):
        try:
            return self._d[k]
        except KeyError:
            raise AttributeError(f"node has no attribute {k!r}") from None

    def __setattr__(self, k, v):
        raise AttributeError("Attrs are frozen")

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def __eq__(self, other):
        return isinstance(other, Attrs) and self._d == other._d

    def __repr__(self):
        return "{" + ", ".join(f"{k}={v!r}" for k, v in self._d.items()) + "}"

    def get(self, k, default=None):
        return self._d.get(k, default)

    def updated(self, **kw) -> "Attrs":
        return Attrs(self._d, **kw)

    def to_json(self) -> dict:
        return {k: _thaw(v) for k, v in self._d.items()}


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return v.item()
    return v


def _thaw(v):
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


@dataclass(frozen=True, order=True)
class Value:
    node: int
    index: int = 0

    def __str__(self):
        return f"%{self.node}" if self.index == 0 else f"%{self.node}.{self.index}"

    @classmethod
    def parse(cls, s: str) -> "Value":
        body = s.lstrip("%")
        if "." in body:
            n, i = body.split(".")
            return cls(int(n), int(i))
        return cls(int(body), 0)


@dataclass(frozen=True)
class Node:
    id: int
    op: Op
    inputs: tuple[Value, ...]
    attrs: Attrs
    outputs: tuple[TensorType, ...]
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def out(self) -> Value:
        return Value(self.id, 0)

    def value(self, i: int = 0) -> Value:
        return Value(self.id, i)


class Graph:
    def __init__(self, name: str = ""):
        self.name = name
        self._g = nx.DiGraph()
        self._next = 0
        self.outputs: dict[str, Value] = {}
        self.meta: dict = {}

    # ---- building ----------------------------------------------------------------------------
    def add(self, op: Op, inputs: Iterable[Value] = (), *, name: str = "", attrs: Mapping | None = None,
            outputs: tuple[TensorType, ...] | None = None, meta: dict | None = None, **kw):
        """Add a node; returns its Value, or a tuple of Values for multi-output ops."""
        op = Op(op)
        inputs = tuple(inputs)
        for v in inputs:
            if v.node not in self._g:
                raise KeyError(f"{op.value}: input {v} is not in the graph")
        a = Attrs(attrs or {}, **kw)
        outs = outputs if outputs is not None else infer(op, a, [self.type_of(v) for v in inputs])
        nid = self._next
        self._next += 1
        node = Node(nid, op, inputs, a, tuple(outs), name, dict(meta or {}))
        self._g.add_node(nid, node=node)
        for v in inputs:
            self._g.add_edge(v.node, nid)
        if len(outs) == 1:
            return node.out
        return tuple(node.value(i) for i in range(len(outs)))

    def _insert(self, node: Node):
        self._g.add_node(node.id, node=node)
        for v in node.inputs:
            self._g.add_edge(v.node, node.id)
        self._next = max(self._next, node.id + 1)

    def set_output(self, name: str, v: Value):
        self.outputs[name] = v

    # ---- reading -----------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self._g.nodes[nid]["node"]

    def __contains__(self, nid) -> bool:
        return nid in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def nodes(self) -> list[Node]:
        """All nodes in id order."""
        return [self._g.nodes[n]["node"] for n in sorted(self._g.nodes)]

    def topo(self) -> list[Node]:
        """Deterministic topological order (ties broken by node id)."""
        # A node may ask to be issued right after another (meta "sched_key": that id + 0.5), as
        # the expert prefetch does; everything else keeps its id order.
        key = lambda n: (self._g.nodes[n]["node"].meta.get("sched_key", n), n)  # noqa: E731
        return [self._g.nodes[n]["node"] for n in nx.lexicographical_topological_sort(self._g, key=key)]

    def type_of(self, v: Value) -> TensorType:
        node = self.node(v.node)
        if v.index >= len(node.outputs):
            raise KeyError(f"{v}: node has {len(node.outputs)} outputs")
        return node.outputs[v.index]

    def users(self, nid: int) -> list[Node]:
        return [self.node(s) for s in sorted(self._g.successors(nid))]

    def uses_of(self, v: Value) -> list[tuple[Node, int]]:
        return [(u, i) for u in self.users(v.node) for i, x in enumerate(u.inputs) if x == v]

    def inputs(self) -> dict[str, Node]:
        return {n.attrs.key: n for n in self.nodes() if n.op == Op.INPUT}

    def weights(self) -> list[Node]:
        return [n for n in self.nodes() if n.op == Op.WEIGHT]

    def states(self) -> dict[str, Node]:
        """Carried-state inputs (KV cache, conv window, recurrent state) by name."""
        return {k: n for k, n in self.inputs().items() if n.attrs.kind == "state"}

    def tensor_of(self, v: Value) -> str:
        """The GGUF tensor a weight value reads, through RESHAPE views and FETCH_WEIGHTS (whose
        output i is its input i)."""
        while True:
            n = self.node(v.node)
            if n.op == Op.WEIGHT:
                return n.attrs.tensor
            if n.op == Op.FETCH_WEIGHTS:
                v = n.inputs[v.index]
            elif n.op == Op.RESHAPE:
                v = n.inputs[0]
            else:
                raise KeyError(f"{v} is not a weight ({n.op.value} {n.name})")

    def by_op(self, op: Op) -> list[Node]:
        return [n for n in self.nodes() if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes():
            counts[n.op.value] = counts.get(n.op.value, 0) + 1
        return dict(sorted(counts.items()))

    def predecessors(self, nid: int) -> list[int]:
        return sorted(self._g.predecessors(nid))

    @property
    def nx(self) -> nx.DiGraph:
        return self._g

    # ---- rewriting (for passes, on a copy) ---------------------------------------------------
    def copy(self) -> "Graph":
        g = Graph(self.name)
        g._g = self._g.copy()
        for n in g._g.nodes:  # meta is per-graph: analyses on the copy must not leak back
            node = g._g.nodes[n]["node"]
            g._g.nodes[n]["node"] = replace(node, meta=dict(node.meta))
        g._next = self._next
        g.outputs = dict(self.outputs)
        g.meta = json.loads(json.dumps(self.meta))
        return g

    def replace_uses(self, old: Value, new: Value):
        """Point every use of `old` (node inputs and graph outputs) at `new`."""
        for u in self.users(old.node):
            if old in u.inputs:
                ins = tuple(new if x == old else x for x in u.inputs)
                self._g.nodes[u.id]["node"] = replace(u, inputs=ins)
                if old.node not in {x.node for x in ins}:
                    self._g.remove_edge(old.node, u.id)
                self._g.add_edge(new.node, u.id)
        for k, v in self.outputs.items():
            if v == old:
                self.outputs[k] = new

    def replace_node(self, nid: int, **changes):
        """Swap a node for a copy with some fields changed (inputs keep edges in sync)."""
        old = self.node(nid)
        new = replace(old, **changes)
        if "inputs" in changes:
            for p in list(self._g.predecessors(nid)):
                self._g.remove_edge(p, nid)
            for v in new.inputs:
                self._g.add_edge(v.node, nid)
        self._g.nodes[nid]["node"] = new
        return new

    def set_meta(self, nid: int, **kw):
        self.node(nid).meta.update(kw)

    def remove(self, nid: int):
        self._g.remove_node(nid)

    def dce(self) -> int:
        """Drop nodes nothing reaches the outputs from. Returns how many were removed."""
        live = set()
        stack = [v.node for v in self.outputs.values()]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(self._g.predecessors(n))
        dead = [n for n in self._g.nodes if n not in live]
        self._g.remove_nodes_from(dead)
        return len(dead)
