"""The token-recurrent GPU fallback of the gated delta rule against its numpy definition."""
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
