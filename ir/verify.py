"""The verifier: a rule per op (arity, dtypes, shapes) re-checked on the whole graph.

Runs after every pass in the tests, and in the driver with --verify / GGFUSE_VERIFY=1.
"""
from __future__ import annotations

import networkx as nx

import math

from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import OPS, STATE_KINDS, InferError, Op, infer
from ggfuse.ir.types import DType, _parse


class VerifyError(ValueError):
    pass


# ---- attribute rules: per op, each attribute's kind (and range) ---------------------------------
# A plan file is input like any other: the numpy reference and the launchers read these values
# as they are, so a wrong type or an absurd size must stop here, not deep inside an op.
# Kinds: "num" a finite number; ("int", lo, hi); "bool"; "str"; a tuple of strings (choices);
# "ints" a list of ints; "shape" a list of dims (ints or symbolic "T" / "P" expressions).
_BIG = 1 << 31
_EPS = ("num",)
ATTRS: dict[Op, dict[str, object]] = {
    Op.INPUT: {"key": "str", "kind": "str", "shape": "shape",
               "dtype": tuple(d.value for d in DType), "state": STATE_KINDS},
    Op.WEIGHT: {"tensor": "str", "ggml_type": "str", "shape": "shape", "dtype": tuple(d.value for d in DType)},
    Op.RESHAPE: {"shape": "shape"},
    Op.SLICE: {"axis": ("int", -8, 8), "start": ("int", -_BIG, _BIG), "stop": ("int", -_BIG, _BIG)},
    Op.CONCAT: {"axis": ("int", -8, 8)},
    Op.SCALE: {"factor": "num"},
    Op.RMS_NORM: {"eps": "num"},
    Op.L2_NORM: {"eps": "num"},
    Op.ADD_RMS_NORM: {"eps": "num"},
    Op.GATED_RMS_NORM: {"eps": "num"},
    Op.NORM_ADD: {"eps": "num"},
    Op.NORM_ADD_NORM: {"eps": "num", "eps_next": "num"},
    Op.SOFTCAP: {"cap": "num"},
    Op.SOFTMAX: {"axis": ("int", -8, 8)},
    Op.SUM: {"axis": ("int", -8, 8), "keepdims": "bool"},
    Op.TOPK: {"k": ("int", 1, 4096)},
    Op.ATTENTION: {"scale": "num"},
    Op.ATTENTION_WINDOW: {"scale": "num", "window": ("int", 1, _BIG)},
    Op.ROPE: {"freq_base": "num", "freq_scale": "num", "mode": ("normal", "neox", "imrope", "mrope"),
              "n_dims": ("int", 0, 1 << 16), "sections": "ints"},
    Op.NORM_ROPE: {"eps": "num", "freq_base": "num", "freq_scale": "num",
                   "mode": ("normal", "neox", "imrope", "mrope"), "n_dims": ("int", 0, 1 << 16),
                   "sections": "ints"},
    Op.GATED_DELTA_RULE: {"head_map": ("tile", "interleave"), "scale": "num"},
    Op.CHUNK_GATED_DELTA_RULE: {"head_map": ("tile", "interleave"), "scale": "num", "chunk": ("int", 1, 4096)},
    Op.PLE_GATHER: {"n_layer": ("int", 1, 4096), "scale": "num", "width": ("int", 1, 1 << 20)},
    Op.MOE_ROUTE: {"expert_scale": "bool", "gating": ("softmax", "sigmoid"), "k": ("int", 1, 4096),
                   "norm": "bool", "scale": "num", "tile": ("int", 1, 4096)},
    Op.MOE_GROUPED_GEMM: {"act": ("silu", "gelu"), "merged_gate_up": "bool", "shared": "bool",
                          "tile": ("int", 1, 4096)},
    Op.FETCH_WEIGHTS: {"n_weights": ("int", 0, 4096), "mode": ("all", "routed"), "layer": ("int", 0, 1 << 16),
                       "slot": ("int", 0, 1 << 16), "bytes": ("int", 0, 1 << 50), "stream": "str",
                       "first_expert": ("int", 0, 1 << 16), "end_expert": ("int", 0, 1 << 16)},
}
# attributes a node of the op may lack (the reference has a default); every other one is required
OPTIONAL_ATTRS = {Op.INPUT: {"state"}, Op.MOE_ROUTE: {"expert_scale"}, Op.MOE_GROUPED_GEMM: {"act"},
                  Op.FETCH_WEIGHTS: {"first_expert", "end_expert", "stream", "slot", "bytes", "layer"},
                  Op.WEIGHT: {"ggml_type"}}
