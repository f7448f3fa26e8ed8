"""Dequantisation and memory-bound kernels (kernels/dense/dequant.cu, elementwise.cu) against
gguf.quants and the numpy references, eagerly and inside a captured CUDA graph.

Every output is poisoned (NaN / 0xFFFF) before each run so an unwritten element fails;
dequantize / get_rows must be bit-exact; the float kernels are compared by relative RMS and
max-abs error. Inputs that are views (column slices, q inside q|gate) use real strides.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
from gpu_util import from_bf16_bits, require_gpu, run_captured, to_bf16_bits  # noqa: E402

cp = require_gpu()

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402
from quant_blocks import QUANTIZABLE, TYPES, quantized_blocks, random_blocks  # noqa: E402

from ggfuse.kernels.attention import ref as attn_ref  # noqa: E402
from ggfuse.kernels.deltanet import ref as dn_ref  # noqa: E402
from ggfuse.kernels.dense import launch  # noqa: E402
from ggfuse.kernels.dense import ref as dense_ref  # noqa: E402
from ggfuse.kernels.elementwise import ref as ew_ref  # noqa: E402

F32 = np.float32
BF16_POISON = 0xFFFF  # a NaN bf16


def host_f32(a) -> np.ndarray:
    """A device output as float32 (bf16 outputs are stored as uint16)."""
    h = cp.asnumpy(a)
    return from_bf16_bits(h) if h.dtype == np.uint16 else h.astype(np.float32)


def poison(a):
    a.fill(BF16_POISON if a.dtype == cp.uint16 else (np.nan if a.dtype == cp.float32 else -1))


def new_out(shape, out_dtype):
    a = cp.empty(shape, dtype=cp.float32 if out_dtype == "f32" else cp.uint16)
    poison(a)
    return a


def assert_close(got, ref, *, what, rtol_rms=1e-5, atol_rel=1e-4):
    """Relative RMS error and max-abs error (relative to max |ref|), NaN-free."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: {int((~np.isfinite(got)).sum())} non-finite (unwritten?) elements"
    d = got - ref
    scale = float(np.abs(ref).max()) or 1.0
    rms = float(np.sqrt((d ** 2).mean() / max((ref ** 2).mean(), 1e-30)))
    mx = float(np.abs(d).max()) / scale
    assert rms < rtol_rms and mx < atol_rel, f"{what}: rel RMS {rms:.3g} (< {rtol_rms}), max-abs/max|ref| {mx:.3g} (< {atol_rel})"


def tol(out_dtype):
    """f32 outputs: float accumulation only; bf16 outputs: one bf16 rounding (2^-9 relative)."""
    return dict(rtol_rms=1e-5, atol_rel=1e-4) if out_dtype == "f32" else dict(rtol_rms=5e-3, atol_rel=1e-2)


def eager_and_graph(run, reset, check):
    """run(stream) eagerly, check; then reset, capture run into a CUDA graph, replay, check again."""
    reset()
    cp.cuda.Device().synchronize()
    run(None)
    cp.cuda.Device().synchronize()
    check("eager")
    s = cp.cuda.Stream(non_blocking=True)
    reset()
    cp.cuda.Device().synchronize()
    run_captured(s, run)
    check("graph")


def dev_scalar(v: int):
    return cp.asarray(np.array([v], dtype=np.int32))


# ---- dequantize / get_rows ---------------------------------------------------------------------------

ALL_TYPES = list(TYPES)
ROW_LEN = 512  # two K-quant super-blocks


def make_table(qtype, n_rows, row_len, seed):
    """(raw uint8 [n_rows, row_bytes], gguf's float32 dequantisation [n_rows, row_len])."""
    rng = np.random.default_rng(seed)
    qk = TYPES[qtype][0]
    n_blocks = n_rows * row_len // qk
    raw = random_blocks(rng, qtype, n_blocks)
    if qtype in QUANTIZABLE:  # half the rows from gguf's own quantiser
        half = n_blocks // 2
        raw[:half] = quantized_blocks(rng, qtype, half)
    raw = raw.reshape(n_rows, -1)
    if qtype in (QT.F32, QT.F16, QT.BF16):
        ref = quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(n_rows, row_len)
    else:
        ref = quants.dequantize(raw, qtype).reshape(n_rows, row_len)
    return np.ascontiguousarray(raw), ref


