"""A small generic pattern rewriter: local fusions written as data (tinygrad's PatternMatcher +
graph_rewrite, cut down to what ggfuse needs).

A `Rule` pairs a `Pat` - a tree of ops, node predicates and capture names, matched against a
node and its producers - with a `build` function that adds the replacement nodes. `rewrite`
applies a rule list on a copy of the graph until no rule matches.

    Pat(Op.ROPE, Pat(Op.RMS_NORM, cap("x"), cap("w"), sole_use=True, name="norm"), cap("pos"))

Whether an intermediate may be fused away is part of the pattern: `sole_use=True` says its only
reader is the matched node above it, so the rewrite makes it dead and no work is duplicated.
An intermediate without it is "kept": it may have other readers, and `build` either re-exports it
(ADD_RMS_NORM's sum) or leaves it computed where it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import networkx as nx

from ggfuse.ir.graph import Graph, Node, Value
from ggfuse.ir.ops import Op


@dataclass(frozen=True, init=False)
class Pat:
    """Matches one value. With op None it matches any value (a leaf: captured, not looked into).

    inputs: sub-patterns for the node's inputs, in order (None: inputs not inspected; else the
      node must have exactly that many). commute: a two-input node may match them swapped.
    name: capture the value; a name used twice must bind the same value both times.
    where: extra predicate on the producing node (attributes, op details).
    index: which output of its producer the value must be (op patterns only).
    """
    op: Union[Op, tuple, None] = None
    inputs: Optional[tuple] = None
    name: Optional[str] = None
    where: Optional[Callable[[Node], bool]] = None
    sole_use: bool = False
    commute: bool = False
    index: int = 0

    def __init__(self, op=None, *inputs,  # positional inputs read like the graph: Pat(Op.MUL, a, b)
                 name=None, where=None, sole_use=False, commute=False, index=0):
        for k, v in dict(op=op, inputs=tuple(inputs) if inputs else None, name=name, where=where,
                         sole_use=sole_use, commute=commute, index=index).items():
            object.__setattr__(self, k, v)


def cap(name: str) -> Pat:
    """A leaf capturing any value."""
    return Pat(None, name=name)


class Match:
    """What a pattern bound: captured values by name, and the op nodes it walked (root first)."""

    def __init__(self, g: Graph, root: Node, values: dict, nodes: tuple):
        self.g, self.root, self.values, self.nodes = g, root, values, nodes

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def node(self, name: str) -> Node:
        return self.g.node(self.values[name].node)

    def type(self, name: str):
        return self.g.type_of(self.values[name])


# build(g, m) adds the new nodes and returns the value that replaces the root, or a mapping
# {capture name: new value} for several replaced values, or None to decline the match.
Build = Callable[[Graph, Match], Union[Value, Mapping[str, Value], None]]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pat
    build: Build


class RewriteError(RuntimeError):
    pass


# ---- matching --------------------------------------------------------------------------------

def _sole_use(g: Graph, v: Value, user: Node) -> bool:
    return v not in g.outputs.values() and all(u.id == user.id for u, _ in g.uses_of(v))


def _match(g: Graph, p: Pat, v: Value, user: Optional[Node], st):
    """Match p against value v (read by `user`); st = (captures, walked nodes). Returns the
    extended state or None. States are copied, not mutated, so commute can backtrack."""
    caps, walked = st
    if p.name is not None and p.name in caps and caps[p.name] != v:
        return None
    node = g.node(v.node)
    if p.op is not None:
        if node.op not in (p.op if isinstance(p.op, tuple) else (p.op,)) or v.index != p.index:
            return None
    if p.sole_use and user is not None and not _sole_use(g, v, user):
        return None
    if p.where is not None and not p.where(node):
        return None
    if p.name is not None:
        caps = {**caps, p.name: v}
    if p.op is None:
        return caps, walked
    walked = walked + ((node, p.sole_use),)
    if p.inputs is None:
        return caps, walked
    if len(node.inputs) != len(p.inputs):
        return None
    orders = [p.inputs] + ([p.inputs[::-1]] if p.commute and len(p.inputs) == 2 else [])
    for order in orders:
        s = (caps, walked)
        for sub, x in zip(order, node.inputs):
            s = _match(g, sub, x, node, s)
            if s is None:
                break
        if s is not None:
            return s
    return None


def match(g: Graph, p: Pat, node: Node) -> Optional[Match]:
    """Match p rooted at node's output p.index, or None."""
    if p.index >= len(node.outputs):
        return None
    st = _match(g, p, node.value(p.index), None, ({}, ()))
    if st is None:
        return None
    caps, walked = st
    m = Match(g, node, caps, walked)
    return m if not _would_cycle(g, m) else None


