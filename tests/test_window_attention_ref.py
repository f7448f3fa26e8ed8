"""The references and IR rules of the ops Gemma 4 brought in: sliding-window attention over a ring
(exact across chunk boundaries and for prompts far longer than the window), the ring append, GELU,
the soft-cap, the PLE gather, RoPE frequency factors; their shape rules, FLOP counts, and the
verifier's in-place rule for states with several readers."""
import math

import numpy as np
import pytest

from ggfuse.ir import Graph, Op
from ggfuse.ir.interpret import interpret
from ggfuse.ir.ops import OPS, InferError
from ggfuse.ir.types import TensorType
from ggfuse.ir.verify import VerifyError, verify
from ggfuse.kernels.attention import ref as attn_ref
from ggfuse.kernels.dense import ref as dense_ref

RNG = np.random.default_rng(13)


def brute_window(q, k, v, window, scale):
    """Every query over every key of the whole sequence, masked key by key in plain loops."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros((N, Hq, v.shape[2]))
    for t in range(N):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            keys = [s for s in range(N) if s <= t and t - s < window]
            sc = np.array([q[t, h] @ k[s, kh] * scale for s in keys], dtype=np.float64)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            out[t, h] = sum(pi * v[s, kh] for pi, s in zip(p, keys))
    return out


def run_chunks(q, k, v, *, window, rows, chunks, scale=1.0):
    """attention_window chunk by chunk, the rings carried by kv_ring_append."""
    Hkv, D, Dv = k.shape[1], k.shape[2], v.shape[2]
    k_ring, v_ring = np.zeros((rows, Hkv, D), np.float32), np.zeros((rows, Hkv, Dv), np.float32)
    outs, P = [], 0
    for T in chunks:
        sl = slice(P, P + T)
        outs.append(attn_ref.attention_window(q[sl], k[sl], v[sl], k_ring, v_ring, P=P, window=window, scale=scale))
        k_ring = attn_ref.kv_ring_append(k_ring, k[sl], P=P)
        v_ring = attn_ref.kv_ring_append(v_ring, v[sl], P=P)
        P += T
    return np.concatenate(outs)


def qkv(N, Hq=4, Hkv=2, D=8, Dv=8):
    return (RNG.standard_normal((N, Hq, D)).astype(np.float32), RNG.standard_normal((N, Hkv, D)).astype(np.float32),
            RNG.standard_normal((N, Hkv, Dv)).astype(np.float32))


def test_ring_positions():
    assert attn_ref.ring_positions(0, 4).tolist() == [-1, -1, -1, -1]
    assert attn_ref.ring_positions(2, 4).tolist() == [0, 1, -1, -1]
    assert attn_ref.ring_positions(4, 4).tolist() == [0, 1, 2, 3]
    assert attn_ref.ring_positions(7, 4).tolist() == [4, 5, 6, 3]   # row r holds the latest p < 7, p % 4 == r


@pytest.mark.parametrize("window,rows,chunks", [
    (8, 8, [40]),                      # one chunk longer than the window
    (8, 8, [5, 1, 3, 13, 7, 11]),      # chunks shorter and longer than the window and the ring
    (8, 7, [3] * 13 + [1]),            # the smallest ring: window - 1 rows
    (8, 12, [7] * 5 + [5]),            # a ring larger than needed
    (1, 1, [4, 1, 35]),                # a query sees only itself
    (64, 64, [9, 31]),                 # window past the prompt: plain causal attention
])
def test_attention_window_is_exact_across_chunks(window, rows, chunks):
    N = sum(chunks)
    q, k, v = qkv(N)
    want = brute_window(q, k, v, window, 0.7)
    got = run_chunks(q, k, v, window=window, rows=rows, chunks=chunks, scale=0.7)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_window_past_the_prompt_equals_causal_attention():
    q, k, v = qkv(20)
    empty = np.zeros((32, 2, 8), np.float32)
    got = attn_ref.attention_window(q, k, v, empty, empty, P=0, window=32, scale=0.5)
    np.testing.assert_allclose(got, attn_ref.attention(q, k, v, scale=0.5), atol=1e-6)


def test_fewer_queries_are_the_last_rows():
    # q may hold only the chunk's last Tq queries (KV-shared layers computing the last rows only)
    q, k, v = qkv(30)
    ring = RNG.standard_normal((8, 2, 8)).astype(np.float32)
    full = attn_ref.attention_window(q[20:], k[20:], v[20:], ring, ring, P=20, window=8, scale=1.0)
    last = attn_ref.attention_window(q[27:], k[20:], v[20:], ring, ring, P=20, window=8, scale=1.0)
    np.testing.assert_allclose(last, full[7:], atol=1e-7)


def test_ring_append_keeps_the_last_rows():
    ring = np.full((4, 1, 2), -1.0, np.float32)
    x = np.arange(12, dtype=np.float32).reshape(6, 1, 2)   # rows 0..5 at positions 3..8
    out = attn_ref.kv_ring_append(ring, x, P=3)
    # positions 5..8 survive, at rows 5 % 4 .. 8 % 4
    assert [out[p % 4, 0, 0] for p in range(5, 9)] == [x[p - 3, 0, 0] for p in range(5, 9)]
    assert (ring == -1).all()                              # the input is not written
    short = attn_ref.kv_ring_append(ring, x[:2], P=0)
    assert short[:2, 0, 0].tolist() == [0.0, 2.0] and (short[2:] == -1).all()


def test_gelu_softcap_and_ple_gather():
    x = np.linspace(-6, 6, 101).astype(np.float32)
    want = [0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))) for t in x.astype(float)]
    np.testing.assert_allclose(dense_ref.gelu(x), want, rtol=1e-6, atol=1e-7)
    assert dense_ref.gelu(np.float32([0.0]))[0] == 0.0
    y = dense_ref.softcap(np.float32([-1e6, -3.0, 0.0, 1e-3, 3.0, 1e6]), cap=30.0)
    np.testing.assert_allclose(y, [-30.0, 30 * math.tanh(-0.1), 0.0, 1e-3, 30 * math.tanh(0.1), 30.0], rtol=1e-6)
    table = RNG.standard_normal((10, 3 * 4)).astype(np.float32)
    ids = np.array([7, 0, 7], np.int32)
    out = dense_ref.ple_gather(table, ids, n_layer=3, width=4, scale=2.0)
    assert out.shape == (3, 3, 4)
    np.testing.assert_array_equal(out[0, 2], 2.0 * table[7, 8:12])


def test_rope_freq_factors():
    x = RNG.standard_normal((5, 2, 16)).astype(np.float32)
    pos = np.arange(5, dtype=np.int32) + 3
    plain = attn_ref.rope(x, pos, n_dims=16, freq_base=1e6)
    np.testing.assert_array_equal(attn_ref.rope(x, pos, n_dims=16, freq_base=1e6, freq_factors=np.ones(8)), plain)
    # Gemma's proportional RoPE: pairs with factor 1e30 do not rotate, the others as without factors
    ff = np.array([1.0] * 2 + [1e30] * 6, np.float32)
    y = attn_ref.rope(x, pos, n_dims=16, freq_base=1e6, freq_factors=ff)
    pairs = [0, 1, 8, 9]
    np.testing.assert_allclose(y[..., pairs], plain[..., pairs], atol=1e-6)
    rest = [d for d in range(16) if d not in pairs]
    np.testing.assert_allclose(y[..., rest], x[..., rest], atol=1e-6)


# ---- shape rules, FLOPs, verifier --------------------------------------------------------------

def _window_graph(rows=8, window=8, after=True, shared=True):
    """One sliding layer's attention, a second (KV-shared) layer reading the same K/V and rings,
    and the ring appends after both."""
    g = Graph("window")
    q = g.add(Op.INPUT, key="q", kind="activation", shape=("T", 4, 8), dtype="f32")
    k = g.add(Op.INPUT, key="k", kind="activation", shape=("T", 2, 8), dtype="f32")
    v = g.add(Op.INPUT, key="v", kind="activation", shape=("T", 2, 8), dtype="f32")
    kr = g.add(Op.INPUT, key="k_ring", kind="state", shape=(rows, 2, 8), dtype="f32", state="kv_ring")
    vr = g.add(Op.INPUT, key="v_ring", kind="state", shape=(rows, 2, 8), dtype="f32", state="kv_ring")
    o = g.add(Op.ATTENTION_WINDOW, [q, k, v, kr, vr], window=window, scale=1.0)
    last = o
    if shared:
        q2 = g.add(Op.SCALE, [o], factor=0.5)
        last = g.add(Op.ATTENTION_WINDOW, [q2, k, v, kr, vr], window=window, scale=1.0)
    g.set_output("out", last)
    for ring, x, name in ((kr, k, "k_ring"), (vr, v, "v_ring")):
        g.set_output(name, g.add(Op.KV_RING_APPEND, [ring, x] + ([last] if after else [])))
    return g


def test_window_graph_runs_chunk_by_chunk_like_the_reference():
    g = _window_graph(shared=False)
    verify(g)
    N = 23
    q, k, v = qkv(N)
    state = {"k_ring": np.zeros((8, 2, 8), np.float32), "v_ring": np.zeros((8, 2, 8), np.float32)}
    outs, P = [], 0
    for T in (6, 11, 6):
        sl = slice(P, P + T)
        res = interpret(g, {"q": q[sl], "k": k[sl], "v": v[sl], **state}, weight=None, env={"T": T, "P": P})
        state = {n: res[n] for n in state}
        outs.append(res["out"])
        P += T
    np.testing.assert_allclose(np.concatenate(outs), brute_window(q, k, v, 8, 1.0), atol=2e-6)


def test_shape_rules():
    g = _window_graph()
    t = g.type_of(g.outputs["out"])
    assert t == TensorType(("T", 4, 8)) and g.type_of(g.outputs["k_ring"]) == TensorType((8, 2, 8))
    with pytest.raises(InferError, match="cannot hold"):
        _window_graph(rows=6, window=8)
    g2 = Graph("bad")
    q = g2.add(Op.INPUT, key="q", kind="activation", shape=("T", 3, 8), dtype="f32")
    k = g2.add(Op.INPUT, key="k", kind="activation", shape=("T", 2, 8), dtype="f32")
    r = g2.add(Op.INPUT, key="r", kind="state", shape=(8, 2, 8), dtype="f32", state="kv_ring")
    with pytest.raises(InferError, match="multiple"):
        g2.add(Op.ATTENTION_WINDOW, [q, k, k, r, r], window=8, scale=1.0)
    r4 = g2.add(Op.INPUT, key="r4", kind="state", shape=(8, 2, 4), dtype="f32", state="kv_ring")
    with pytest.raises(InferError, match="rows of"):
        g2.add(Op.ATTENTION_WINDOW, [q, k, k, r4, r4], window=8, scale=1.0)
    with pytest.raises(InferError, match="kv_ring_append"):
        g2.add(Op.KV_RING_APPEND, [r4, k])
    w = g2.add(Op.WEIGHT, tensor="t", shape=(10, 12), dtype="f32")
    ids = g2.add(Op.INPUT, key="ids", kind="tokens", shape=("T",), dtype="i32")
    assert g2.type_of(g2.add(Op.PLE_GATHER, [w, ids], n_layer=3, width=4, scale=1.0)) == TensorType(("T", 3, 4))
    with pytest.raises(InferError, match="n_layer"):
        g2.add(Op.PLE_GATHER, [w, ids], n_layer=5, width=4, scale=1.0)
    with pytest.raises(InferError, match="cap"):
        g2.add(Op.SOFTCAP, [q], cap=0.0)
    pos = g2.add(Op.INPUT, key="pos", kind="positions", shape=("T",), dtype="i32")
    ff = g2.add(Op.WEIGHT, tensor="ff", shape=(3,), dtype="f32")
    with pytest.raises(InferError, match="freq factors"):
        g2.add(Op.ROPE, [q, pos, ff], n_dims=8, freq_base=1e4, freq_scale=1.0, mode="neox", sections=())


def test_flops_count_the_visible_pairs():
    g = _window_graph(shared=False)
    n = g.by_op(Op.ATTENTION_WINDOW)[0]
    ins = [g.type_of(x) for x in n.inputs]
    for T, P in ((5, 0), (20, 0), (7, 100)):
        pairs = sum(min(8, P + t + 1) for t in range(T))
        assert OPS[n.op].flops(n.attrs, ins, n.outputs, {"T": T, "P": P}) == 2 * 4 * pairs * (8 + 8)


def test_verify_wants_every_reader_before_an_in_place_state_write():
    verify(_window_graph(after=True))
    # without the ordering edge nothing makes the append wait for the attention reading the ring
    for shared in (False, True):
        with pytest.raises(VerifyError, match="in-place update could overwrite it first"):
            verify(_window_graph(after=False, shared=shared))