def assert_bits(got_dev, ref, out_dtype, what):
    got = cp.asnumpy(got_dev)
    if out_dtype == "f32":
        bad = np.nonzero(got.view(np.uint32).reshape(-1) != ref.astype(np.float32).view(np.uint32).reshape(-1))[0]
    else:
        bad = np.nonzero(got.reshape(-1) != to_bf16_bits(ref).reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} of {ref.size} elements differ (first at {bad[0]})"


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=[t.name for t in ALL_TYPES])
def test_dequantize_bit_exact(qtype, out_dtype):
    n_rows = 48
    raw, ref = make_table(qtype, n_rows, ROW_LEN, seed=10 + int(qtype))
    raw_d = cp.asarray(raw)
    out = new_out((n_rows, ROW_LEN), out_dtype)
    eager_and_graph(lambda s: launch.dequantize(raw_d, qtype, n_rows, ROW_LEN, out, stream=s),
                    lambda: poison(out), lambda how: assert_bits(out, ref, out_dtype, f"{qtype.name} {how}"))
    # a row range (one expert's slice, a tensor split across launches)
    r0, nr = 13, 21
    part = new_out((nr, ROW_LEN), out_dtype)
    eager_and_graph(lambda s: launch.dequantize(raw_d, qtype, nr, ROW_LEN, part, row0=r0, stream=s),
                    lambda: poison(part), lambda how: assert_bits(part, ref[r0:r0 + nr], out_dtype, f"{qtype.name} rows {how}"))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=["F32", "F16", "BF16"])
def test_dequantize_float_odd_length(qtype):
    """Float rows whose length is not a multiple of 8 (conv weights [C, 4], small vectors)."""
    n_rows, row_len = 7, 13
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n_rows, row_len)).astype(np.float32)
    raw = {QT.F32: x.view(np.uint8), QT.F16: x.astype(np.float16).view(np.uint8),
           QT.BF16: to_bf16_bits(x).view(np.uint8)}[qtype].reshape(n_rows, -1)
    ref = {QT.F32: x, QT.F16: x.astype(np.float16).astype(np.float32), QT.BF16: from_bf16_bits(to_bf16_bits(x))}[qtype]
    raw_d = cp.asarray(np.ascontiguousarray(raw))
    out = new_out((n_rows, row_len), "f32")
    eager_and_graph(lambda s: launch.dequantize(raw_d, qtype, n_rows, row_len, out, stream=s),
                    lambda: poison(out), lambda how: assert_bits(out, ref, "f32", f"{qtype.name} {how}"))
    ids = cp.asarray(np.array([6, 0, 3, 3], np.int32))
    rows = new_out((4, row_len), "f32")
    eager_and_graph(lambda s: launch.get_rows(raw_d, qtype, row_len, ids, rows, stream=s),
                    lambda: poison(rows), lambda how: assert_bits(rows, ref[[6, 0, 3, 3]], "f32", f"{qtype.name} rows {how}"))


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=[t.name for t in ALL_TYPES])
def test_get_rows_bit_exact(qtype, out_dtype):
    n_table = 300
    raw, ref = make_table(qtype, n_table, ROW_LEN, seed=50 + int(qtype))
    rng = np.random.default_rng(7)
    ids = rng.integers(0, n_table, size=37).astype(np.int32)
    ids[:4] = [0, n_table - 1, -5, n_table + 9]  # ends of the table, and out-of-range (clamped) ids
    ref_rows = ref[np.clip(ids, 0, n_table - 1)]
    raw_d, ids_d = cp.asarray(raw), cp.asarray(ids)
    out = new_out((ids.size, ROW_LEN), out_dtype)
    eager_and_graph(lambda s: launch.get_rows(raw_d, qtype, ROW_LEN, ids_d, out, stream=s),
                    lambda: poison(out), lambda how: assert_bits(out, ref_rows, out_dtype, f"{qtype.name} {how}"))


# ---- row norms -----------------------------------------------------------------------------------------

def strided(rng, shape, *, pad: int = 0, offset: int = 0, scale: float = 1.0):
    """Random f32 host array and a device view of it inside a wider buffer: the last dim padded
    by `pad` and the view starting `offset` elements in (offset 1 breaks 16-byte alignment)."""
    x = (scale * rng.standard_normal(shape)).astype(F32)
    buf = cp.full(shape[:-1] + (shape[-1] + pad + offset,), np.nan, dtype=cp.float32)
    view = buf[..., offset:offset + shape[-1]]
    view[...] = cp.asarray(x)
    return x, view


