"""The token-recurrent GPU kernels of the gated delta rule (kernels/deltanet/recurrent.cu) against
its numpy definition: the loop kernel gdr_recurrent_* (any T; the fallback) and the one-token
step kernel gdr_step_* that the launcher picks for T = 1 (the decode step), which kernel ran for
which shape, and the step inside a captured graph."""
import numpy as np
import pytest

from ggfuse.kernels.deltanet import ref

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu  # noqa: E402

cp = require_gpu()


@pytest.mark.parametrize("T,Hk,Hv,K,V,head_map", [(1, 2, 4, 32, 32, "tile"), (37, 2, 4, 32, 32, "interleave"),
                                                  (70, 1, 3, 16, 48, "tile"), (20, 4, 4, 128, 128, "tile")])
def test_recurrent_matches_reference(T, Hk, Hv, K, V, head_map):
    from ggfuse.kernels.deltanet import launch as dn
    rng = np.random.default_rng(T)
    q = ref_norm(rng.standard_normal((T, Hk, K)))
    k = ref_norm(rng.standard_normal((T, Hk, K)))
    v = rng.standard_normal((T, Hv, V)).astype(np.float32)
    g = (-np.abs(rng.standard_normal((T, Hv)))).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (T, Hv)).astype(np.float32)
    s0 = rng.standard_normal((Hv, K, V)).astype(np.float32) * 0.1
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, s0, scale=K ** -0.5, head_map=head_map)
    state = cp.asarray(s0)
    out = cp.full((T, Hv, V), np.nan, dtype=cp.float32)
    dn.gated_delta_rule_recurrent(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(g), cp.asarray(beta),
                                  state, out, K ** -0.5, head_map)
    np.testing.assert_allclose(cp.asnumpy(out), o_ref, rtol=1e-4, atol=1e-4 * np.abs(o_ref).max())
    np.testing.assert_allclose(cp.asnumpy(state), s_ref, rtol=1e-4, atol=1e-4 * np.abs(s_ref).max())


def ref_norm(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("in_dt,out_dt", [("bf16", "f32"), ("bf16", "bf16"), ("f32", "bf16")])
@pytest.mark.parametrize("T,Hk,Hv,K,V", [(1, 16, 32, 128, 128), (3, 2, 4, 64, 64)], ids=["decode-q35", "T3"])
def test_recurrent_bf16_storage(in_dt, out_dt, T, Hk, Hv, K, V):
    """The decode step's operands as the chunked path stores them: q, k, v bf16 (rounded before
    the reference sees them, so only the f32 arithmetic and the output rounding differ), q and k
    strided views of one fused row, out bf16 or f32."""
    from ggfuse.kernels.deltanet import launch as dn
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits
    rng = np.random.default_rng(100 + T)
    qkv = np.concatenate([ref_norm(rng.standard_normal((T, Hk, K))).reshape(T, -1),
                          ref_norm(rng.standard_normal((T, Hk, K))).reshape(T, -1)], axis=1)
    v = rng.standard_normal((T, Hv, V)).astype(np.float32)
    if in_dt == "bf16":
        qkv_bits, v_bits = f32_to_bf16_bits(qkv), f32_to_bf16_bits(v)
        qkv, v = bf16_bits_to_f32(qkv_bits), bf16_bits_to_f32(v_bits)
        qkv_dev, v_dev = cp.asarray(qkv_bits), cp.asarray(v_bits)
    else:
        qkv_dev, v_dev = cp.asarray(qkv), cp.asarray(v)
    q, k = qkv[:, :Hk * K].reshape(T, Hk, K), qkv[:, Hk * K:].reshape(T, Hk, K)
    g = (-np.abs(rng.standard_normal((T, Hv)))).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (T, Hv)).astype(np.float32)
    s0 = rng.standard_normal((Hv, K, V)).astype(np.float32) * 0.1
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, s0, scale=K ** -0.5, head_map="tile")
    state = cp.asarray(s0)
    out = cp.full((T, Hv, V), 0xFFFF if out_dt == "bf16" else np.nan,
                  dtype=cp.uint16 if out_dt == "bf16" else cp.float32)
    qd = qkv_dev[:, :Hk * K].reshape(T, Hk, K)
    kd = qkv_dev[:, Hk * K:].reshape(T, Hk, K)
    dn.gated_delta_rule_recurrent(qd, kd, v_dev, cp.asarray(g), cp.asarray(beta), state, out, K ** -0.5, "tile")
    got = bf16_bits_to_f32(cp.asnumpy(out)) if out_dt == "bf16" else cp.asnumpy(out)
    tol = 1e-2 if out_dt == "bf16" else 1e-4
    np.testing.assert_allclose(got, o_ref, rtol=tol, atol=tol * np.abs(o_ref).max())
    np.testing.assert_allclose(cp.asnumpy(state), s_ref, rtol=1e-4, atol=1e-4 * np.abs(s_ref).max())