def _would_cycle(g: Graph, m: Match) -> bool:
    """A kept intermediate may be redirected to a new node's output; if a captured input of the
    new node depends on it, that would close a cycle. (The root is safe: captures precede it.)"""
    kept = [n for n, sole in m.nodes[1:] if not sole]
    if not kept:
        return False
    walked = {n.id for n, _ in m.nodes}
    leaves = [v for v in m.values.values() if v.node not in walked]
    for k in kept:
        for v in leaves:
            # a direct input of k cannot depend on k (the graph is acyclic); skips the long search
            if v not in k.inputs and nx.has_path(g.nx, k.id, v.node):
                return True
    return False


# ---- rewriting -------------------------------------------------------------------------------

def _apply(g: Graph, rule: Rule, m: Match) -> bool:
    first_new = g._next
    out = rule.build(g, m)
    if out is None:
        return False
    layer = m.root.meta.get("layer")
    if layer is not None:       # the replacement belongs to the root's layer (frontend meta)
        for nid in range(first_new, g._next):
            if nid in g:
                g.node(nid).meta.setdefault("layer", layer)
    repl = {m.root.value(rule.pattern.index): out} if isinstance(out, Value) else \
        {m.values[k]: v for k, v in out.items()}
    may_replace = {m.root.id} | {n.id for n, sole in m.nodes if not sole}
    for old, new in repl.items():
        if old.node not in may_replace:
            raise RewriteError(f"rule {rule.name}: replaces {old}, which is neither the root nor a kept intermediate")
        if g.type_of(old) != g.type_of(new):
            raise RewriteError(f"rule {rule.name} at %{m.root.id} ({m.root.name!r}): replacement of {old} "
                               f"has type {g.type_of(new)}, expected {g.type_of(old)}")
        g.replace_uses(old, new)
    # Drop the matched nodes that nothing reads any more (root first, then its producers).
    outputs = {v.node for v in g.outputs.values()}
    for n, _ in m.nodes:
        if n.id in g and not g.users(n.id) and n.id not in outputs:
            g.remove(n.id)
    return True


def rewrite(g: Graph, rules: list[Rule], *, max_sweeps: int = 100) -> tuple[Graph, int]:
    """Apply `rules` to a copy of g until none matches. Returns (new graph, number of rewrites).

    Deterministic: each sweep visits the nodes in g.topo() order and tries the rules in list
    order; the first rule that matches (and whose build does not decline) rewrites that node.
    Nodes made during a sweep are visited by the next one.
    """
    g = g.copy()
    total = 0
    for _ in range(max_sweeps):
        n_sweep = 0
        for nid in [n.id for n in g.topo()]:
            if nid not in g:  # removed by an earlier rewrite in this sweep
                continue
            for rule in rules:
                m = match(g, rule.pattern, g.node(nid))
                if m is not None and _apply(g, rule, m):
                    n_sweep += 1
                    break
        total += n_sweep
        if n_sweep == 0:
            return g, total
    raise RewriteError(f"rules {[r.name for r in rules]} did not reach a fixed point in {max_sweeps} sweeps")
