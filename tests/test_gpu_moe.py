"""MoE router and grouped expert GEMMs (kernels/moe/route.cu, grouped_gemm.cu) against
kernels/moe/ref.py, eagerly and inside a captured CUDA graph.

Routing must match the reference exactly (ids, sorted_slots, expert_offsets; weights to f32
rounding). Router logits are drawn well separated (a shuffled grid plus small noise) so that
f32-vs-float64 softmax rounding cannot reorder two experts; a separate test uses integer logits
with many exact ties to pin the tie rule (lower expert index first). The grouped GEMMs are
compared with a float64 reference on the same bf16-rounded operands (x, dequantised weights,
and h, which the kernel stores as bf16) and with ref.moe_grouped_gemm at the bf16 tolerance.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import Family, require_gpu, run_captured  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits, random_weight, round_bf16  # noqa: E402
from ggfuse.kernels.gemm import launch as gl  # noqa: E402
from ggfuse.kernels.moe import launch  # noqa: E402
from ggfuse.kernels.moe import ref as moe_ref  # noqa: E402

TILE = launch.MOE_TILE


@pytest.fixture(params=[*gl.IMPLS, "wgmma_persist", "wgmma_tiles", "wgmma_generic", "small", "smallq"])
def impl(request):
    """The grouped-GEMM kernel family under test (gpu_util.Family; the launchers' arguments in
    .moe): mma.sync, or wgmma on cc 9.0 with persistent blocks on 256-row tiles (schedule wide;
    GGML weights and bf16 x, else the 128-row persistent kernels), wgmma_persist (persistent,
    128-row tiles), wgmma_tiles (a block per tile), wgmma_generic (the wide schedule with the
    element-wise dequant8), small (moe/grouped_small.cu: the few-rows kernels, every device),
    smallq (the same with Q4_K / Q6_K quants entering the MMA as integers: exact weights)."""
    if request.param.startswith("wgmma") and gl.device_cc() != 90:
        pytest.skip("the wgmma kernels need a compute capability 9.0 device")
    return Family(request.param)


def need(impl, *w_types):
    if impl.startswith("small") and any(not launch.small_ok(t, None, None, 1) for t in w_types):
        pytest.skip(f"no few-rows kernel for {w_types}")
    if impl == "smallq" and not any(t in launch.SMALLQ_TYPES for t in w_types):
        pytest.skip(f"smallq runs {w_types} as small does")
    if impl.startswith("wgmma") and any(t not in gl.SM90_TYPES for t in w_types):
        pytest.skip(f"no wgmma kernel for {w_types}")
    if impl == "wgmma_generic" and all(t == "bf16" for t in w_types):
        pytest.skip("bf16 weights are not dequantised")


def seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def separated_logits(T, E, rng):
    grid = np.linspace(-3.0, 3.0, E, dtype=np.float64)
    out = np.stack([rng.permutation(grid) for _ in range(T)])
    return (out + rng.uniform(-0.2, 0.2, out.shape) * (grid[1] - grid[0])).astype(np.float32)


def ref_route(logits, k, norm, scale, tile, gating="softmax"):
    """ref.moe_route from logits: x = logits, w_router = I (an exact f32 matmul)."""
    E = logits.shape[1]
    return moe_ref.moe_route(logits, np.eye(E, dtype=np.float32), k=k, gating=gating, norm=norm,
                             scale=scale, tile=tile)


class Route:
    """Device buffers of one moe_route call, poisoned."""

    def __init__(self, T, E, k, tile):
        self.T, self.E, self.k, self.tile = T, E, k, tile
        self.ids = cp.full((T, k), -7, dtype=cp.int32)
        self.w = cp.full((T, k), np.nan, dtype=cp.float32)
        self.slots = cp.full(launch.sorted_len(T, k, E, tile), -7, dtype=cp.int32)
        self.offs = cp.full(E + 1, -7, dtype=cp.int32)
        self.scratch = cp.full(launch.route_scratch_ints(T, k, E), 12345, dtype=cp.int32)

    def run(self, logits, n_valid, norm=True, scale=0.0, gating="softmax", stream=None):
        launch.moe_route(logits, self.T, self.E, self.k, norm, scale, self.tile, n_valid, self.ids, self.w,
                         self.slots, self.offs, self.scratch, stream, gating=gating)


def check_route(r: Route, logits, n_valid, norm=True, scale=0.0, gating="softmax"):
    ids, w, slots, offs = ref_route(logits[:n_valid], r.k, norm, scale, r.tile, gating)
    g_ids, g_w, g_slots, g_offs = (cp.asnumpy(a) for a in (r.ids, r.w, r.slots, r.offs))
    np.testing.assert_array_equal(g_ids[:n_valid], ids)
    np.testing.assert_allclose(g_w[:n_valid], w, rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(g_offs, offs)
    np.testing.assert_array_equal(g_slots[:slots.size], slots)
    assert (g_slots[slots.size:] == -1).all()
    if n_valid < r.T:   # padded tokens: harmless ids, zero weight
        np.testing.assert_array_equal(g_ids[n_valid:], np.tile(np.arange(r.k), (r.T - n_valid, 1)))
        assert (g_w[n_valid:] == 0).all()


@pytest.mark.parametrize("T,E,k,tile,n_valid,norm,scale,gating", [
    (4096, 256, 8, 128, 4096, True, 0.0, "softmax"),      # Qwen3.5-35B-A3B
    (300, 256, 8, 128, 257, True, 2.5, "softmax"),        # padded chunk, scaled weights
    (77, 128, 8, 16, 77, False, 0.0, "softmax"),          # Qwen3-MoE sized, small tile
    (33, 60, 4, 128, 30, True, 0.0, "sigmoid"),
    (5, 8, 2, 128, 5, True, 1.0, "softmax"),
], ids=["qwen35_T4096", "padded_scaled", "tile16_nonorm", "sigmoid_E60", "tiny"])
def test_route(T, E, k, tile, n_valid, norm, scale, gating):
    rng = np.random.default_rng(seed("route", T, E, k))
    logits = separated_logits(T, E, rng)
    r = Route(T, E, k, tile)
    r.run(cp.asarray(logits), cp.asarray([n_valid], dtype=cp.int32), norm, scale, gating)
    check_route(r, logits, n_valid, norm, scale, gating)


def test_route_ties():
    rng = np.random.default_rng(5)
    T, E, k = 200, 64, 8
    logits = rng.integers(0, 3, size=(T, E)).astype(np.float32)    # many exact ties
    r = Route(T, E, k, TILE)
    r.run(cp.asarray(logits), cp.asarray([T], dtype=cp.int32))
    check_route(r, logits, T)


def test_route_graph_replay_n_valid():
    """n_valid is read from device memory on every replay."""
    rng = np.random.default_rng(9)
    T, E, k = 512, 256, 8
    logits = cp.asarray(separated_logits(T, E, rng))
    nv = cp.asarray([T], dtype=cp.int32)
    r = Route(T, E, k, TILE)
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    r.run(logits, nv, stream=s)
    g = s.end_capture()
    for n_valid in (T, 100, 1):
        new = separated_logits(T, E, rng)
        logits[...] = cp.asarray(new)
        nv[...] = n_valid
        r.slots.fill(-7)
        r.w.fill(np.nan)
        cp.cuda.Device().synchronize()   # default-stream writes before the replay on s
        g.launch(s)
        s.synchronize()
        check_route(r, new, n_valid)


@pytest.mark.parametrize("T,E,k,n_valid,gating", [
    (1, 256, 8, 1, "softmax"),        # the decode step of Qwen3.5-35B-A3B
    (1, 128, 8, 0, "softmax"),        # a padding token only
    (6, 60, 4, 4, "sigmoid"),
])
def test_route_slot_experts(T, E, k, n_valid, gating):
    """moe_route_slot_experts: moe_route's ids and weights, and slot_expert = ids (-1 for a
    padding token's slots), what moe_slot_experts derives from the full layout."""
    rng = np.random.default_rng(seed("route_slots", T, E, k))
    logits = separated_logits(T, E, rng)
    ids = cp.full((T, k), -7, dtype=cp.int32)
    w = cp.full((T, k), np.nan, dtype=cp.float32)
    se = cp.full(T * k + 5, -7, dtype=cp.int32)
    launch.moe_route_slot_experts(cp.asarray(logits), T, E, k, True, 0.0, cp.asarray([n_valid], dtype=cp.int32),
                                  ids, w, se, gating=gating)
    cp.cuda.Device().synchronize()
    g_ids, g_w, g_se = cp.asnumpy(ids), cp.asnumpy(w), cp.asnumpy(se)
    want = np.full(T * k, -1, np.int32)
    if n_valid:
        r_ids, r_w, _, _ = ref_route(logits[:n_valid], k, True, 0.0, TILE, gating)
        np.testing.assert_array_equal(g_ids[:n_valid], r_ids)
        np.testing.assert_allclose(g_w[:n_valid], r_w, rtol=2e-5, atol=1e-7)
        want[:n_valid * k] = r_ids.reshape(-1)
    assert (g_w[n_valid:] == 0).all()
    np.testing.assert_array_equal(g_se[:T * k], want)
    assert (g_se[T * k:] == -7).all(), "nothing written past the T k slots"