# ---- one token: the step kernel (gdr_step_*) and when the launcher falls back ------------------

def _loaded_kernels(monkeypatch) -> list:
    """Spy on the recurrent.cu functions the launcher looks up (in call order)."""
    from ggfuse.kernels.deltanet import launch as dn
    names, real = [], dn.load_module

    class Spy:
        def __init__(self, mod):
            self.mod = mod

        def get_function(self, name):
            names.append(name)
            return self.mod.get_function(name)
    monkeypatch.setattr(dn, "load_module", lambda *a, **k: Spy(real(*a, **k)))
    return names


def _operands(rng, T, Hk, Hv, K, V, in_dt):
    """q, k as column slices of one fused row (the conv output), v a slice of a wider row (row
    stride > Hv V), in the decode plan's layout; host values bf16-rounded where stored bf16, so
    the reference sees what the kernel reads. Returns (host q, k, v, g, beta, s0), (device q, k, v)."""
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32, f32_to_bf16_bits
    row = np.concatenate([ref_norm(rng.standard_normal((T, Hk, K))).reshape(T, -1),
                          ref_norm(rng.standard_normal((T, Hk, K))).reshape(T, -1),
                          rng.standard_normal((T, Hv * V + 8)).astype(np.float32)], axis=1)
    if in_dt == "bf16":
        bits = f32_to_bf16_bits(row)
        row, dev = bf16_bits_to_f32(bits), cp.asarray(bits)
    else:
        dev = cp.asarray(row)
    cut = lambda a, lo, n, H, D: a[:, lo:lo + n].reshape(T, H, D)
    host = [cut(row, 0, Hk * K, Hk, K), cut(row, Hk * K, Hk * K, Hk, K), cut(row, 2 * Hk * K, Hv * V, Hv, V)]
    devs = [cut(dev, 0, Hk * K, Hk, K), cut(dev, Hk * K, Hk * K, Hk, K), cut(dev, 2 * Hk * K, Hv * V, Hv, V)]
    g = (-np.abs(rng.standard_normal((T, Hv)))).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (T, Hv)).astype(np.float32)
    s0 = rng.standard_normal((Hv, K, V)).astype(np.float32) * 0.1
    return (*host, g, beta, s0), devs


def _out(T, Hv, V, out_dt):
    """out filled with NaN (bf16 0xFFFF), so an element the kernel skips fails the check."""
    if out_dt == "bf16":
        return cp.full((T, Hv, V), 0xFFFF, dtype=cp.uint16)
    return cp.full((T, Hv, V), np.nan, dtype=cp.float32)


def _check(out, state, o_ref, s_ref, out_dt):
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32
    got = bf16_bits_to_f32(cp.asnumpy(out)) if out_dt == "bf16" else cp.asnumpy(out)
    tol = 1e-2 if out_dt == "bf16" else 1e-4
    np.testing.assert_allclose(got, o_ref, rtol=tol, atol=tol * np.abs(o_ref).max())
    np.testing.assert_allclose(cp.asnumpy(state), s_ref, rtol=1e-4, atol=1e-4 * np.abs(s_ref).max())