_DIM_SYMBOLS = {"T", "P"}       # tokens in the chunk, positions before it
_MAX_DIM = 1 << 40


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def attr_problem(op: Op, key: str, v) -> str | None:
    """Why attribute `key` = v is wrong for `op` (None: fine, or an attribute without a rule)."""
    rule = ATTRS.get(op, {}).get(key)
    if rule is None:
        return None
    if rule == "num":
        return None if _num(v) else f"a finite number, got {v!r}"[:200]
    if rule == "bool":
        return None if isinstance(v, bool) else f"true or false, got {v!r}"[:200]
    if rule == "str":
        return None if isinstance(v, str) and len(v) < 4096 else f"a string, got {v!r}"[:200]
    if rule == "ints":
        ok = isinstance(v, tuple) and len(v) <= 64 and all(isinstance(x, int) and not isinstance(x, bool)
                                                           and 0 <= x < _BIG for x in v)
        return None if ok else f"a list of small non-negative integers, got {v!r}"[:200]
    if rule == "shape":
        return dims_problem(v)
    if isinstance(rule, tuple) and rule and rule[0] == "int":
        _, lo, hi = rule
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"an integer in {lo}..{hi}, got {v!r}"[:200]
    if isinstance(rule, tuple):
        return None if isinstance(v, str) and v in rule else f"one of {', '.join(rule)}, got {v!r}"[:200]
    return None


def dims_problem(shape) -> str | None:
    """Why `shape` is not a list of dims: ints in 0..2^40 or linear expressions of T and P."""
    if not isinstance(shape, (tuple, list)) or len(shape) > 8:
        return f"a list of at most 8 dims, got {shape!r}"[:200]
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, str)):
            return f"dims are integers or expressions of T and P, got {d!r}"[:200]
        if isinstance(d, int):
            if not 0 <= d <= _MAX_DIM:
                return f"dim {d} is outside 0..2^40"
            continue
        if len(d) > 64:
            return f"dim expression {d[:40]!r}... is too long"
        try:
            lin = _parse(d)
        except ValueError:
            return f"bad dim expression {d!r}"
        extra = set(lin) - _DIM_SYMBOLS - {""}
        if extra:
            return f"dim {d!r} names {sorted(extra)[0]!r} (only T and P are known)"
        if any(not -_MAX_DIM <= c <= _MAX_DIM for c in lin.values()):
            return f"dim {d!r} is out of range"
    return None


def verify(g: Graph) -> None:
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(g.nx):
        try:
            cyc = " -> ".join(f"%{u}" for u, _ in nx.find_cycle(g.nx))
        except nx.NetworkXException:
            cyc = "?"
        problems.append(f"graph has a cycle ({cyc})")
    names: dict[str, int] = {}
    for node in g.nodes():
        where = f"node %{node.id} ({node.op.value} {node.name!r})"
        if node.op not in OPS:
            problems.append(f"{where}: unknown op")
            continue
        missing = sorted(set(ATTRS.get(node.op, {})) - set(node.attrs) - OPTIONAL_ATTRS.get(node.op, set()))
        if missing:
            problems.append(f"{where}: attribute {missing[0]!r} is missing")
            continue
        bad_attr = next(((k, p) for k, p in ((k, attr_problem(node.op, k, v)) for k, v in node.attrs.items())
                         if p is not None), None)
        if bad_attr is not None:
            problems.append(f"{where}: attribute {bad_attr[0]!r} should be {bad_attr[1]}")
            continue
        bad_out = next((p for p in (dims_problem(t.shape) for t in node.outputs) if p is not None), None)
        if bad_out is not None:
            problems.append(f"{where}: output shape: {bad_out}")
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
        except (InferError, AttributeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError,
                OverflowError) as e:
            # a rule meeting attributes or types it cannot use (a hostile plan): the node is wrong
            problems.append(f"{where}: {e}"[:300])
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
    if problems:        # the graph-wide rules below assume every node passed its own
        _fail(g, problems)
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
        _fail(g, problems)


def _fail(g: Graph, problems: list[str]):
    head = f"graph {g.name!r} fails verification ({len(problems)} problems)"
    raise VerifyError(head + ":\n  " + "\n  ".join(problems[:50]))