# ---- grouped GEMMs ---------------------------------------------------------------------------

def silu(x):
    return x / (1.0 + np.exp(-x))


def bf16_x(T, D, x_kind, rng):
    x = rng.standard_normal((T, D), dtype=np.float32)
    if x_kind == "bf16":
        bits = f32_to_bf16_bits(x)
        return cp.asarray(bits), bf16_bits_to_f32(bits)
    return cp.asarray(x), x


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def expected(x, wts, slots, offs, k, WG, WU, WD, act="silu"):
    """float64 reference with the kernel's roundings: bf16 x, weights and h."""
    gate = gelu if act == "gelu" else silu
    T = x.shape[0]
    X = round_bf16(x).astype(np.float64)
    out = np.zeros((T, WD.shape[1]))
    h_rows = {}
    for e in range(len(offs) - 1):
        seg = slots[offs[e]:offs[e + 1]]
        seg = seg[seg >= 0]
        if seg.size == 0:
            continue
        xe = X[seg // k]
        h = gate(xe @ WG[e].T) * (xe @ WU[e].T)
        h = round_bf16(h.astype(np.float32)).astype(np.float64)
        for i, s in enumerate(seg):
            h_rows[int(s)] = h[i]
        y = h @ WD[e].T
        np.add.at(out, seg // k, y * wts.reshape(-1)[seg, None])
    return out, h_rows


def check(out, ref, tol_rms=1e-2):
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all()
    e = float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    m = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert e < tol_rms and m < 2e-2, f"rel rms {e:.3g}, max-abs/max {m:.3g}"


def scattered(w, E: int, first: int):
    """The experts of a stack [E, ...] spread as a streamed layer's are (runtime/cuda/streaming.py):
    [0, first) in one buffer, [first, E) in another at a 256-byte aligned offset, here in reverse
    order so that nothing but the table finds them; returns (ExpertTable, the buffers)."""
    from ggfuse.kernels.moe.table import ExpertTable
    flat = w.reshape(E, -1).view(cp.uint8).reshape(E, -1)
    eb = flat.shape[1]
    lo = cp.array(flat[:first])
    hi = cp.zeros(256 + (E - first) * eb, dtype=cp.uint8)
    ptrs = []
    for e in range(E):
        if e < first:
            ptrs.append(lo.data.ptr + e * eb)
        else:
            at = 256 + (E - 1 - e) * eb
            hi[at:at + eb] = flat[e]
            ptrs.append(hi.data.ptr + at)
    return ExpertTable(ptrs, w.shape, keep=(lo, hi))


def run_moe(T, E, k, D, F, gu_type, dn_type, x_kind, merged, n_valid, rng, graph=False, out_offset=0,
            table_first=None, kw=None, act="silu"):
    """table_first: the experts are read through expert tables (scattered, first experts resident)
    as well as from their stacks; h must match bit for bit and the outputs to f32 atomics order.
    kw: the grouped GEMMs' launcher arguments (the kernel family: gpu_util.Family.moe)."""
    kw = kw or {}
    logits = separated_logits(T, E, rng)
    x, x_host = bf16_x(T, D, x_kind, rng)
    if merged:
        raw_gu, dense_gu = random_weight(gu_type, (E, 2 * F, D), rng)
        w_gate, w_up = cp.asarray(raw_gu), None
        WG, WU = dense_gu[:, :F], dense_gu[:, F:]
    else:
        raw_g, WG = random_weight(gu_type, (E, F, D), rng)
        raw_u, WU = random_weight(gu_type, (E, F, D), rng)
        w_gate, w_up = cp.asarray(raw_g), cp.asarray(raw_u)
    raw_d, WD = random_weight(dn_type, (E, D, F), rng)
    w_down = cp.asarray(raw_d)
    r = Route(T, E, k, TILE)
    S = r.slots.size
    h = cp.full((S, F), 0xFFFF, dtype=cp.uint16)
    # out_offset: out starts that many floats into its buffer (2: 8- but not 16-byte aligned, so
    # the wgmma scatter takes its per-element path instead of red.v4)
    out_buf = cp.full(T * D + out_offset, np.nan, dtype=cp.float32)
    out = out_buf[out_offset:].reshape(T, D)
    nv = cp.asarray([n_valid], dtype=cp.int32)
    lg = cp.asarray(logits)
    launch.prepare(x_kind, gu_type, dn_type, kw.get("impl"), kw.get("dequant", "fast"), act=act)

    def layer(stream=None):
        r.run(lg, nv, stream=stream)
        launch.moe_gate_up(x, x_kind, w_gate, w_up, gu_type, E, F, D, r.slots, r.offs, k, h, stream, act=act, **kw)
        launch.moe_down(h, w_down, dn_type, E, D, F, r.slots, r.offs, r.w, k, out, stream, **kw)

    if graph:
        s = cp.cuda.Stream(non_blocking=True)
        run_captured(s, layer)
    else:
        layer()
    cp.cuda.Device().synchronize()
    if table_first is not None:
        from ggfuse.kernels.moe import table as mt
        tg, tu, td = (scattered(w, E, table_first) if w is not None else None for w in (w_gate, w_up, w_down))
        rb = gl.qtype(gl.weight_name(gu_type)).row_bytes(D)
        tab_gu = mt.device_table(cp, mt.gate_up_pointers(tg, tu, E, F * rb))
        tab_d = mt.device_table(cp, mt.pointers(td, E))
        h2 = cp.full((S, F), 0xFFFF, dtype=cp.uint16)
        out2 = cp.full((T, D), np.nan, dtype=cp.float32)

        def layer2(stream=None):
            launch.moe_gate_up(x, x_kind, tg, tu, gu_type, E, F, D, r.slots, r.offs, k, h2, stream, wtab=tab_gu,
                               act=act, **kw)
            launch.moe_down(h2, td, dn_type, E, D, F, r.slots, r.offs, r.w, k, out2, stream, wtab=tab_d, **kw)
        if graph:
            run_captured(cp.cuda.Stream(non_blocking=True), layer2)
        else:
            layer2()
        cp.cuda.Device().synchronize()
        n_rows = int(cp.asnumpy(r.offs)[-1])
        assert np.array_equal(cp.asnumpy(h2)[:n_rows], cp.asnumpy(h)[:n_rows]), "h through the expert tables"
        np.testing.assert_allclose(cp.asnumpy(out2), cp.asnumpy(out), rtol=1e-5, atol=1e-6)
    check_route(r, logits, n_valid)
    slots, offs, wts = cp.asnumpy(r.slots), cp.asnumpy(r.offs), cp.asnumpy(r.w)
    # the kernels' weights: rounded to bf16, except the integer-valued path's (smallq), exact
    exact = (kw.get("schedule") == "smallq" and gu_type in launch.SMALLQ_TYPES,
             kw.get("schedule") == "smallq" and dn_type in launch.SMALLQ_TYPES)
    WGr, WUr, WDr = (w.astype(np.float64) if ex else round_bf16(w).astype(np.float64)
                     for w, ex in ((WG, exact[0]), (WU, exact[0]), (WD, exact[1])))
    ref, h_rows = expected(x_host[:n_valid], wts[:n_valid], slots, offs, k, WGr, WUr, WDr, act=act)
    got = cp.asnumpy(out)
    check(got[:n_valid], ref, tol_rms=2e-3)
    assert (got[n_valid:] == 0).all(), "padded tokens must get nothing from the experts"
    # h: the rows of real slots as the reference, padding rows inside the layout exactly 0
    h_host = bf16_bits_to_f32(cp.asnumpy(h))
    pos = {int(s): i for i, s in enumerate(slots) if s >= 0}
    hs = np.stack([h_host[pos[s]] for s in sorted(h_rows)])
    check(hs, np.stack([h_rows[s] for s in sorted(h_rows)]))
    pad = [i for i in range(offs[-1]) if slots[i] < 0]
    if kw.get("schedule") in launch.SMALL_SCHEDULES:
        # the few-rows kernels leave padding rows as they were (the poison, NaN bits), and the
        # output above is finite: their down never read them
        assert np.isnan(h_host[pad]).all()
    else:
        assert (h_host[pad] == 0).all()
    # and the IR's reference (f32, no intermediate rounding) at the bf16 tolerance
    full = moe_ref.moe_grouped_gemm(x_host[:n_valid], wts[:n_valid], slots, offs, w_down=WD, w_gate=WG, w_up=WU,
                                    act=act)
    check(got[:n_valid], full.astype(np.float64))


@pytest.mark.parametrize("gu_type,dn_type", [
    ("q4_k", "q6_k"), ("q5_k", "q4_k"), ("q8_0", "q8_0"), ("bf16", "bf16"), ("q4_0", "q5_0"), ("q4_1", "q4_1"),
], ids=lambda t: t)
@pytest.mark.parametrize("x_kind", ["f32", "bf16"])
def test_moe_layer(gu_type, dn_type, x_kind, impl):
    need(impl, gu_type, dn_type)
    rng = np.random.default_rng(seed("moe", gu_type, dn_type, x_kind))
    run_moe(T=200, E=16, k=4, D=512, F=256, gu_type=gu_type, dn_type=dn_type, x_kind=x_kind,
            merged=False, n_valid=200, rng=rng, kw=impl.moe)


@pytest.mark.parametrize("dn_type", ["q5_0", "q8_0"])
def test_moe_layer_gelu_gemma4_shapes(dn_type, impl):
    """Gemma 4 26B-A4B's experts: GELU-tanh GLU (act "gelu", GLU_ACT=1 modules), 128 experts top-8,
    expert FFN 704 (not a multiple of 256, so Q4_K_M files carry Q5_0 / Q8_0 down experts: read
    as stored), the merged gate_up, a padded chunk; eagerly and in a CUDA graph."""
    need(impl, "q4_k", dn_type)
    for graph in (False, True):
        rng = np.random.default_rng(seed("gelu", dn_type, str(graph)))
        run_moe(T=160, E=128, k=8, D=256, F=704, gu_type="q4_k", dn_type=dn_type, x_kind="bf16",
                merged=True, n_valid=151, rng=rng, graph=graph, kw=impl.moe, act="gelu")


def test_moe_layer_merged_gate_up_padded_chunk(impl):
    rng = np.random.default_rng(31)
    run_moe(T=300, E=32, k=8, D=256, F=512, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=True, n_valid=211, rng=rng, kw=impl.moe)


def test_moe_layer_many_experts_few_tokens(impl):
    """Decode-like: most experts empty, most row tiles past the layout."""
    rng = np.random.default_rng(41)
    run_moe(T=3, E=256, k=8, D=256, F=256, gu_type="q4_k", dn_type="q6_k", x_kind="f32",
            merged=False, n_valid=3, rng=rng, kw=impl.moe)


def test_moe_layer_graph(impl):
    rng = np.random.default_rng(51)
    run_moe(T=260, E=16, k=4, D=256, F=256, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=False, n_valid=260, rng=rng, kw=impl.moe, graph=True)


def test_moe_layer_prefill_sized(impl):
    """Qwen3.5-35B-A3B expert shapes (D = 2048, F = 512, Q4_K gate/up, Q6_K down) with 16 experts
    of top-8 over 256 tokens: about 128 rows per expert, so full and partial 128-row tiles and
    down's K = 512 (8 wgmma steps: the 4-deep ring wraps twice)."""
    rng = np.random.default_rng(61)
    run_moe(T=256, E=16, k=8, D=2048, F=512, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=True, n_valid=250, rng=rng, kw=impl.moe)


# ---- the persistent wgmma schedules (moe90w_*, moe90p_*): few blocks, so that each walks many items ----

def wgmma_persist(impl, blocks):
    if impl not in ("wgmma", "wgmma_persist", "wgmma_generic"):
        pytest.skip("persistent blocks: the wgmma families that use them")
    impl.moe["max_blocks"] = blocks


@pytest.mark.parametrize("blocks", [1, 3, 7])
def test_moe_layer_persistent_few_blocks(impl, blocks):
    """1, 3 or 7 blocks for about 60 row tiles x 2-4 column tiles: every block runs many items
    back to back (the ring, the raw ring and the double-buffered tables wrap across items; odd
    and even item counts per block), D = F = 512 (8 steps per item: two raw Q4_K / Q6_K units),
    padded chunk, merged gate_up."""
    wgmma_persist(impl, blocks)
    rng = np.random.default_rng(71 + blocks)
    run_moe(T=700, E=32, k=8, D=512, F=512, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=True, n_valid=689, rng=rng, kw=impl.moe)


def test_moe_layer_persistent_graph(impl):
    wgmma_persist(impl, 5)
    rng = np.random.default_rng(81)
    run_moe(T=300, E=24, k=6, D=256, F=256, gu_type="q8_0", dn_type="q4_k", x_kind="f32",
            merged=False, n_valid=300, rng=rng, kw=impl.moe, graph=True)


@pytest.mark.parametrize("w_type", ["q8_0", "bf16"])
def test_moe_down_tail_and_unaligned_out(impl, w_type):
    """D = 320 (down's last column tile is half full) and an output 8- but not 16-byte aligned
    (the wgmma scatter's per-element atomics instead of red.v4); every schedule."""
    need(impl, w_type)
    rng = np.random.default_rng(91)
    run_moe(T=150, E=8, k=2, D=320, F=256, gu_type=w_type, dn_type=w_type, x_kind="bf16",
            merged=False, n_valid=150, rng=rng, kw=impl.moe, out_offset=2)
    run_moe(T=150, E=8, k=2, D=320, F=256, gu_type=w_type, dn_type=w_type, x_kind="bf16",
            merged=False, n_valid=150, rng=rng, kw=impl.moe)


@pytest.mark.parametrize("blocks", [0, 3])
def test_moe_layer_wide_long_segments(impl, blocks):
    """About 450 rows per expert: an expert's segment (384 to 640 rows) is cut into several
    256-row wide tiles and a 128-row last one whose other half is the next expert's rows (gate_up
    must not write them); merged gate_up, padded chunk; all blocks or 3."""
    if blocks:
        wgmma_persist(impl, blocks)
    rng = np.random.default_rng(101 + blocks)
    run_moe(T=900, E=8, k=4, D=256, F=512, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=True, n_valid=893, rng=rng, kw=impl.moe)


@pytest.mark.parametrize("merged,first", [(False, 5), (True, 0), (True, 11)])
def test_moe_layer_through_expert_tables(impl, merged, first):
    """A streamed layer split by the plan: the first experts resident, the rest in a slot,
    found through expert tables (kernels/moe/table.py); every kernel family, eager and captured."""
    rng = np.random.default_rng(111 + first)
    run_moe(T=400, E=12, k=4, D=512, F=256, gu_type="q4_k", dn_type="q6_k", x_kind="bf16",
            merged=merged, n_valid=397, rng=rng, kw=impl.moe, table_first=first, graph=first == 11)


@pytest.mark.parametrize("E,k,D,shared,gating", [
    (256, 8, 2048, True, "softmax"),      # Qwen3.5-35B-A3B's decode step
    (128, 8, 2048, False, "softmax"),
    (60, 4, 1024, True, "sigmoid"),
    (512, 8, 256, False, "softmax"),
])
@pytest.mark.parametrize("pdl", [False, True])
def test_route1_one_launch(E, k, D, shared, gating, pdl):
    """moe_route1: the router's f32 logits (against float64), the shared gate's sigmoid, and the
    top-k of moe_route_slot_experts on those logits, from one launch; replayed several times in a
    captured graph (with programmatic edges: kernels/graph.py), as the counter that finds the last
    block must come back to 0 each time."""
    from ggfuse.kernels.graph import capture
    rng = np.random.default_rng(seed("route1", E, k, D, shared))
    x = rng.standard_normal(D).astype(np.float32)
    W = (rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32)
    ws = (rng.standard_normal(D) / np.sqrt(D)).astype(np.float32) if shared else None
    ref = W.astype(np.float64) @ x.astype(np.float64)
    d_x, d_w = cp.asarray(x), cp.asarray(W)
    d_ws = cp.asarray(ws) if shared else None
    logits = cp.full(E, np.nan, dtype=cp.float32)
    counter = cp.zeros(1, dtype=cp.uint32)
    ids = cp.full((1, k), -7, dtype=cp.int32)
    wts = cp.full((1, k), np.nan, dtype=cp.float32)
    se = cp.full(k + 5, -7, dtype=cp.int32)
    sh = cp.full((1, 1), np.nan, dtype=cp.float32) if shared else None
    nv = cp.asarray([1], dtype=cp.int32)
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()

    def run():
        launch.moe_route1(d_x, d_w, d_ws, D, E, k, True, 0.0, nv, logits, counter, ids, wts, se, sh, s, gating=gating)
    g = capture(s, [run], pdl=pdl)
    for _ in range(3):
        ids.fill(-7)
        se.fill(-7)
        cp.cuda.Device().synchronize()
        g.launch(s)
        s.synchronize()
        got = cp.asnumpy(logits).astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        r_ids, r_w, _, _ = ref_route(cp.asnumpy(logits)[None], k, True, 0.0, TILE, gating)
        np.testing.assert_array_equal(cp.asnumpy(ids), r_ids)
        np.testing.assert_allclose(cp.asnumpy(wts), r_w, rtol=2e-5, atol=1e-7)
        np.testing.assert_array_equal(cp.asnumpy(se)[:k], r_ids.reshape(-1))
        assert (cp.asnumpy(se)[k:] == -7).all() and int(counter.get()[0]) == 0
        if shared:
            np.testing.assert_allclose(float(sh.get()[0, 0]), 1 / (1 + np.exp(-(ws.astype(np.float64) @ x))),
                                       rtol=1e-5)
    if pdl:
        assert g.pdl_edges == 0      # one kernel: no edge to make programmatic


@pytest.mark.parametrize("E,k,D,shared", [(256, 8, 2048, True), (60, 4, 1024, False)])
def test_route1_with_its_add_rms_norm(E, k, D, shared):
    """moe_route1 add_norm=: the launch computes x = rms_norm(a + b) * w itself (the decode
    step's post-attention norm folded into the router): the logits and the shared gate equal
    float64 on that x, the top-k follows them, block 0 writes the sum exactly and the normed row
    as the unfolded norm's reference, whole and nothing past them; a and b are left alone."""
    from ggfuse.kernels.elementwise import ref as ew_ref
    rng = np.random.default_rng(seed("route1 norm", E, k, D, shared))
    a = rng.standard_normal(D).astype(np.float32)
    b = (3 * rng.standard_normal(D)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    eps = 1e-6
    normed, total = ew_ref.add_rms_norm(a[None], b[None], nw, eps=eps)
    x = normed[0].astype(np.float64)
    W = (rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32)
    ws = (rng.standard_normal(D) / np.sqrt(D)).astype(np.float32) if shared else None
    d_a, d_b, d_w = cp.asarray(a), cp.asarray(b), cp.asarray(W)
    d_ws = cp.asarray(ws) if shared else None
    osum = cp.full(D + 8, np.nan, dtype=cp.float32)
    onorm = cp.full(D + 8, np.nan, dtype=cp.float32)
    logits = cp.full(E, np.nan, dtype=cp.float32)
    counter = cp.zeros(1, dtype=cp.uint32)
    ids = cp.full((1, k), -7, dtype=cp.int32)
    wts = cp.full((1, k), np.nan, dtype=cp.float32)
    se = cp.full(k, -7, dtype=cp.int32)
    sh = cp.full((1, 1), np.nan, dtype=cp.float32) if shared else None
    nv = cp.asarray([1], dtype=cp.int32)
    launch.moe_route1(d_a, d_w, d_ws, D, E, k, True, 0.0, nv, logits, counter, ids, wts, se, sh, None,
                      add_norm=(d_b, cp.asarray(nw), eps, osum[:D], onorm[:D]))
    cp.cuda.Device().synchronize()
    np.testing.assert_allclose(cp.asnumpy(logits).astype(np.float64), W.astype(np.float64) @ x, rtol=1e-4, atol=1e-5)
    r_ids, r_w, _, _ = ref_route(cp.asnumpy(logits)[None], k, True, 0.0, TILE, "softmax")
    np.testing.assert_array_equal(cp.asnumpy(ids), r_ids)
    np.testing.assert_allclose(cp.asnumpy(wts), r_w, rtol=2e-5, atol=1e-7)
    if shared:
        np.testing.assert_allclose(float(sh.get()[0, 0]), 1 / (1 + np.exp(-(ws.astype(np.float64) @ x))), rtol=1e-5)
    got_s, got_n = cp.asnumpy(osum), cp.asnumpy(onorm)
    np.testing.assert_array_equal(got_s[:D], total[0])
    np.testing.assert_allclose(got_n[:D], normed[0], rtol=1e-5, atol=1e-6)
    assert np.isnan(got_s[D:]).all() and np.isnan(got_n[D:]).all() and int(counter.get()[0]) == 0
    np.testing.assert_array_equal(cp.asnumpy(d_a), a)
    np.testing.assert_array_equal(cp.asnumpy(d_b), b)
    with pytest.raises(ValueError, match="add_norm b"):
        launch.moe_route1(d_a, d_w, d_ws, D, E, k, True, 0.0, nv, logits, counter, ids, wts, se, sh, None,
                          add_norm=(d_b[:8], cp.asarray(nw), eps, osum[:D], onorm[:D]))
