"""The few-token (decode) experts, kernels/moe/gemv.cu, against a float64 reference of
kernels/moe/ref.py's MoE: the routed experts found in the device router's sorted layout, read
as the GGUF stores them (and through expert tables, as a streamed layer's), the shared expert
added through the same kernels, padding tokens given nothing; eagerly and in a captured graph.
Everything is f32 (no bf16 rounding), so the bar is f32 accumulation order."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu, run_captured  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits, random_weight  # noqa: E402
from ggfuse.kernels.moe import launch  # noqa: E402
from ggfuse.kernels.moe import table as mt  # noqa: E402
from ggfuse.kernels.quant.types import qtype  # noqa: E402
from test_gpu_moe import Route, scattered, separated_logits  # noqa: E402


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def close(got, ref, rms=1e-4, mx=1e-3):
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all()
    e = float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    m = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert e < rms and m < mx, f"rel rms {e:.3g}, max-abs/max {m:.3g}"


def run(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph, tables, seed, *, shared_types=None,
        layout="sorted", accumulate=False):
    """One MoE layer through moe_gemv_gate_up + moe_gemv_down (the shared expert, of shared_types
    (gate_up, down), default the routed ones', as one more slot of each token in both launches)
    against the float64 reference. layout "sorted": slot_expert from the router's sorted layout
    (moe_slot_experts inside the launcher); "given": from moe_route_slot_experts, as the decode
    plan's slots "slot_expert". accumulate: out holds a prior value the experts add to."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D), dtype=np.float32)
    if x_kind == "bf16":
        bits = f32_to_bf16_bits(x)
        x_dev, x = cp.asarray(bits), bf16_bits_to_f32(bits)
    else:
        x_dev = cp.asarray(x)
    rb = qtype(gu).row_bytes(D)
    if merged:
        raw, dense = random_weight(gu, (E, 2 * F, D), rng)
        w_gate, WG, WU = cp.asarray(raw), dense[:, :F], dense[:, F:]
        w_up, up_ptr, e_gu = None, w_gate.data.ptr + F * rb, 2 * F * rb
    else:
        raw_g, WG = random_weight(gu, (E, F, D), rng)
        raw_u, WU = random_weight(gu, (E, F, D), rng)
        w_gate, w_up = cp.asarray(raw_g), cp.asarray(raw_u)
        up_ptr, e_gu = w_up.data.ptr, F * rb
    raw_d, WD = random_weight(dn, (E, D, F), rng)
    w_down = cp.asarray(raw_d)
    e_d = qtype(dn).row_bytes(F) * D
    r = Route(T, E, k, launch.MOE_TILE)
    nv = cp.asarray([n_valid], dtype=cp.int32)
    lg = cp.asarray(separated_logits(T, E, rng))
    h = cp.full((T * k, F), np.nan, dtype=cp.float32)
    slot_e = cp.full(T * k, -7, dtype=cp.int32)
    prior = rng.standard_normal((T, D), dtype=np.float32) if accumulate else None
    prior_dev = None if prior is None else cp.asarray(prior)
    out = cp.full((T, D), np.nan, dtype=cp.float32)
    wtab_gu = wtab_d = None
    if tables:
        tg, tu, td = (scattered(w, E, E // 3) if w is not None else None for w in (w_gate, w_up, w_down))
        wtab_gu = mt.device_table(cp, mt.gate_up_pointers(tg, tu, E, F * rb))
        wtab_d = mt.device_table(cp, mt.pointers(td, E))
    Fs = 2 * F if shared else 0
    sh = None
    if shared:
        sgu, sdn = shared_types or (gu, dn)
        raw_sg, SG = random_weight(sgu, (Fs, D), rng)
        raw_su, SU = random_weight(sgu, (Fs, D), rng)
        raw_sd, SD = random_weight(sdn, (D, Fs), rng)
        s_gate = rng.uniform(0.1, 0.9, T).astype(np.float32)
        sh = launch.GemvShared(gate=cp.asarray(raw_sg), up=cp.asarray(raw_su), down=cp.asarray(raw_sd),
                               gate_up_type=sgu, down_type=sdn, F=Fs, h=cp.full((T, Fs), np.nan, dtype=cp.float32),
                               scale=cp.asarray(s_gate))

    def layer(stream=None):
        if prior_dev is not None:        # a device copy on the stream: capturable
            cp.cuda.runtime.memcpyAsync(out.data.ptr, prior_dev.data.ptr, out.nbytes,
                                        cp.cuda.runtime.memcpyDeviceToDevice, 0 if stream is None else stream.ptr)
        if layout == "given":
            launch.moe_route_slot_experts(lg, T, E, k, True, 0.0, nv, r.ids, r.w, slot_e, stream=stream)
            where = {}
        else:
            r.run(lg, nv, stream=stream)
            where = {"sorted_slots": r.slots, "expert_offsets": r.offs}
        launch.moe_gemv_gate_up(x_dev, None if tables else w_gate, 0 if tables else up_ptr, 0 if tables else e_gu,
                                gu, E, F, D, k, h, **where, slot_expert=slot_e, wtab=wtab_gu, act=act, shared=sh,
                                stream=stream)
        launch.moe_gemv_down(h, None if tables else w_down, 0 if tables else e_d, dn, D, F, k, r.w, out,
                             slot_expert=slot_e, wtab=wtab_d, shared=sh, accumulate=accumulate, stream=stream)

    if graph:
        g = run_captured(cp.cuda.Stream(non_blocking=True), layer)
        out.fill(np.nan)        # a replay must write every element again
        h.fill(np.nan)
        cp.cuda.Device().synchronize()   # the fill runs on the default stream, the replay on s
        s = cp.cuda.Stream(non_blocking=True)
        g.launch(s)
        s.synchronize()
    else:
        layer()
        cp.cuda.Device().synchronize()
    ids, wts = cp.asnumpy(r.ids), cp.asnumpy(r.w)
    fa = gelu if act == "gelu" else silu
    X = x.astype(np.float64)
    ref = np.zeros((T, D)) if prior is None else prior.astype(np.float64)
    for t in range(n_valid):
        for j in range(k):
            e = int(ids[t, j])
            hh = fa(X[t] @ WG[e].T.astype(np.float64)) * (X[t] @ WU[e].T.astype(np.float64))
            ref[t] += wts[t, j] * (hh @ WD[e].T.astype(np.float64))
    if shared:
        for t in range(T):      # the shared expert runs for every token, padding ones too
            hh = silu(X[t] @ SG.T.astype(np.float64)) * (X[t] @ SU.T.astype(np.float64))
            ref[t] += s_gate[t] * (hh @ SD.T.astype(np.float64))
    got = cp.asnumpy(out)
    close(got[:n_valid], ref[:n_valid])
    se = cp.asnumpy(slot_e)
    assert (se[:n_valid * k].reshape(n_valid, k) == ids[:n_valid]).all(), "each slot's expert"
    assert (se[n_valid * k:] == -1).all(), "padding tokens' slots hold no expert"
    assert (cp.asnumpy(h)[n_valid * k:] == 0).all(), "padding tokens' slots get zero rows"
    if shared:
        if n_valid < T:
            close(got[n_valid:], ref[n_valid:])
    else:
        assert (got[n_valid:] == ref[n_valid:]).all(), "padded tokens get nothing from the experts"


CASES = [
    # T, n_valid, E, k, D, F, gate_up type, down type, x, merged, shared, act
    pytest.param(1, 1, 16, 8, 2048, 512, "q4_k", "q6_k", "f32", True, True, "silu", id="q35-decode"),
    pytest.param(1, 1, 64, 8, 512, 256, "q8_0", "q8_0", "bf16", False, False, "silu", id="q8-bf16x"),
    pytest.param(1, 1, 24, 8, 768, 704, "q5_0", "q8_0", "f32", True, False, "gelu", id="gemma-704-gelu"),
    pytest.param(3, 2, 64, 4, 512, 256, "q4_k", "q4_k", "f32", False, True, "silu", id="T3-padded"),
    pytest.param(1, 1, 32, 4, 256, 128, "bf16", "bf16", "f32", False, True, "silu", id="bf16-weights"),
    pytest.param(2, 2, 48, 6, 512, 320, "q4_0", "q5_1", "bf16", True, False, "silu", id="q4_0-q5_1"),
    pytest.param(8, 5, 64, 10, 512, 256, "q5_k", "q6_k", "bf16", True, True, "silu", id="T8-k10-shared"),
    pytest.param(2, 2, 32, 2, 1024, 512, "q6_k", "q4_k", "f32", False, True, "silu", id="k2-q6_k-gate"),
]


@pytest.mark.parametrize("T,n_valid,E,k,D,F,gu,dn,x_kind,merged,shared,act", CASES)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_moe_gemv(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph):
    run(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph, tables=False,
        seed=zlib.crc32(f"{T}/{E}/{k}/{D}/{F}/{gu}/{dn}/{x_kind}".encode()))


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "with-shared"])
def test_moe_gemv_through_expert_tables(merged, shared):
    run(1, 1, 64, 8, 512, 256, "q4_k", "q6_k", "f32", merged, shared, "silu", graph=True, tables=True, seed=7)


# a shared expert of other types than the routed experts: the launchers build gemv.cu for the
# (routed, shared) pair and still launch once per half
MIXED = [
    pytest.param(("q8_0", "q8_0"), id="shared-q8_0-both"),
    pytest.param(("q4_k", "q8_0"), id="shared-down-only"),
    pytest.param(("bf16", "q6_k"), id="shared-gate_up-only"),
]


@pytest.mark.parametrize("shared_types", MIXED)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_moe_gemv_shared_of_another_type(shared_types, graph):
    run(2, 1, 32, 8, 1024, 256, "q4_k", "q6_k", "f32", True, True, "silu", graph, tables=False, seed=11,
        shared_types=shared_types)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_moe_gemv_given_slot_experts(graph):
    """The decode plan's path: the router writes each slot's expert (moe_route_slot_experts),
    no sorted layout; a padding token's slots get -1 and nothing."""
    run(2, 1, 256, 8, 2048, 512, "q4_k", "q6_k", "f32", True, True, "silu", graph, tables=False, seed=5,
        layout="given")


def test_moe_gemv_accumulates():
    run(1, 1, 32, 8, 512, 256, "q4_k", "q6_k", "f32", True, True, "silu", graph=True, tables=False, seed=3,
        accumulate=True)
