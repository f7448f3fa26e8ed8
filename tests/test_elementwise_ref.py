"""The fused elementwise ops (ir/ops_fused_elementwise.py) against the plain ops they replace,
through the registered refs and shape rules, on random inputs."""
from __future__ import annotations

import numpy as np
import pytest

from ggfuse.ir.graph import Attrs
from ggfuse.ir.ops import OPS, InferError, Op, infer
from ggfuse.ir.types import TensorType

T, H, DH, D, F = 7, 3, 64, 32, 48
ENV = {"T": T, "P": 0}


def _ref(op, attrs, *xs):
    return OPS[op].ref(Attrs(attrs), ENV, *xs)


def _check(op, attrs, xs, want):
    """The fused ref matches `want`, and the shape rule agrees with the arrays it makes."""
    got = _ref(op, attrs, *xs)
    ins = [TensorType(x.shape, "i32" if x.dtype == np.int32 else "f32") for x in xs]
    types = infer(op, Attrs(attrs), ins)
    assert len(got) == len(want) == len(types) == OPS[op].n_outputs
    for g, w, t in zip(got, want, types):
        assert g.dtype == np.float32 and g.shape == w.shape == t.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert OPS[op].flops(Attrs(attrs), ins, types, ENV) > 0


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _r(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_add_rms_norm(rng):
    a, b, w = _r(rng, T, D), _r(rng, T, D), _r(rng, D)
    (s,) = _ref(Op.ADD, {}, a, b)
    (n,) = _ref(Op.RMS_NORM, {"eps": 1e-6}, s, w)
    _check(Op.ADD_RMS_NORM, {"eps": 1e-6}, (a, b, w), (n, s))


@pytest.mark.parametrize("mode,n_dims,freq_scale", [("neox", 16, 1.0), ("imrope", 16, 1.0), ("normal", DH, 0.5),
                                                     ("neox", DH, 1.0)],
                         ids=["neox-partial", "imrope-partial", "normal-full-scaled", "neox-full"])
def test_norm_rope(rng, mode, n_dims, freq_scale):
    x, w = _r(rng, T, H, DH), _r(rng, DH)
    pos = (100 + np.arange(T)).astype(np.int32)  # positions after a cached prefix
    rope = dict(n_dims=n_dims, freq_base=1e7, freq_scale=freq_scale, mode=mode, sections=(11, 11, 10, 0))
    (n,) = _ref(Op.RMS_NORM, {"eps": 1e-6}, x, w)
    (want,) = _ref(Op.ROPE, rope, n, pos)
    _check(Op.NORM_ROPE, {**rope, "eps": 1e-6}, (x, w, pos), (want,))


@pytest.mark.parametrize("gate_cols", [D, 1], ids=["per-element", "scalar-per-token"])
def test_sigmoid_mul(rng, gate_cols):
    x, g = _r(rng, T, D), _r(rng, T, gate_cols) * 4
    (want,) = _ref(Op.MUL, {}, x, *_ref(Op.SIGMOID, {}, g))
    _check(Op.SIGMOID_MUL, {}, (x, g), (want,))


def test_gated_rms_norm(rng):
    o, w, z = _r(rng, T, H, DH), _r(rng, DH), _r(rng, T, H, DH) * 4
    (want,) = _ref(Op.MUL, {}, *_ref(Op.RMS_NORM, {"eps": 1e-6}, o, w), *_ref(Op.SILU, {}, z))
    _check(Op.GATED_RMS_NORM, {"eps": 1e-6}, (o, w, z), (want,))


def test_ffn_swiglu(rng):
    x, wg, wu = _r(rng, T, D), _r(rng, F, D) / 4, _r(rng, F, D) / 4
    (gate,) = _ref(Op.MATMUL, {}, x, wg)
    (up,) = _ref(Op.MATMUL, {}, x, wu)
    (want,) = _ref(Op.MUL, {}, *_ref(Op.SILU, {}, gate), up)
    _check(Op.FFN_SWIGLU, {}, (x, wg, wu), (want,))


@pytest.mark.parametrize("op,shapes", [
    (Op.ADD_RMS_NORM, [("T", D), (1, D), (D,)]),            # residual operands must not broadcast
    (Op.SIGMOID_MUL, [("T", 1), ("T", D)]),                 # only the gate may broadcast
    (Op.GATED_RMS_NORM, [("T", H, DH), (DH,), ("T", H * DH)]),  # z must have o's shape
    (Op.FFN_SWIGLU, [("T", D), (F, D), (F + 1, D)]),        # gate and up widths differ
], ids=["add_rms_norm-broadcast", "sigmoid_mul-big-gate", "gated_rms_norm-z-shape", "ffn_swiglu-widths"])
def test_shape_rules_reject(op, shapes):
    with pytest.raises(InferError):
        infer(op, Attrs(eps=1e-6), [TensorType(s) for s in shapes])


# ---- Gemma 4 -----------------------------------------------------------------------------------

def test_norm_rope_with_freq_factors(rng):
    x, w = _r(rng, T, H, DH), _r(rng, DH)
    pos = (100 + np.arange(T)).astype(np.int32)
    ff = np.array([1.0] * 8 + [1e30] * (DH // 2 - 8), np.float32)  # Gemma's proportional RoPE
    rope = dict(n_dims=DH, freq_base=1e6, freq_scale=1.0, mode="neox", sections=())
    (want,) = _ref(Op.ROPE, rope, *_ref(Op.RMS_NORM, {"eps": 1e-6}, x, w), pos, ff)
    _check(Op.NORM_ROPE, {**rope, "eps": 1e-6}, (x, w, pos, ff), (want,))


def test_ffn_geglu(rng):
    x, wg, wu = _r(rng, T, D), _r(rng, F, D) / 4, _r(rng, F, D) / 4
    (gate,) = _ref(Op.MATMUL, {}, x, wg)
    (up,) = _ref(Op.MATMUL, {}, x, wu)
    (want,) = _ref(Op.MUL, {}, *_ref(Op.GELU, {}, gate), up)
    _check(Op.FFN_GEGLU, {}, (x, wg, wu), (want,))


def test_gelu_mul(rng):
    x, y = _r(rng, T, D) * 3, _r(rng, T, D)
    (want,) = _ref(Op.MUL, {}, *_ref(Op.GELU, {}, x), y)
    _check(Op.GELU_MUL, {}, (x, y), (want,))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "layer-output-scale"])
def test_norm_add_and_norm_add_norm(rng, scaled):
    x, w, r, w2 = _r(rng, T, D), _r(rng, D), _r(rng, T, D), _r(rng, D)
    s = (np.float32([0.7]),) if scaled else ()
    (total,) = _ref(Op.ADD, {}, *_ref(Op.RMS_NORM, {"eps": 1e-6}, x, w), r)
    if scaled:
        (total,) = _ref(Op.MUL, {}, total, s[0])
    _check(Op.NORM_ADD, {"eps": 1e-6}, (x, w, r) + s, (total,))
    (normed,) = _ref(Op.RMS_NORM, {"eps": 1e-5}, total, w2)
    _check(Op.NORM_ADD_NORM, {"eps": 1e-6, "eps_next": 1e-5}, (x, w, r, w2) + s, (normed, total))


@pytest.mark.parametrize("op,shapes", [
    (Op.NORM_ADD, [("T", D), (D,), (1, D)]),                # the residual does not broadcast
    (Op.NORM_ADD, [("T", D), (D,), ("T", D), (D,)]),        # the scale is one number
    (Op.GELU_MUL, [("T", D), ("T", 1)]),
    (Op.FFN_GEGLU, [("T", D), (F, D), (F + 1, D)]),
], ids=["norm_add-broadcast", "norm_add-scale-shape", "gelu_mul-broadcast", "ffn_geglu-widths"])
def test_gemma_shape_rules_reject(op, shapes):
    with pytest.raises(InferError):
        infer(op, Attrs(eps=1e-6, eps_next=1e-6), [TensorType(s) for s in shapes])
