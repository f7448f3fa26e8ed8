"""Fuse each MoE FFN into a router and one grouped GEMM.

The plain form (compiler/frontends/common.py `moe_ffn`) routes with five ops and runs the
experts as per-(token, slot) matmuls (MUL_MAT_ID), then a weighted sum, then adds the gated
shared expert. Here that subgraph becomes

    MOE_ROUTE(x, w_router[, w_shexp_gate]) -> ids, weights, sorted_slots, expert_offsets[, shexp_gate]
    MOE_GROUPED_GEMM(x, weights, sorted_slots, expert_offsets, expert weights[, shared weights, shexp_gate])

whose routing layout (kernels/moe/ref.py) is computed on the device, so a CUDA graph can run a
whole prefill chunk without a host round-trip, and each expert's tokens form one GEMM.

Gemma 4's MoE (compiler/frontends/gemma4.py `moe`) fits the same mould: its router reads another
input than its experts (MOE_ROUTE's x is the router's, MOE_GROUPED_GEMM's the experts'), the slot
weights are multiplied by a per-expert scale (MOE_ROUTE expert_scale) and the GLU is GELU
(MOE_GROUPED_GEMM act="gelu").

Matching is structural: from each TOPK, walk the edges the frontend emits and require every
intermediate node to be used only inside the pattern. A layer that differs in any way stays
plain, with the reason in its TOPK node's meta["fuse_moe"].
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ggfuse.ir.graph import Graph, Node, Value
from ggfuse.ir.ops import InferError, Op
from ggfuse.passes.base import PassResult


class _NoMatch(Exception):
    pass


def _need(cond, why: str):
    if not cond:
        raise _NoMatch(why)


@dataclass
class _Match:
    x: Value                             # the router's input
    x_experts: Value                     # the experts' (the same value but for Gemma 4)
    w_router: Value
    route_attrs: dict
    expert_weights: list[Value]          # [w_gate, w_up] or [w_gate_up], then w_down
    merged_gate_up: bool
    covered: set[int] = field(default_factory=set)  # pattern nodes, `out`'s producer included
    out: Value | None = None
    shared: tuple[Value, ...] | None = None          # w_gate_sh, w_up_sh, w_down_sh
    w_shexp_gate: Value | None = None
    expert_scale: Value | None = None                # [1, E] per-expert output scale
    act: str = "silu"


def _producer(g: Graph, v: Value, *ops: Op) -> Node:
    n = g.node(v.node)
    _need(n.op in ops and v.index == 0, f"{v} is {n.op.value}, expected {'/'.join(o.value for o in ops)}")
    return n


def _pick(g: Graph, node: Node, *ops: Op) -> tuple[Node, Value]:
    """Of a commutative binary node's operands: the one one of `ops` produces, and the other one."""
    a, b = node.inputs
    for mine, other in ((a, b), (b, a)):
        if mine.index == 0 and g.node(mine.node).op in ops:
            return g.node(mine.node), other
    raise _NoMatch(f"node %{node.id} ({node.op.value}) has no {'/'.join(o.value for o in ops)} operand")


_GLU_ACTS = {Op.SILU: "silu", Op.GELU: "gelu"}


def _is_glu(g: Graph, v: Value) -> bool:
    """Is v act(gate) * up, the input of an expert down projection?"""
    n = g.node(v.node)
    return n.op == Op.MUL and v.index == 0 and any(g.node(u.node).op in _GLU_ACTS for u in n.inputs)


def _users(g: Graph, v: Value) -> list[Node]:
    return [u for u, _ in g.uses_of(v)]


def _sole_user(g: Graph, v: Value) -> Node:
    users = {u.id: u for u in _users(g, v)}
    _need(len(users) == 1, f"{v} has {len(users)} users, expected 1")
    return next(iter(users.values()))


