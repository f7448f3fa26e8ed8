"""moe_route and moe_grouped_gemm references against the plain ops they replace (random inputs)."""
from __future__ import annotations

import numpy as np
import pytest

from ggfuse.ir import Graph, Op
from ggfuse.ir.types import dim_eval
from ggfuse.kernels.dense import ref as dense_ref
from ggfuse.kernels.moe import ref as moe_ref

D, E, F, FS = 24, 6, 10, 14


def _rng(seed):
    return np.random.default_rng(seed)


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _plain_route(x, w_router, *, k, gating, norm, scale):
    """The routing ops as compiler/frontends/common.py `moe_ffn` chains them."""
    logits = dense_ref.matmul(x, w_router)
    probs = dense_ref.softmax(logits) if gating == "softmax" else dense_ref.sigmoid(logits)
    ids = moe_ref.topk(probs, k=k)
    w = moe_ref.take_along(probs, ids)
    if norm:
        w = dense_ref.div(w, np.maximum(dense_ref.sum_axis(w, axis=-1, keepdims=True), moe_ref.NORM_SUM_MIN))
    if scale not in (0.0, 1.0):
        w = dense_ref.scale(w, factor=scale)
    return ids, w


def _check_layout(ids, slots, offsets, *, n_expert, tile):
    T, k = ids.shape
    flat = ids.reshape(-1)
    assert slots.dtype == np.int32 and offsets.dtype == np.int32
    assert slots.shape == (T * k + n_expert * (tile - 1),) and offsets.shape == (n_expert + 1,)
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    for e in range(n_expert):
        seg = slots[offsets[e]:offsets[e + 1]]
        mine = np.flatnonzero(flat == e)  # this expert's slots in token order
        assert len(seg) == -(-len(mine) // tile) * tile, f"expert {e}: segment not padded to the tile"
        np.testing.assert_array_equal(seg[:len(mine)], mine)
        assert np.all(seg[len(mine):] == -1)
    assert np.all(slots[offsets[-1]:] == -1)
    assert sorted(slots[slots >= 0]) == list(range(T * k)), "every slot exactly once"


@pytest.mark.parametrize("T", [1, 5, 16, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("tile", [1, 4, 16], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("gating,norm,scale", [("softmax", True, 0.0), ("softmax", False, 2.5),
                                               ("sigmoid", True, 1.0), ("sigmoid", False, 0.0)],
                         ids=["softmax-norm", "softmax-scaled", "sigmoid-norm", "sigmoid-raw"])
def test_moe_route_matches_plain_ops(T, tile, gating, norm, scale):
    rng = _rng(T * 100 + tile)
    k = 2
    x, w_router, w_sg = _randn(rng, T, D), _randn(rng, E, D, scale=0.3), _randn(rng, 1, D, scale=0.3)
    ids, w, slots, offsets, sg = moe_ref.moe_route(x, w_router, w_sg, k=k, gating=gating, norm=norm,
                                                   scale=scale, tile=tile)
    want_ids, want_w = _plain_route(x, w_router, k=k, gating=gating, norm=norm, scale=scale)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(w, want_w)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and w.shape == (T, k)
    _check_layout(ids, slots, offsets, n_expert=E, tile=tile)
    np.testing.assert_array_equal(sg, dense_ref.sigmoid(x @ w_sg.T))
    assert len(moe_ref.moe_route(x, w_router, k=k, tile=tile)) == 4  # no shared gate asked for


def test_moe_route_expert_without_tokens():
    rng = _rng(1)
    x = np.abs(_randn(rng, 9, D))
    w_router = np.abs(_randn(rng, E, D))
    w_router[3] = -w_router[3]  # x >= 0, so expert 3's logit is the smallest for every token
    ids, _, slots, offsets = moe_ref.moe_route(x, w_router, k=2, tile=4)
    assert 3 not in ids and offsets[4] == offsets[3]
    _check_layout(ids, slots, offsets, n_expert=E, tile=4)


def test_norm_sum_is_clamped_like_llama_cpp():
    # Sigmoid gating with very negative logits: the chosen weights sum to far below the clamp.
    x = np.ones((2, D), np.float32)
    w_router = np.full((E, D), -2.0, np.float32)
    w_router[:, 0] = np.arange(E)  # distinct logits, all about -40
    _, w, _, _ = moe_ref.moe_route(x, w_router, k=2, gating="sigmoid", norm=True)
    probs = dense_ref.sigmoid(dense_ref.matmul(x, w_router))
    top = np.sort(probs, axis=-1)[:, ::-1][:, :2]
    assert top.sum(-1).max() < moe_ref.NORM_SUM_MIN
    np.testing.assert_allclose(w, top / moe_ref.NORM_SUM_MIN, rtol=1e-6)


def test_route_layout_by_hand():
    ids = np.array([[2, 0], [0, 2], [2, 1]], np.int32)  # slots 0..5
    slots, offsets = moe_ref.route_layout(ids, n_expert=4, tile=2)
    # expert 0: slots 1, 2; expert 1: slot 5 (+1 pad); expert 2: slots 0, 3, 4 (+1 pad); expert 3: none
    np.testing.assert_array_equal(offsets, [0, 2, 4, 8, 8])
    np.testing.assert_array_equal(slots, [1, 2, 5, -1, 0, 3, 4, -1] + [-1] * 2)


def _experts(rng):
    wg, wu, wd = _randn(rng, E, F, D, scale=0.2), _randn(rng, E, F, D, scale=0.2), _randn(rng, E, D, F, scale=0.2)
    return wg, wu, wd


def _plain_experts(x, ids, w, wg, wu, wd, shared=None):
    """mul_mat_id path of `moe_ffn`: gate, up, SwiGLU, down, weight, sum over slots (+ shared)."""
    h = dense_ref.mul(dense_ref.silu(moe_ref.mul_mat_id(wg, x, ids)), moe_ref.mul_mat_id(wu, x, ids))
    y = dense_ref.mul(moe_ref.mul_mat_id(wd, h, ids), w[:, :, None])
    out = dense_ref.sum_axis(y, axis=1)
    if shared is not None:
        sg_w, sh_g, sh_u, sh_d = shared
        hs = dense_ref.mul(dense_ref.silu(dense_ref.matmul(x, sh_g)), dense_ref.matmul(x, sh_u))
        gate = dense_ref.sigmoid(dense_ref.matmul(x, sg_w))
        out = dense_ref.add(out, dense_ref.mul(dense_ref.matmul(hs, sh_d), gate))
    return out


@pytest.mark.parametrize("T", [1, 7, 40], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("merged", [False, True], ids=["split", "merged"])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
def test_moe_grouped_gemm_matches_mul_mat_id(T, merged, shared):
    rng = _rng(T + 10 * merged + 100 * shared)
    k = 3
    x, w_router = _randn(rng, T, D), _randn(rng, E, D, scale=0.3)
    wg, wu, wd = _experts(rng)
    sh = (_randn(rng, 1, D, scale=0.3), _randn(rng, FS, D, scale=0.2), _randn(rng, FS, D, scale=0.2),
          _randn(rng, D, FS, scale=0.2)) if shared else None
    route = moe_ref.moe_route(x, w_router, sh[0] if shared else None, k=k, tile=4)
    ids, w, slots, offsets = route[:4]
    kw = dict(w_gate_up=np.concatenate([wg, wu], axis=1)) if merged else dict(w_gate=wg, w_up=wu)
    got = moe_ref.moe_grouped_gemm(x, w, slots, offsets, w_down=wd, **kw,
                                   shared=(sh[1], sh[2], sh[3], route[4]) if shared else None)
    want = _plain_experts(x, ids, w, wg, wu, wd, sh)
    assert got.shape == (T, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


class _CountingExperts:
    """A lazy stacked weight that records which experts were dequantised."""

    def __init__(self, w):
        self.w, self.touched = w, set()

    def expert(self, e):
        self.touched.add(int(e))
        return self.w[e]


def test_grouped_gemm_dequantises_only_used_experts():
    rng = _rng(5)
    x = _randn(rng, 3, D)
    ids = np.array([[1, 4], [4, 1], [1, 4]], np.int32)
    w = np.full((3, 2), 0.5, np.float32)
    slots, offsets = moe_ref.route_layout(ids, n_expert=E, tile=16)
    lazy = [_CountingExperts(a) for a in _experts(rng)]
    moe_ref.moe_grouped_gemm(x, w, slots, offsets, w_gate=lazy[0], w_up=lazy[1], w_down=lazy[2])
    assert all(l.touched == {1, 4} for l in lazy)


def test_ops_infer_symbolic_and_flops():
    from ggfuse.ir.ops import OPS
    g = Graph("moe")
    x = g.add(Op.INPUT, key="x", kind="activation", shape=("T", D), dtype="f32")
    wr = g.add(Op.WEIGHT, tensor="r", shape=(E, D), dtype="f32")
    wsg = g.add(Op.WEIGHT, tensor="sg", shape=(1, D), dtype="f32")
    route = g.add(Op.MOE_ROUTE, [x, wr, wsg], k=2, gating="softmax", norm=True, scale=0.0, tile=16)
    assert len(route) == 5 and g.type_of(route[2]).shape == (f"2*T+{E * 15}",)
    assert len(g.add(Op.MOE_ROUTE, [x, wr], k=2, gating="softmax", norm=True, scale=0.0, tile=16)) == 4
    ws = [g.add(Op.WEIGHT, tensor=n, shape=s, dtype="f32") for n, s in
          (("g", (E, F, D)), ("u", (E, F, D)), ("d", (E, D, F)), ("gs", (FS, D)), ("us", (FS, D)), ("ds", (D, FS)))]
    y = g.add(Op.MOE_GROUPED_GEMM, [x, *route[1:4], *ws, route[4]], merged_gate_up=False, shared=True, tile=16)
    assert g.type_of(y).shape == ("T", D)
    env = {"T": 10}
    ins = [g.type_of(v) for v in g.node(y.node).inputs]
    assert OPS[Op.MOE_GROUPED_GEMM].flops(g.node(y.node).attrs, ins, None, env) == 2 * 10 * 2 * 3 * D * F + 2 * 10 * 3 * D * FS
    assert dim_eval(g.type_of(route[2]).shape[0], env) == moe_ref.padded_length(10, 2, E, 16)


# ---- Gemma 4: per-expert output scale, GELU experts, a router input of its own ------------------

@pytest.mark.parametrize("T", [1, 7, 40], ids=lambda t: f"T{t}")
def test_gemma_route_and_gelu_experts_match_the_plain_ops(T):
    rng = _rng(T + 1000)
    k = 2
    x_router, x = _randn(rng, T, D), _randn(rng, T, D)
    w_router, es = _randn(rng, E, D, scale=0.3), np.abs(_randn(rng, 1, E)) + 0.5
    wg, wu, wd = _experts(rng)
    ids, w, slots, offsets = moe_ref.moe_route(x_router, w_router, k=k, tile=4, expert_scale=es)
    want_ids, want_w = _plain_route(x_router, w_router, k=k, gating="softmax", norm=True, scale=0.0)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(w, dense_ref.mul(want_w, moe_ref.take_along(es, want_ids)))
    got = moe_ref.moe_grouped_gemm(x, w, slots, offsets, w_gate_up=np.concatenate([wg, wu], axis=1), w_down=wd,
                                   act="gelu")
    h = dense_ref.mul(dense_ref.gelu(moe_ref.mul_mat_id(wg, x, ids)), moe_ref.mul_mat_id(wu, x, ids))
    want = dense_ref.sum_axis(dense_ref.mul(moe_ref.mul_mat_id(wd, h, ids), w[:, :, None]), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_gemma_route_shape_rules():
    from ggfuse.ir.ops import InferError
    g = Graph("moe")
    x = g.add(Op.INPUT, key="x", kind="activation", shape=("T", D), dtype="f32")
    wr = g.add(Op.WEIGHT, tensor="r", shape=(E, D), dtype="f32")
    es = g.add(Op.WEIGHT, tensor="s", shape=(1, E), dtype="f32")
    route = g.add(Op.MOE_ROUTE, [x, wr, es], k=2, gating="softmax", norm=True, scale=0.0, tile=16, expert_scale=True)
    assert len(route) == 4
    with pytest.raises(InferError, match="expert_scale must be"):
        g.add(Op.MOE_ROUTE, [x, wr, wr], k=2, gating="softmax", norm=True, scale=0.0, tile=16, expert_scale=True)
    wgu = g.add(Op.WEIGHT, tensor="gu", shape=(E, 2 * F, D), dtype="f32")
    wd = g.add(Op.WEIGHT, tensor="d", shape=(E, D, F), dtype="f32")
    with pytest.raises(InferError, match="act"):
        g.add(Op.MOE_GROUPED_GEMM, [x, *route[1:4], wgu, wd], merged_gate_up=True, shared=False, tile=16, act="relu")