DTYPES = [("f32", "f32"), ("bf16", "f32"), ("f32", "bf16"), ("bf16", "bf16")]
STEP_SHAPES = {   # (Hk, Hv, K, V)
    "decode-q35": (16, 32, 128, 128),
    "odd-K40-V36": (2, 4, 40, 36),        # rows past K idle, a column block cut at V % 32 = 4
    "K16-V48": (1, 3, 16, 48),
    "K256": (2, 6, 256, 64),              # the most rows a thread holds
    "K200-V20": (4, 8, 200, 20),
}


@pytest.mark.parametrize("in_dt,out_dt", DTYPES, ids=[f"{a}-{b}" for a, b in DTYPES])
@pytest.mark.parametrize("head_map", ["tile", "interleave"])
@pytest.mark.parametrize("shape", list(STEP_SHAPES), ids=list(STEP_SHAPES))
def test_step_matches_reference(shape, head_map, in_dt, out_dt, monkeypatch):
    """One token through gdr_step_* (the launcher's pick for T = 1): output and state against
    the float64 definition."""
    from ggfuse.kernels.deltanet import launch as dn
    Hk, Hv, K, V = STEP_SHAPES[shape]
    loaded = _loaded_kernels(monkeypatch)
    (q, k, v, g, beta, s0), (qd, kd, vd) = _operands(np.random.default_rng(K * V + Hv), 1, Hk, Hv, K, V, in_dt)
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, s0, scale=K ** -0.5, head_map=head_map)
    state, out = cp.asarray(s0), _out(1, Hv, V, out_dt)
    dn.gated_delta_rule_recurrent(qd, kd, vd, cp.asarray(g), cp.asarray(beta), state, out, K ** -0.5, head_map)
    assert loaded == [f"gdr_step_{in_dt}_{out_dt}"]
    _check(out, state, o_ref, s_ref, out_dt)


FALLBACKS = {   # (T, Hk, Hv, K, V) -> why the loop kernel runs
    "K288": (1, 1, 2, 288, 32),       # K > 256
    "V30": (1, 2, 4, 32, 30),         # V % 4 != 0
    "T2": (2, 16, 32, 128, 128),      # more than one token
}


@pytest.mark.parametrize("case", list(FALLBACKS), ids=list(FALLBACKS))
def test_step_falls_back_to_the_loop(case, monkeypatch):
    from ggfuse.kernels.deltanet import launch as dn
    T, Hk, Hv, K, V = FALLBACKS[case]
    loaded = _loaded_kernels(monkeypatch)
    (q, k, v, g, beta, s0), (qd, kd, vd) = _operands(np.random.default_rng(T + K + V), T, Hk, Hv, K, V, "bf16")
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, s0, scale=K ** -0.5, head_map="tile")
    state, out = cp.asarray(s0), _out(T, Hv, V, "f32")
    dn.gated_delta_rule_recurrent(qd, kd, vd, cp.asarray(g), cp.asarray(beta), state, out, K ** -0.5, "tile")
    assert loaded == ["gdr_recurrent_bf16_f32"]
    _check(out, state, o_ref, s_ref, "f32")
    with pytest.raises(ValueError, match="step kernel"):
        dn.gated_delta_rule_recurrent(qd, kd, vd, cp.asarray(g), cp.asarray(beta), state, out, K ** -0.5,
                                      "tile", kernel="step")


