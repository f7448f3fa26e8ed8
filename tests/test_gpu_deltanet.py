"""Chunked gated delta rule on tensor cores (kernels/deltanet/chunk_gdr.cu) against the float64
token-recurrent reference on the same bf16-rounded q/k/v: output and final state, eagerly and
inside a captured CUDA graph, with q/k/v as strided views into one conv-output buffer."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import errors as _errors, from_bf16_bits, require_gpu, to_bf16_bits  # noqa: E402

cp = require_gpu()

from ggfuse.kernels.deltanet import launch  # noqa: E402
from ggfuse.kernels.deltanet.ref import gated_delta_rule  # noqa: E402

RMS_TOL, MAX_TOL = 1e-2, 2e-2


def _assert_close(got, ref, what):
    assert np.isfinite(got).all(), f"{what}: {np.size(got) - np.isfinite(got).sum()} non-finite elements"
    rms, mx = _errors(got, ref)
    assert rms < RMS_TOL and mx < MAX_TOL, f"{what}: relative RMS {rms:.2e}, max-abs/max {mx:.2e}"


class Case:
    """Random inputs with the model's statistics; q, k, v live in one [T, 2 Hk K + Hv V + 8] buffer
    (the conv output layout, plus 8 spare columns so the row stride is not a power of two)."""

    def __init__(self, T, *, Hk=2, Hv=4, K=128, V=128, seed=0, state="random", decay="normal",
                 in_dtype="bf16", out_dtype="f32", head_map="tile", v_block=None):
        rng = np.random.default_rng(seed)
        self.T, self.Hk, self.Hv, self.K, self.V = T, Hk, Hv, K, V
        self.in_dtype, self.out_dtype, self.head_map, self.v_block = in_dtype, out_dtype, head_map, v_block
        self.scale = K ** -0.5
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # the model l2-normalises q, k
        q = unit(rng.standard_normal((T, Hk, K))).astype(np.float32)
        k = unit(rng.standard_normal((T, Hk, K))).astype(np.float32)
        v = rng.standard_normal((T, Hv, V)).astype(np.float32)
        softplus = lambda x: np.log1p(np.exp(x))
        spread = 0.5 if decay == "normal" else 1.5
        g = -softplus(rng.standard_normal((T, Hv))) * np.exp(spread * rng.standard_normal((T, Hv)))
        beta = 1 / (1 + np.exp(-rng.standard_normal((T, Hv))))
        if decay == "strong":          # near-total forgetting in places, no decay and beta ~ 1 in others
            g[rng.random((T, Hv)) < 0.1] = 0.0
            g[rng.random((T, Hv)) < 0.05] = -30.0
            beta[rng.random((T, Hv)) < 0.2] = 0.999
        self.g, self.beta = g.astype(np.float32), beta.astype(np.float32)
        self.state0 = ((0.5 * rng.standard_normal((Hv, K, V))) if state == "random"
                       else np.zeros((Hv, K, V))).astype(np.float32)
        # The kernel rounds q/k/v to bf16; the reference sees the same rounded values.
        self.q, self.k, self.v = (from_bf16_bits(to_bf16_bits(a)) for a in (q, k, v))
        self.width = 2 * Hk * K + Hv * V + 8
        buf = np.zeros((T, self.width), np.float32)
        buf[:, :Hk * K] = (q if in_dtype == "f32" else self.q).reshape(T, -1)
        buf[:, Hk * K:2 * Hk * K] = (k if in_dtype == "f32" else self.k).reshape(T, -1)
        buf[:, 2 * Hk * K:2 * Hk * K + Hv * V] = (v if in_dtype == "f32" else self.v).reshape(T, -1)
        self.buf = cp.asarray(buf if in_dtype == "f32" else to_bf16_bits(buf))
        self.g_d, self.beta_d = cp.asarray(self.g), cp.asarray(self.beta)
        self.state = cp.asarray(self.state0)
        self.out = cp.empty((T, Hv, V), dtype=cp.float32 if out_dtype == "f32" else cp.uint16)
        nbytes = launch.workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=in_dtype)
        self.ws = cp.full(nbytes, 0xFF, dtype=cp.uint8)  # NaN bf16 / f32 everywhere
        launch.prepare(K, V, v_block)

    def poison(self):
        self.out.fill(np.nan if self.out_dtype == "f32" else 0xFFFF)
        self.ws.fill(0xFF)

    def reset_state(self):
        self.state.set(self.state0)

    def run(self, stream=None, *, t0=0, t1=None):
        """The kernel on rows [t0, t1) with the device state as the initial state."""
        t1 = self.T if t1 is None else t1
        Hk, K = self.Hk, self.K
        buf, out = self.buf[t0:t1], self.out[t0:t1]
        launch.chunk_gated_delta_rule(
            buf, buf, buf, self.width, 0, Hk * K, self.width, 2 * Hk * K,
            self.g_d[t0:t1], self.beta_d[t0:t1], self.state, out, self.out_dtype,
            t1 - t0, Hk, self.Hv, K, self.V, self.scale, self.head_map, self.ws, stream, v_block=self.v_block)

    def result(self):
        o = cp.asnumpy(self.out)
        if self.out_dtype == "bf16":
            o = from_bf16_bits(o)
        return o, cp.asnumpy(self.state)

    def reference(self, t0=0, t1=None, state=None):
        sl = slice(t0, self.T if t1 is None else t1)
        return gated_delta_rule(self.q[sl], self.k[sl], self.v[sl], self.g[sl], self.beta[sl],
                                self.state0 if state is None else state, scale=self.scale, head_map=self.head_map)

    def check(self, what=""):
        o, s = self.result()
        o_ref, s_ref = self.reference()
        _assert_close(o, o_ref, f"{what} output")
        _assert_close(s, s_ref, f"{what} final state")


@pytest.mark.parametrize("head_map", ["tile", "interleave"])
@pytest.mark.parametrize("state", ["zero", "random"], ids=lambda s: f"{s}_state")
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200, 1024], ids=lambda t: f"T{t}")
def test_matches_recurrent(T, state, head_map):
    case = Case(T, seed=T, state=state, head_map=head_map)
    case.poison()
    case.run()
    case.check()


@pytest.mark.parametrize("T", [65, 1024], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("head_map", ["tile", "interleave"])
def test_strong_decay(T, head_map):
    case = Case(T, seed=100 + T, decay="strong", head_map=head_map)
    case.poison()
    case.run()
    case.check()


@pytest.mark.parametrize("in_dtype,out_dtype", [("f32", "f32"), ("f32", "bf16"), ("bf16", "bf16")],
                         ids=lambda s: s)
@pytest.mark.parametrize("T", [17, 200], ids=lambda t: f"T{t}")
def test_dtypes(T, in_dtype, out_dtype):
    case = Case(T, seed=7, in_dtype=in_dtype, out_dtype=out_dtype, head_map="interleave")
    case.poison()
    case.run()
    case.check(f"{in_dtype} in, {out_dtype} out")


@pytest.mark.parametrize("Hk,Hv,K,V,v_block", [
    (2, 4, 64, 64, None),        # small heads
    (2, 2, 128, 128, None),      # one value head per key head
    (1, 3, 128, 64, 32),         # odd value heads per key head (a pair CTA with one head)
    (2, 4, 64, 128, 128),        # K != V, one CTA per value head
    (2, 4, 128, 128, 16),        # one warp per CTA
    (2, 4, 128, 128, 32),
    (16, 32, 128, 128, None),    # Qwen3.5 shapes
], ids=lambda x: str(x))
@pytest.mark.parametrize("head_map", ["tile", "interleave"])
def test_shapes(Hk, Hv, K, V, v_block, head_map):
    case = Case(130, Hk=Hk, Hv=Hv, K=K, V=V, seed=Hk * 100 + Hv + K + V, head_map=head_map, v_block=v_block)
    case.poison()
    case.run()
    case.check(f"Hk={Hk} Hv={Hv} K={K} V={V} v_block={v_block}")


@pytest.mark.parametrize("split", [64, 100, 150], ids=lambda s: f"split{s}")
def test_state_carried_across_calls(split):
    """Two calls, state carried in place, equal one call over both (and the reference)."""
    T = 193
    one = Case(T, seed=3)
    one.poison()
    one.run()
    o1, s1 = one.result()
    two = Case(T, seed=3)
    two.poison()
    two.run(t1=split)
    two.run(t0=split)
    o2, s2 = two.result()
    _assert_close(o2, o1.astype(np.float64), "two calls vs one: output")
    _assert_close(s2, s1.astype(np.float64), "two calls vs one: state")
    two.check("two calls")


def test_padded_rows_leave_state():
    """Rows with g = 0 and beta = 0 (a padded chunk's tail) change neither the state nor earlier rows."""
    T, valid = 150, 101
    case = Case(T, seed=5)
    case.g[valid:] = 0.0
    case.beta[valid:] = 0.0
    case.g_d, case.beta_d = cp.asarray(case.g), cp.asarray(case.beta)
    case.poison()
    case.run()
    o, s = case.result()
    o_ref, s_ref = case.reference(0, valid)
    _assert_close(o[:valid], o_ref, "valid rows")
    _assert_close(s, s_ref, "state after padding")


@pytest.mark.parametrize("in_dtype", ["bf16", "f32"])
def test_graph_replay(in_dtype):
    case = Case(200, seed=11, in_dtype=in_dtype, head_map="interleave")
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    case.run(stream=s)
    graph = s.end_capture()
    for rep in range(2):       # replaying from the same initial state gives the same result
        case.reset_state()
        case.poison()
        cp.cuda.Device().synchronize()
        graph.launch(s)
        s.synchronize()
        case.check(f"graph replay {rep}")
