"""The verifier: a rule per op (arity, dtypes, shapes) re-checked on the whole graph.

Runs after every pass in the tests, and in the driver with --verify / GGFUSE_VERIFY=1.
"""
from __future__ import annotations

import networkx as nx

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import OPS, STATE_KINDS, InferError, Op, infer


class VerifyError(ValueError):
    pass


def verify(g: Graph) -> None:
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(g.nx):
        problems.append("graph has a cycle")
    names: dict[str, int] = {}
    for node in g.nodes():
        where = f"node %{node.id} ({node.op.value} {node.name!r})"
        if node.op not in OPS:
            problems.append(f"{where}: unknown op")
            continue
        d = OPS[node.op]
        lo, hi = d.arity
        if not lo <= len(node.inputs) <= hi:
            problems.append(f"{where}: {len(node.inputs)} inputs, op takes {lo}..{hi}")
            continue
        ok = True
        for v in node.inputs:
            if v.node not in g or v.index >= len(g.node(v.node).outputs):
                problems.append(f"{where}: input {v} does not exist")
                ok = False
            elif v.node not in g.predecessors(node.id):
                problems.append(f"{where}: input {v} has no edge")
        if not ok:
            continue
        try:
            want = infer(node.op, node.attrs, [g.type_of(v) for v in node.inputs])
        except (InferError, AttributeError, KeyError, TypeError) as e:
            problems.append(f"{where}: {e}")
            continue
        if tuple(want) != tuple(node.outputs):
            problems.append(f"{where}: outputs {[str(t) for t in node.outputs]} but rule gives {[str(t) for t in want]}")
        if node.op == Op.INPUT:
            nm = node.attrs.key
            if nm in names:
                problems.append(f"{where}: input name {nm!r} also used by %{names[nm]}")
            names[nm] = node.id
        if node.op == Op.WEIGHT and not node.attrs.get("tensor"):
            problems.append(f"{where}: weight without a tensor name")
        if node.op == Op.INPUT and node.attrs.get("kind") == "state" and node.attrs.get("state") not in STATE_KINDS:
            problems.append(f"{where}: state input of unknown kind {node.attrs.get('state')!r} "
                            f"(kinds: {', '.join(STATE_KINDS)})")
        if node.op == Op.KV_APPEND:
            src = g.node(node.inputs[0].node)
            if src.op != Op.INPUT or src.attrs.get("state") != "kv_cache":
                problems.append(f"{where}: kv_append's cache input is not a kv_cache state")
    for name, v in g.outputs.items():
        if v.node not in g:
            problems.append(f"output {name!r}: {v} does not exist")
    states = g.states()
    for name, node in states.items():
        if name not in g.outputs:
            problems.append(f"state {name!r} has no updated value among the outputs")
        elif g.type_of(g.outputs[name]).rank != node.outputs[0].rank:
            problems.append(f"state {name!r}: output rank differs from input rank")
        else:
            # A runtime updates a state in place: every other reader of the old value must come
            # before the node that writes the new one (Gemma's shared sliding rings have several).
            writer = g.outputs[name].node
            for u in g.users(node.id):
                if u.id != writer and not nx.has_path(g.nx, u.id, writer):
                    problems.append(f"state {name!r} is read by %{u.id} ({u.op.value} {u.name!r}), which the "
                                    f"node writing it (%{writer}) does not depend on: an in-place update could "
                                    f"overwrite it first")
    if problems:
        head = f"graph {g.name!r} fails verification ({len(problems)} problems)"
        raise VerifyError(head + ":\n  " + "\n  ".join(problems[:50]))