@pytest.mark.parametrize("in_dt,out_dt", [("f32", "f32"), ("bf16", "bf16")], ids=["f32-f32", "bf16-bf16"])
def test_step_agrees_with_the_loop(in_dt, out_dt):
    """At the decode shape the two kernels (kernel="step" / "loop") differ by f32 rounding only."""
    from ggfuse.kernels.deltanet import launch as dn
    Hk, Hv, K, V = STEP_SHAPES["decode-q35"]
    (_, _, _, g, beta, s0), (qd, kd, vd) = _operands(np.random.default_rng(5), 1, Hk, Hv, K, V, in_dt)
    res = {}
    for kern in ("loop", "step"):
        state, out = cp.asarray(s0), _out(1, Hv, V, out_dt)
        dn.gated_delta_rule_recurrent(qd, kd, vd, cp.asarray(g), cp.asarray(beta), state, out, K ** -0.5,
                                      "interleave", kernel=kern)
        res[kern] = out, state
    from ggfuse.kernels.gemm.weights import bf16_bits_to_f32
    val = (lambda a: bf16_bits_to_f32(cp.asnumpy(a))) if out_dt == "bf16" else cp.asnumpy
    o_loop, o_step = val(res["loop"][0]), val(res["step"][0])
    tol = 1e-2 if out_dt == "bf16" else 1e-5
    np.testing.assert_allclose(o_step, o_loop, rtol=tol, atol=tol * np.abs(o_loop).max())
    s_loop, s_step = cp.asnumpy(res["loop"][1]), cp.asnumpy(res["step"][1])
    np.testing.assert_allclose(s_step, s_loop, rtol=1e-5, atol=1e-5 * np.abs(s_loop).max())


@pytest.mark.parametrize("head_map", ["tile", "interleave"])
def test_step_in_a_captured_graph(head_map, monkeypatch):
    """The decode step as the runtime replays it: captured once, replayed twice; each replay
    advances the state in place by one token (the same token twice here)."""
    from gpu_util import run_captured

    from ggfuse.kernels.deltanet import launch as dn
    Hk, Hv, K, V = STEP_SHAPES["decode-q35"]
    (q, k, v, g, beta, s0), (qd, kd, vd) = _operands(np.random.default_rng(11), 1, Hk, Hv, K, V, "f32")
    o1, s1 = ref.gated_delta_rule(q, k, v, g, beta, s0, scale=K ** -0.5, head_map=head_map)
    o2, s2 = ref.gated_delta_rule(q, k, v, g, beta, s1, scale=K ** -0.5, head_map=head_map)
    state, out = cp.asarray(s0), _out(1, Hv, V, "f32")
    gd, bd = cp.asarray(g), cp.asarray(beta)
    dn.gated_delta_rule_recurrent(qd, kd, vd, gd, bd, cp.asarray(s0), _out(1, Hv, V, "f32"), K ** -0.5, head_map)
    loaded = _loaded_kernels(monkeypatch)   # the module is loaded before the capture, as the runtime does
    s = cp.cuda.Stream(non_blocking=True)
    graph = run_captured(s, lambda st: dn.gated_delta_rule_recurrent(qd, kd, vd, gd, bd, state, out, K ** -0.5,
                                                                     head_map, stream=st))
    assert loaded == ["gdr_step_f32_f32"]
    _check(out, state, o1, s1, "f32")
    graph.launch(s)
    s.synchronize()
    _check(out, state, o2, s2, "f32")


@pytest.mark.parametrize("out_dt", ["f32", "bf16"])
@pytest.mark.parametrize("Hk,Hv,K,V,grouped,head_map", [(16, 32, 128, 128, False, "tile"), (16, 32, 128, 128, True, "interleave"),
                                                        (2, 4, 64, 64, False, "interleave"), (4, 4, 32, 48, False, "tile")],
                         ids=["q35", "q3next-grouped", "small", "v48"])
