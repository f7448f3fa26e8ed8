"""The chunked gated delta rule and the fused conv+SiLU against the plain references."""
from __future__ import annotations

import numpy as np
import pytest

from ggfuse.kernels.dense.ref import silu
from ggfuse.kernels.deltanet import ref

Hk, Hv, K, V = 2, 4, 16, 8


def _inputs(T: int, *, seed: int, initial: str):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(f32)  # the model l2-normalises q, k
    q = unit(rng.standard_normal((T, Hk, K)))
    k = unit(rng.standard_normal((T, Hk, K)))
    v = rng.standard_normal((T, Hv, V)).astype(f32)
    g = -rng.uniform(0.0, 1.5, (T, Hv)).astype(f32)          # log decay, as softplus(.) * -exp(A_log)
    beta = (1 / (1 + np.exp(-rng.standard_normal((T, Hv))))).astype(f32)
    state = (rng.standard_normal((Hv, K, V)) if initial == "random" else np.zeros((Hv, K, V))).astype(f32)
    return q, k, v, g, beta, state


def _rel(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


# T around the chunk size (shorter, equal, one over), many chunks, and a chunk that divides nothing.
LENGTHS = [pytest.param(T, C, id=f"T{T}-C{C}") for T, C in
           [(1, 64), (63, 64), (64, 64), (65, 64), (200, 64), (200, 16), (37, 5)]]


@pytest.mark.parametrize("initial", ["zero", "random"], ids=lambda s: f"{s}_state")
@pytest.mark.parametrize("head_map", ["tile", "interleave"])
@pytest.mark.parametrize("T,chunk", LENGTHS)
def test_chunked_equals_recurrent(T, chunk, head_map, initial):
    q, k, v, g, beta, state = _inputs(T, seed=T * 7 + chunk, initial=initial)
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, state, scale=K ** -0.5, head_map=head_map)
    o, s = ref.chunk_gated_delta_rule(q, k, v, g, beta, state, scale=K ** -0.5, head_map=head_map, chunk=chunk)
    assert o.dtype == s.dtype == np.float32
    assert o.shape == (T, Hv, V) and s.shape == (Hv, K, V)
    assert _rel(o, o_ref) < 1e-4
    assert _rel(s, s_ref) < 1e-4


def test_chunked_strong_decay_is_finite():
    # Cumulative log decay reaches thousands over the prompt: exp of the raw sum, or of an
    # unmasked G_i - G_j above the diagonal, would under/overflow.
    q, k, v, g, beta, state = _inputs(256, seed=1, initial="random")
    g = g * 50
    with np.errstate(over="raise", invalid="raise"):
        o, s = ref.chunk_gated_delta_rule(q, k, v, g, beta, state, scale=0.25, chunk=128)
    o_ref, s_ref = ref.gated_delta_rule(q, k, v, g, beta, state, scale=0.25)
    assert np.isfinite(o).all() and np.isfinite(s).all()
    assert _rel(o, o_ref) < 1e-4 and _rel(s, s_ref) < 1e-4


@pytest.mark.parametrize("T", [1, 3, 17], ids=lambda t: f"T{t}")
def test_ssm_conv_silu(T):
    rng = np.random.default_rng(T)
    C, Kc = 12, 4
    x = rng.standard_normal((T, C)).astype(np.float32)
    state = rng.standard_normal((Kc - 1, C)).astype(np.float32)
    w = rng.standard_normal((C, Kc)).astype(np.float32)
    y_ref, s_ref = ref.ssm_conv(x, state, w)
    y, s = ref.ssm_conv_silu(x, state, w)
    np.testing.assert_array_equal(y, silu(y_ref))
    np.testing.assert_array_equal(s, s_ref)
