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


def run(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph, tables, seed):
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
    out = cp.full((T, D), np.nan, dtype=cp.float32)
    wtab_gu = wtab_d = None
    if tables:
        tg, tu, td = (scattered(w, E, E // 3) if w is not None else None for w in (w_gate, w_up, w_down))
        wtab_gu = mt.device_table(cp, mt.gate_up_pointers(tg, tu, E, F * rb))
        wtab_d = mt.device_table(cp, mt.pointers(td, E))
    Fs = 2 * F if shared else 0
    if shared:
        raw_sg, SG = random_weight(gu, (Fs, D), rng)
        raw_su, SU = random_weight(gu, (Fs, D), rng)
        raw_sd, SD = random_weight(dn, (D, Fs), rng)
        sg, su, sd = cp.asarray(raw_sg), cp.asarray(raw_su), cp.asarray(raw_sd)
        s_gate = rng.uniform(0.1, 0.9, T).astype(np.float32)
        s_gate_dev = cp.asarray(s_gate)
        hs = cp.full((T, Fs), np.nan, dtype=cp.float32)

    def layer(stream=None):
        r.run(lg, nv, stream=stream)
        launch.moe_gemv_gate_up(x_dev, None if tables else w_gate, 0 if tables else up_ptr, 0 if tables else e_gu,
                                gu, E, F, D, k, h, sorted_slots=r.slots, expert_offsets=r.offs, slot_expert=slot_e,
                                wtab=wtab_gu, act=act, stream=stream)
        launch.moe_gemv_down(h, None if tables else w_down, 0 if tables else e_d, dn, D, F, k, r.w, out,
                             slot_expert=slot_e, wtab=wtab_d, stream=stream)
        if shared:
            launch.moe_gemv_gate_up(x_dev, sg, su.data.ptr, 0, gu, 1, Fs, D, 1, hs, stream=stream)
            launch.moe_gemv_down(hs, sd, 0, dn, D, Fs, 1, s_gate_dev, out, accumulate=True, stream=stream)

    if graph:
        g = run_captured(cp.cuda.Stream(non_blocking=True), layer)
        out.fill(np.nan)        # a replay must write every element again
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
    ref = np.zeros((T, D))
    for t in range(n_valid):
        for j in range(k):
            e = int(ids[t, j])
            hh = fa(X[t] @ WG[e].T.astype(np.float64)) * (X[t] @ WU[e].T.astype(np.float64))
            ref[t] += wts[t, j] * (hh @ WD[e].T.astype(np.float64))
        if shared:
            hh = silu(X[t] @ SG.T.astype(np.float64)) * (X[t] @ SU.T.astype(np.float64))
            ref[t] += s_gate[t] * (hh @ SD.T.astype(np.float64))
    got = cp.asnumpy(out)
    close(got[:n_valid], ref[:n_valid])
    se = cp.asnumpy(slot_e)
    assert (se[:n_valid * k].reshape(n_valid, k) == ids[:n_valid]).all(), "each slot's expert"
    assert (se[n_valid * k:] == -1).all(), "padding tokens' slots hold no expert"
    if not shared:
        assert (got[n_valid:] == 0).all(), "padded tokens get nothing from the experts"


CASES = [
    # T, n_valid, E, k, D, F, gate_up type, down type, x, merged, shared, act
    pytest.param(1, 1, 16, 8, 2048, 512, "q4_k", "q6_k", "f32", True, True, "silu", id="q35-decode"),
    pytest.param(1, 1, 64, 8, 512, 256, "q8_0", "q8_0", "bf16", False, False, "silu", id="q8-bf16x"),
    pytest.param(1, 1, 24, 8, 768, 704, "q5_0", "q8_0", "f32", True, False, "gelu", id="gemma-704-gelu"),
    pytest.param(3, 2, 64, 4, 512, 256, "q4_k", "q4_k", "f32", False, True, "silu", id="T3-padded"),
    pytest.param(1, 1, 32, 4, 256, 128, "bf16", "bf16", "f32", False, True, "silu", id="bf16-weights"),
    pytest.param(2, 2, 48, 6, 512, 320, "q4_0", "q5_1", "bf16", True, False, "silu", id="q4_0-q5_1"),
]


@pytest.mark.parametrize("T,n_valid,E,k,D,F,gu,dn,x_kind,merged,shared,act", CASES)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_moe_gemv(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph):
    run(T, n_valid, E, k, D, F, gu, dn, x_kind, merged, shared, act, graph, tables=False,
        seed=zlib.crc32(f"{T}/{E}/{k}/{D}/{F}/{gu}/{dn}/{x_kind}".encode()))


@pytest.mark.parametrize("merged", [True, False])
def test_moe_gemv_through_expert_tables(merged):
    run(1, 1, 64, 8, 512, 256, "q4_k", "q6_k", "f32", merged, False, "silu", graph=True, tables=True, seed=7)