@pytest.mark.parametrize("n_valid", [1, 0])
def test_step_fused_matches_the_separate_launches(Hk, Hv, K, V, grouped, head_map, out_dt, n_valid):
    """gdr_step_fused (the decode plan's delta rule with its l2 norms and gates folded in) against
    the launches it replaces: l2_norm on q and k, deltanet_gates, then gdr_step; to f32 rounding,
    a padding token (n_valid 0) included, and inside a captured graph with programmatic edges."""
    from ggfuse.kernels.deltanet import launch as dn
    from ggfuse.kernels.dense import launch as dl
    from ggfuse.kernels.graph import capture
    rng = np.random.default_rng(Hk * 1000 + Hv * 10 + K + n_valid)
    qkv = cp.asarray(rng.standard_normal((1, 2 * Hk * K + Hv * V)).astype(np.float32))   # the conv output row
    q = qkv[:, :Hk * K].reshape(1, Hk, K)
    k = qkv[:, Hk * K:2 * Hk * K].reshape(1, Hk, K)
    v = qkv[:, 2 * Hk * K:].reshape(1, Hv, V)
    r = Hv // Hk
    ab = cp.asarray(rng.standard_normal((1, 2 * Hv)).astype(np.float32))
    alpha, beta_lin = (ab[:, :Hv], ab[:, Hv:]) if not grouped else \
        (ab.reshape(1, Hk, 2 * r)[:, :, :r], ab.reshape(1, Hk, 2 * r)[:, :, r:])
    dtb = cp.asarray(rng.standard_normal(Hv).astype(np.float32))
    ssm_a = cp.asarray(-np.abs(rng.standard_normal(Hv)).astype(np.float32))
    nv = cp.asarray([n_valid], dtype=cp.int32)
    s0 = (rng.standard_normal((Hv, K, V)) * 0.1).astype(np.float32)
    odt = cp.float32 if out_dt == "f32" else cp.uint16
    # the separate launches
    qn, kn = cp.empty((1, Hk, K), cp.float32), cp.empty((1, Hk, K), cp.float32)
    g, beta = cp.empty((1, Hv), cp.float32), cp.empty((1, Hv), cp.float32)
    st_ref, out_ref = cp.asarray(s0), cp.zeros((1, Hv, V), odt)
    dl.l2_norm(q, qn, eps=1e-6)
    dl.l2_norm(k, kn, eps=1e-6)
    dl.deltanet_gates(alpha, beta_lin, dtb, ssm_a, g, beta, nv)
    dn.gated_delta_rule_recurrent(qn, kn, v, g, beta, st_ref, out_ref, K ** -0.5, head_map, kernel="step")
    # the fused one, twice in a captured graph (the state carried)
    st, out = cp.asarray(s0), cp.full((1, Hv, V), 0xFFFF if out_dt == "bf16" else np.nan, odt)
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    run = lambda: dn.gdr_step_fused(q, k, v, st, out, K ** -0.5, head_map, eps_q=1e-6, eps_k=1e-6, alpha=alpha,  # noqa: E731
                                    beta_lin=beta_lin, dt_bias=dtb, ssm_a=ssm_a, n_valid=nv, stream=s)
    run()
    s.synchronize()
    o = cp.asnumpy(out).view(np.uint16) if out_dt == "bf16" else cp.asnumpy(out)
    o_ref = cp.asnumpy(out_ref).view(np.uint16) if out_dt == "bf16" else cp.asnumpy(out_ref)
    if out_dt == "bf16":
        from ggfuse.kernels.gemm.weights import bf16_bits_to_f32
        o, o_ref = bf16_bits_to_f32(o), bf16_bits_to_f32(o_ref)
        tol = 1e-2
    else:
        tol = 1e-5
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol * np.abs(o_ref).max())
    np.testing.assert_allclose(cp.asnumpy(st), cp.asnumpy(st_ref), rtol=1e-5, atol=1e-5 * np.abs(s0).max())
    if n_valid == 0:
        np.testing.assert_array_equal(cp.asnumpy(st), s0)        # a padding token leaves the state
    g2 = capture(s, [run], pdl=True)
    dn.gated_delta_rule_recurrent(qn, kn, v, g, beta, st_ref, out_ref, K ** -0.5, head_map, kernel="step")
    g2.launch(s)
    s.synchronize()
    np.testing.assert_allclose(cp.asnumpy(st), cp.asnumpy(st_ref), rtol=1e-5, atol=1e-5 * np.abs(s0).max())
