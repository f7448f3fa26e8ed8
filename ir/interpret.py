"""The oracle: execute any graph with the numpy reference ops, freeing each value after its
last use."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ggfuse.ir.graph import Graph, Node
from ggfuse.ir.ops import OPS, Op
from ggfuse.ir.types import shape_eval


def interpret(g: Graph, feeds: Mapping[str, np.ndarray], weight: Callable[[Node], Any],
              env: Mapping[str, int], order: list[Node] | None = None) -> dict[str, np.ndarray]:
    """Run `g`. feeds: INPUT name -> array; weight(node) -> array or lazy weight; env binds the
    shape symbols (T, P). order: g.topo(), when the caller keeps it for a graph that no longer
    changes (the cpu device runs the same graph every chunk). Returns every named graph output."""
    vals = _run(g, feeds, weight, env, keep_all=False, order=order)
    return {k: vals[v] for k, v in g.outputs.items()}


def interpret_values(g: Graph, feeds: Mapping[str, np.ndarray], weight: Callable[[Node], Any],
                     env: Mapping[str, int]) -> dict:
    """As interpret, but every value the graph computes, by Value (for node-by-node
    comparisons: tools/gpu_debug_compare.py)."""
    return _run(g, feeds, weight, env, keep_all=True)


def _run(g: Graph, feeds, weight, env, *, keep_all: bool, order=None) -> dict:
    order = g.topo() if order is None else order
    last_use: dict = {}
    for i, n in enumerate(order):
        for v in n.inputs:
            last_use[v] = i
    keep = set(g.outputs.values())
    vals: dict = {}
    for i, n in enumerate(order):
        if n.op == Op.INPUT:
            name = n.attrs.key
            if name not in feeds:
                raise KeyError(f"no value fed for graph input {name!r}")
            x = feeds[name]
            want = shape_eval(n.outputs[0].shape, env)
            if tuple(x.shape) != want:
                raise ValueError(f"input {name!r} has shape {x.shape}, graph expects {want}")
            outs = (x,)
        elif n.op == Op.WEIGHT:
            outs = (weight(n),)
        else:
            args = [vals[v] for v in n.inputs]
            outs = OPS[n.op].ref(n.attrs, env, *args)
        for j, o in enumerate(outs):
            vals[n.value(j)] = o
        if not keep_all:
            for v in n.inputs:
                if last_use.get(v) == i and v not in keep:
                    vals.pop(v, None)
    return vals