def _match_routed(g: Graph, topk: Node) -> _Match:
    probs = _producer(g, topk.inputs[0], Op.SOFTMAX, Op.SIGMOID)
    _need(probs.op != Op.SOFTMAX or probs.attrs.axis in (-1, 1), "router softmax is not over the experts")
    router = _producer(g, probs.inputs[0], Op.MATMUL)
    x, w_router = router.inputs
    ids = topk.out
    k = topk.attrs.k

    E = g.type_of(w_router).shape[0]
    takes = {u.id: u for u in _users(g, ids) if u.op == Op.TAKE_ALONG}
    prob_takes = [u for u in takes.values() if u.inputs == (probs.out, ids)]
    # Gemma 4: a per-expert scale gathered for each slot (TAKE_ALONG of a [1, E] weight)
    scale_takes = [u for u in takes.values() if u.inputs[1] == ids and g.node(u.inputs[0].node).op == Op.WEIGHT
                   and tuple(g.type_of(u.inputs[0]).shape) == (1, E)]
    mmids = {u.id: u for u in _users(g, ids) if u.op == Op.MUL_MAT_ID}
    _need(len(prob_takes) == 1 and len(scale_takes) <= 1 and len(takes) == 1 + len(scale_takes),
          "expert ids are not read by one take_along of the probs (and at most one of a per-expert scale)")
    _need(len(_users(g, ids)) == len(takes) + len(mmids), "expert ids have users besides take_along and mul_mat_id")
    _need(all(u.inputs[2] == ids for u in mmids.values()), "expert ids feed a mul_mat_id as its x")

    # Weights: take_along -> (div by their sum) -> (scale) -> (* per-expert scale) -> reshape [T, k, 1].
    covered = {router.id, probs.id, topk.id, prob_takes[0].id}
    w = prob_takes[0].out
    norm, scale = False, 0.0
    w_users = _users(g, w)
    if len(w_users) == 2:
        s = next((u for u in w_users if u.op == Op.SUM), None)
        div = next((u for u in w_users if u.op == Op.DIV), None)
        _need(s is not None and div is not None and s.attrs.axis in (-1, 1) and s.attrs.keepdims
              and div.inputs == (w, s.out) and _sole_user(g, s.out).id == div.id,
              "expert weights are not renormalised as w / sum(w)")
        covered |= {s.id, div.id}
        norm, w = True, div.out
    nxt = _sole_user(g, w)
    if nxt.op == Op.SCALE:
        covered.add(nxt.id)
        scale, w = float(nxt.attrs.factor), nxt.out
        nxt = _sole_user(g, w)
    expert_scale = None
    if scale_takes:
        st = scale_takes[0]
        _need(nxt.op == Op.MUL and set(nxt.inputs) == {w, st.out} and _sole_user(g, st.out).id == nxt.id,
              "the per-expert scales do not multiply the expert weights")
        covered |= {st.id, nxt.id}
        expert_scale, w = st.inputs[0], nxt.out
        nxt = _sole_user(g, w)
    _need(nxt.op == Op.RESHAPE and nxt.outputs[0].rank == 3 and nxt.outputs[0].shape[2] == 1,
          "expert weights are not reshaped to [T, k, 1]")
    w_col = nxt.out
    covered.add(nxt.id)

    # Experts: down(act(gate) * up) with act SiLU or GELU, gate/up either two mul_mat_ids or slices
    # of a merged one; they read the router input, or (Gemma 4) an input of their own.
    downs = [u for u in mmids.values() if _is_glu(g, u.inputs[1])]
    _need(len(downs) == 1, f"{len(downs)} expert matmuls read an act(gate) * up product, expected 1")
    down = downs[0]
    swiglu = _producer(g, down.inputs[1], Op.MUL)
    silu, up_v = _pick(g, swiglu, *_GLU_ACTS)
    gate_v = silu.inputs[0]
    covered |= {down.id, swiglu.id, silu.id}
    if g.node(gate_v.node).op == Op.SLICE:
        gs, us = _producer(g, gate_v, Op.SLICE), _producer(g, up_v, Op.SLICE)
        gu = _producer(g, gs.inputs[0], Op.MUL_MAT_ID)
        F2 = gu.outputs[0].shape[2]
        _need(us.inputs[0] == gu.out and gs.attrs.axis in (2, -1) and us.attrs.axis in (2, -1)
              and (gs.attrs.start, gs.attrs.stop, us.attrs.start, us.attrs.stop) == (0, F2 // 2, F2 // 2, F2),
              "merged gate_up is not split into [gate | up] halves")
        gemms, merged = [gu], True
        expert_weights = [gu.inputs[0], down.inputs[0]]
        covered |= {gs.id, us.id}
    else:
        gate, up = _producer(g, gate_v, Op.MUL_MAT_ID), _producer(g, up_v, Op.MUL_MAT_ID)
        gemms, merged = [gate, up], False
        expert_weights = [gate.inputs[0], up.inputs[0], down.inputs[0]]
    x_experts = gemms[0].inputs[1]
    _need(all(m.inputs[1:] == (x_experts, ids) for m in gemms), "gate/up expert matmuls read different inputs")
    _need(g.type_of(x_experts) == g.type_of(x), f"experts' input {g.type_of(x_experts)} and router's {g.type_of(x)} differ")
    _need({m.id for m in gemms} | {down.id} == set(mmids), "expert ids feed other mul_mat_ids")
    covered |= {m.id for m in gemms}

    weighted = _sole_user(g, down.out)
    _need(weighted.op == Op.MUL and set(weighted.inputs) == {down.out, w_col}, "expert outputs are not weighted")
    total = _sole_user(g, weighted.out)
    _need(total.op == Op.SUM and total.attrs.axis == 1 and not total.attrs.keepdims, "weighted experts are not summed over slots")
    covered |= {weighted.id, total.id}
    attrs = dict(k=k, gating="softmax" if probs.op == Op.SOFTMAX else "sigmoid", norm=norm, scale=scale)
    return _Match(x, x_experts, w_router, attrs, expert_weights, merged, covered, total.out,
                  expert_scale=expert_scale, act=_GLU_ACTS[silu.op])


def _match_shared(g: Graph, m: _Match) -> None:
    """If the routed sum's one user adds the sigmoid-gated shared expert, take that in too."""
    users = _users(g, m.out)
    if len(users) != 1 or users[0].op != Op.ADD or m.out in g.outputs.values() or m.x_experts != m.x:
        return
    add = users[0]
    other = add.inputs[1] if add.inputs[0] == m.out else add.inputs[0]
    try:
        gated = _producer(g, other, Op.MUL)
        sig, down_v = _pick(g, gated, Op.SIGMOID)
        gate_mm = _producer(g, sig.inputs[0], Op.MATMUL)
        down = _producer(g, down_v, Op.MATMUL)
        swiglu = _producer(g, down.inputs[0], Op.MUL)
        silu, up_v = _pick(g, swiglu, Op.SILU)
        gate, up = _producer(g, silu.inputs[0], Op.MATMUL), _producer(g, up_v, Op.MATMUL)
        _need(gate_mm.inputs[0] == gate.inputs[0] == up.inputs[0] == m.x, "shared expert reads another input")
        _need(g.type_of(gate_mm.inputs[1]).shape[0] == 1, "shared expert gate is not one scalar per token")
    except _NoMatch:
        return  # an ordinary add (e.g. the residual): fuse the routed experts alone
    inner = {gated.id, sig.id, gate_mm.id, down.id, swiglu.id, silu.id, gate.id, up.id}
    if any(u.id not in inner | {add.id} for n in inner for u in g.users(n)):
        return
    m.covered |= inner | {add.id}
    m.out = add.out
    m.shared = (gate.inputs[1], up.inputs[1], down.inputs[1])
    m.w_shexp_gate = gate_mm.inputs[1]


def _check_private(g: Graph, m: _Match) -> None:
    """Every pattern node but the last must feed only the pattern, or removing it loses a value."""
    outs = set(g.outputs.values())
    for nid in m.covered - {m.out.node}:
        n = g.node(nid)
        stray = [u for u in g.users(nid) if u.id not in m.covered]
        _need(not stray, f"%{nid} ({n.name or n.op.value}) is also used by %{stray[0].id if stray else ''}")
        _need(not any(n.value(i) in outs for i in range(len(n.outputs))), f"%{nid} is a graph output")


def _rewrite(g: Graph, m: _Match, *, prefix: str, tile: int, layer=None) -> None:
    fused = sorted(g.node(n).name or f"%{n}" for n in m.covered)
    meta = {"fused": fused, **({"layer": layer} if layer is not None else {})}
    route_in = [m.x, m.w_router] + ([m.w_shexp_gate] if m.shared else [])
    # Gemma-only attributes are set only where they apply, so other models' nodes are unchanged
    extra_route = {}
    if m.expert_scale is not None:
        route_in.append(m.expert_scale)
        extra_route["expert_scale"] = True
    route = g.add(Op.MOE_ROUTE, route_in, name=f"{prefix}.moe_route", tile=tile, meta=dict(meta),
                  **m.route_attrs, **extra_route)
    _ids, weights, slots, offsets = route[:4]
    gemm_in = [m.x_experts, weights, slots, offsets, *m.expert_weights]
    if m.shared:
        gemm_in += [*m.shared, route[4]]
    y = g.add(Op.MOE_GROUPED_GEMM, gemm_in, name=f"{prefix}.moe_ffn", merged_gate_up=m.merged_gate_up,
              shared=m.shared is not None, tile=tile, meta=dict(meta),
              **({"act": m.act} if m.act != "silu" else {}))
    g.replace_uses(m.out, y)


def run(g: Graph, *, tile: int = 16) -> PassResult:
    g = g.copy()
    changed = False
    for topk in g.by_op(Op.TOPK):
        try:
            m = _match_routed(g, topk)
            _match_shared(g, m)
            _check_private(g, m)
            prefix = topk.name.rsplit(".", 1)[0] if "." in topk.name else f"moe{topk.id}"
            _rewrite(g, m, prefix=prefix, tile=tile, layer=topk.meta.get("layer"))
        except (_NoMatch, InferError) as e:
            g.set_meta(topk.id, fuse_moe=f"not fused: {e}")
            continue
        changed = True
    g.dce()
    return PassResult(g, changed)