NORM_CASES = [  # (id, T, H, D, pad, offset)
    ("rows2048", 37, None, 2048, 0, 0),
    ("rows2048_strided", 19, None, 2048, 64, 0),
    ("rows2048_unaligned", 9, None, 2048, 3, 1),
    ("heads256", 11, 5, 256, 0, 0),
    ("heads128_strided", 13, 6, 128, 128, 0),
    ("rows100_odd", 7, None, 100, 5, 1),
]


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "no_w"])
def test_rms_norm(case, out_dtype, with_weight):
    _, T, H, D, pad, off = case
    shape = (T, D) if H is None else (T, H, D)
    rng = np.random.default_rng(100 + D + T)
    x, xd = strided(rng, shape, pad=pad, offset=off, scale=3.0)
    w = (1.0 + 0.1 * rng.standard_normal(D)).astype(F32) if with_weight else None
    wd = cp.asarray(w) if with_weight else None
    out = new_out(shape, out_dtype)
    ref = dense_ref.rms_norm(x, w, eps=1e-6)
    eager_and_graph(lambda s: launch.rms_norm(xd, wd, out, eps=1e-6, stream=s), lambda: poison(out),
                    lambda how: assert_close(host_f32(out), ref, what=how, **tol(out_dtype)))


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_sum", "inplace"])
@pytest.mark.parametrize("D", [2048, 1000])
def test_add_rms_norm(D, inplace, out_dtype):
    T = 29
    rng = np.random.default_rng(200 + D)
    a = rng.standard_normal((T, D)).astype(F32)
    b = rng.standard_normal((T, D)).astype(F32)
    w = (1.0 + 0.1 * rng.standard_normal(D)).astype(F32)
    ad, bd, wd = cp.asarray(a), cp.asarray(b), cp.asarray(w)
    out = new_out((T, D), out_dtype)
    s_out = ad if inplace else new_out((T, D), "f32")
    ref_norm, ref_sum = ew_ref.add_rms_norm(a, b, w, eps=1e-6)

    def reset():
        poison(out)
        if inplace:
            ad[...] = cp.asarray(a)
        else:
            poison(s_out)

    def check(how):
        assert_close(host_f32(out), ref_norm, what=f"norm {how}", **tol(out_dtype))
        assert_close(cp.asnumpy(s_out), ref_sum, what=f"sum {how}", rtol_rms=1e-7, atol_rel=1e-6)
    eager_and_graph(lambda s: launch.add_rms_norm(ad, bd, wd, out, s_out, eps=1e-6, stream=s), reset, check)


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
def test_l2_norm_conv_slices(out_dtype):
    """q and k of a DeltaNet layer: [T, Hk, dk] column slices of the [T, conv_dim] conv output."""
    T, Hk, dk, Hv, dv = 21, 4, 128, 8, 128
    C = 2 * Hk * dk + Hv * dv
    rng = np.random.default_rng(300)
    conv = rng.standard_normal((T, C)).astype(F32)
    conv_d = cp.asarray(conv)
    heads = conv_d.reshape(T, C // dk, dk)  # contiguous reshape: a view
    for name, lo in (("q", 0), ("k", Hk)):
        x = conv[:, lo * dk:(lo + Hk) * dk].reshape(T, Hk, dk)
        xd = heads[:, lo:lo + Hk, :]
        out = new_out((T, Hk, dk), out_dtype)
        ref = dense_ref.l2_norm(x, eps=1e-6)
        eager_and_graph(lambda s: launch.l2_norm(xd, out, eps=1e-6, stream=s), lambda: poison(out),
                        lambda how: assert_close(host_f32(out), ref, what=f"{name} {how}", **tol(out_dtype)))


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
def test_gated_rms_norm(out_dtype):
    """o [T, Hv, V] from the delta rule, z a slice of a wider projection output."""
    T, Hv, V = 17, 8, 128
    rng = np.random.default_rng(400)
    o = rng.standard_normal((T, Hv, V)).astype(F32)
    zbuf = rng.standard_normal((T, Hv * V + 96)).astype(F32)
    z = zbuf[:, 32:32 + Hv * V]
    w = (1.0 + 0.1 * rng.standard_normal(V)).astype(F32)
    od, wd = cp.asarray(o), cp.asarray(w)
    zd = cp.asarray(zbuf)[:, 32:32 + Hv * V]  # [T, Hv*V] view, row stride Hv*V + 96
    out = new_out((T, Hv * V), out_dtype)
    ref = ew_ref.gated_rms_norm(o, w, z.reshape(T, Hv, V), eps=1e-6).reshape(T, Hv * V)
    eager_and_graph(lambda s: launch.gated_rms_norm(od, wd, zd, out, eps=1e-6, stream=s), lambda: poison(out),
                    lambda how: assert_close(host_f32(out), ref, what=how, **tol(out_dtype)))


ROPE_CASES = [  # (id, T, H, D, n_dims, mode, q_gate_layout, max_pos)
    ("q_gate_neox", 23, 16, 256, 64, "neox", True, 200_000),
    ("k_neox", 23, 2, 256, 64, "neox", False, 5_000),
    ("full_normal", 9, 3, 128, 128, "normal", False, 1_000),
]


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_norm_rope(case):
    _, T, H, D, n_dims, mode, q_gate, max_pos = case
    rng = np.random.default_rng(500 + H)
    width = 2 * D if q_gate else D
    full = (2.0 * rng.standard_normal((T, H, width))).astype(F32)
    x = full[:, :, :D]
    xd = cp.asarray(full)[:, :, :D]
    w = (1.0 + 0.1 * rng.standard_normal(D)).astype(F32)
    wd = cp.asarray(w)
    pos = np.sort(rng.integers(0, max_pos, size=T)).astype(np.int32)
    pos_d = cp.asarray(pos)
    out = new_out((T, H, D), "f32")
    kw = dict(eps=1e-6, n_dims=n_dims, freq_base=10_000_000.0, freq_scale=1.0, mode=mode)
    ref = ew_ref.norm_rope(x, w, pos, **kw)
    eager_and_graph(lambda s: launch.norm_rope(xd, wd, pos_d, out, stream=s, **kw), lambda: poison(out),
                    lambda how: assert_close(cp.asnumpy(out), ref, what=how))


# ---- elementwise -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
def test_sigmoid_mul_attention_gate(out_dtype):
    """out [T, Hq*D] = attn [T, Hq*D] * sigmoid(gate), gate the second half of each head of q|gate."""
    T, H, D = 19, 4, 256
    rng = np.random.default_rng(600)
    x = rng.standard_normal((T, H * D)).astype(F32)
    qg = (2.0 * rng.standard_normal((T, H, 2 * D))).astype(F32)
    xd, gd = cp.asarray(x), cp.asarray(qg)[:, :, D:]
    out = new_out((T, H * D), out_dtype)
    ref = ew_ref.sigmoid_mul(x, qg[:, :, D:].reshape(T, H * D))
    eager_and_graph(lambda s: launch.sigmoid_mul(xd, gd, out, stream=s), lambda: poison(out),
                    lambda how: assert_close(host_f32(out), ref, what=how, **tol(out_dtype)))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_sigmoid_mul_scalar_gate(offset):
    """The shared expert's [T, 1] gate broadcast along the row."""
    T, N = 13, 2048
    rng = np.random.default_rng(601)
    x, xd = strided(rng, (T, N), offset=offset)
    g = rng.standard_normal((T, 1)).astype(F32)
    gd = cp.asarray(g)
    out = new_out((T, N), "f32")
    ref = ew_ref.sigmoid_mul(x, g)
    eager_and_graph(lambda s: launch.sigmoid_mul(xd, gd, out, stream=s), lambda: poison(out),
                    lambda how: assert_close(cp.asnumpy(out), ref, what=how))


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("F", [512, 77])
def test_silu_mul_halves(F, out_dtype):
    """SwiGLU on the two halves of a fused [T, 2F] gate|up output."""
    T = 33
    rng = np.random.default_rng(700 + F)
    gu = (2.0 * rng.standard_normal((T, 2 * F))).astype(F32)
    gud = cp.asarray(gu)
    out = new_out((T, F), out_dtype)
    ref = dense_ref.mul(dense_ref.silu(gu[:, :F]), gu[:, F:])
    eager_and_graph(lambda s: launch.silu_mul(gud[:, :F], gud[:, F:], out, stream=s), lambda: poison(out),
                    lambda how: assert_close(host_f32(out), ref, what=how, **tol(out_dtype)))


def test_add_scale_mul_copy():
    T, N = 31, 1030
    rng = np.random.default_rng(800)
    a, ad = strided(rng, (T, N), pad=6)
    b, bd = strided(rng, (T, N), offset=1)
    out = new_out((T, N), "f32")
    for name, fn, ref in (
        ("add", lambda s: launch.add(ad, bd, out, stream=s), dense_ref.add(a, b)),
        ("mul", lambda s: launch.mul(ad, bd, out, stream=s), dense_ref.mul(a, b)),
        ("scale", lambda s: launch.scale(ad, out, 0.125, stream=s), dense_ref.scale(a, factor=0.125)),
        ("copy", lambda s: launch.copy(ad, out, stream=s), a),
    ):
        eager_and_graph(fn, lambda: poison(out),
                        lambda how, name=name, ref=ref: assert_close(cp.asnumpy(out), ref, what=f"{name} {how}", rtol_rms=1e-7, atol_rel=1e-6))
    # copy of a column slice into a bf16 buffer (f32 -> bf16 conversion)
    dst = new_out((T, 500), "bf16")
    eager_and_graph(lambda s: launch.copy(ad[:, 200:700], dst, stream=s), lambda: poison(dst),
                    lambda how: assert_bits(dst, a[:, 200:700], "bf16", f"copy bf16 {how}"))


# ---- DeltaNet --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_valid", [None, 0, 9], ids=["all", "nv0", "nv9"])
@pytest.mark.parametrize("layout", ["plain", "interleaved"])
def test_deltanet_gates(layout, n_valid):
    T, Hk, r = 14, 4, 2
    Hv = Hk * r
    rng = np.random.default_rng(900)
    alpha = (4.0 * rng.standard_normal((T, Hv))).astype(F32)
    alpha[0, 0] = 30.0  # softplus's linear branch (x > 20)
    beta_lin = (2.0 * rng.standard_normal((T, Hv))).astype(F32)
    dt_bias = rng.standard_normal(Hv).astype(F32)
    ssm_a = -np.exp(rng.standard_normal(Hv)).astype(F32)
    if layout == "plain":
        ad = cp.asarray(np.concatenate([alpha, np.zeros((T, 3), F32)], axis=1))[:, :Hv]  # strided rows
        bd = cp.asarray(beta_lin)
    else:  # Qwen3-Next: ba [T, Hk, 2r] with beta in the first r, alpha in the last r of each key head
        ba = np.concatenate([beta_lin.reshape(T, Hk, r), alpha.reshape(T, Hk, r)], axis=2)
        bad = cp.asarray(ba)
        bd, ad = bad[:, :, :r], bad[:, :, r:]
    g_out, b_out = new_out((T, Hv), "f32"), new_out((T, Hv), "f32")
    nv_d = None if n_valid is None else dev_scalar(n_valid)
    g_ref, b_ref = dn_ref.deltanet_gates(alpha, beta_lin, dt_bias, ssm_a, n_valid=n_valid)

    def check(how):
        g, b = cp.asnumpy(g_out), cp.asnumpy(b_out)
        assert_close(g, g_ref, what=f"g {how}")
        assert_close(b, b_ref, what=f"beta {how}")
        if n_valid is not None:
            assert (g[n_valid:] == 0).all() and (b[n_valid:] == 0).all(), f"{how}: padded rows not zero"
    eager_and_graph(lambda s: launch.deltanet_gates(ad, bd, cp.asarray(dt_bias), cp.asarray(ssm_a), g_out, b_out,
                                                    nv_d, stream=s),
                    lambda: (poison(g_out), poison(b_out)), check)


CONV_CASES = [  # (id, T, C, n_valid)
    ("full", 37, 8192, None),
    ("padded", 37, 1000, 30),
    ("nv0", 20, 300, 0),
    ("nv1_short", 2, 300, 1),
    ("exact_tiles", 32, 256, 32),
    ("one_token", 1, 8192, 1),         # the decode step: ssm_conv1_k, one launch
    ("one_padding", 1, 300, 0),
    ("one_no_nvalid", 1, 1000, None),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_ssm_conv_silu(case):
    _, T, C, n_valid = case
    Kc = 4
    rng = np.random.default_rng(1000 + T + C)
    x, xd = strided(rng, (T, C), pad=40)  # a slice of a wider projection output
    state0 = rng.standard_normal((Kc - 1, C)).astype(F32)
    w = (0.5 * rng.standard_normal((C, Kc))).astype(F32)
    state_d, wd = cp.asarray(state0), cp.asarray(w)
    out = new_out((T, C), "f32")
    nv_d = None if n_valid is None else dev_scalar(n_valid)
    y_ref, _ = dn_ref.ssm_conv_silu(x, state0, w)
    s_ref = dn_ref.ssm_conv_state(x, state0, n_valid=n_valid)

    def reset():
        poison(out)
        state_d[...] = cp.asarray(state0)

    def check(how):
        assert_close(cp.asnumpy(out), y_ref, what=f"out {how}")
        assert np.array_equal(cp.asnumpy(state_d), s_ref), f"conv state {how}"
    eager_and_graph(lambda s: launch.ssm_conv_silu(xd, state_d, wd, out, nv_d, stream=s), reset, check)


# ---- KV cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [0, 45, 60], ids=["P0", "P45", "P60_overflow"])
def test_kv_append(P):
    T, Hkv, D, max_ctx = 11, 2, 256, 64
    rng = np.random.default_rng(1100 + P)
    kfull = rng.standard_normal((T, Hkv, 2 * D)).astype(F32)  # k inside a wider buffer
    v = rng.standard_normal((T, Hkv * D)).astype(F32)          # v as [T, Hkv*D]
    kd, vd = cp.asarray(kfull)[:, :, :D], cp.asarray(v)
    old_k = rng.integers(0, 1 << 15, size=(max_ctx, Hkv, D)).astype(np.uint16)
    old_v = rng.integers(0, 1 << 15, size=(max_ctx, Hkv, D)).astype(np.uint16)
    k_cache, v_cache = cp.asarray(old_k), cp.asarray(old_v)
    p_d = dev_scalar(P)
    ref_k, ref_v = old_k.copy(), old_v.copy()
    attn_ref.kv_append(to_bf16_bits(kfull[:, :, :D]), to_bf16_bits(v.reshape(T, Hkv, D)), ref_k, ref_v, P)

    def reset():
        k_cache[...] = cp.asarray(old_k)
        v_cache[...] = cp.asarray(old_v)

    def check(how):
        assert np.array_equal(cp.asnumpy(k_cache), ref_k), f"k cache {how}"
        assert np.array_equal(cp.asnumpy(v_cache), ref_v), f"v cache {how}"
    eager_and_graph(lambda s: launch.kv_append(kd, vd, k_cache, v_cache, p_d, stream=s), reset, check)


def test_kv_append_graph_reads_P_each_replay():
    """P lives on the device: one captured graph writes wherever P points at replay time."""
    T, Hkv, D, max_ctx = 4, 2, 64, 16
    rng = np.random.default_rng(1200)
    k = rng.standard_normal((T, Hkv, D)).astype(F32)
    kd = cp.asarray(k)
    k_cache = cp.zeros((max_ctx, Hkv, D), cp.uint16)
    v_cache = cp.zeros((max_ctx, Hkv, D), cp.uint16)
    p_d = dev_scalar(0)
    launch.kv_append(kd, kd, k_cache, v_cache, p_d)  # load the module outside capture
    cp.cuda.Device().synchronize()
    k_cache.fill(0)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    launch.kv_append(kd, kd, k_cache, v_cache, p_d, stream=s)
    g = s.end_capture()
    for P in (0, 4, 8):
        p_d.set(np.array([P], np.int32), stream=s)
        g.launch(s)
    s.synchronize()
    want = np.zeros((max_ctx, Hkv, D), np.uint16)
    for P in (0, 4, 8):
        want[P:P + T] = to_bf16_bits(k)
    assert np.array_equal(cp.asnumpy(k_cache), want)


def test_argmax_rows():
    R, N = 6, 10_007
    rng = np.random.default_rng(1300)
    x = rng.standard_normal((R, N)).astype(F32)
    x[1, 17] = x[1, 9000] = 50.0  # a tie: the first index wins
    x[2, :] = -np.inf
    x[3, N - 1] = 99.0
    xd = cp.asarray(np.concatenate([x, np.zeros((R, 5), F32)], axis=1))[:, :N]
    out = cp.full(R, -1, dtype=cp.int32)
    eager_and_graph(lambda s: launch.argmax_rows(xd, out, stream=s), lambda: out.fill(-1),
                    lambda how: np.testing.assert_array_equal(cp.asnumpy(out), np.argmax(x, axis=1), err_msg=how))


@pytest.mark.parametrize("M,N,K", [(1, 4, 256), (77, 256, 2048), (130, 100, 96)])
def test_gemm_f32_router(M, N, K):
    import cupy as cp
    from ggfuse.kernels.dense import launch as dl
    rng = np.random.default_rng(M)
    big = rng.standard_normal((M, K + 8)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    c = cp.full((M, N), np.nan, dtype=cp.float32)
    dl.gemm_f32(cp.asarray(big)[:, :K], cp.asarray(w), c)   # a row-strided view, as the runtime passes
    ref = big[:, :K].astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(cp.asnumpy(c), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
