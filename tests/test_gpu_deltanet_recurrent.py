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
