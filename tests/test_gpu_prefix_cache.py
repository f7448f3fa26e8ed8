"""The prompt-prefix cache on the CUDA backend (gpu marker): a greedy multi-turn conversation gives
the same tokens and logits with the cache as without it on every architecture (util.MODELS: the Qwen ones and Gemma 4's sliding rings), the
snapshots in device memory and in host memory; snapshot()/restore() put every state back bit for
bit. The CPU side of the same checks: tests/test_prefix_cache.py."""
import numpy as np
import pytest

import ggfuse
from ggfuse.runtime.prefix_cache import PrefixCache
from ggfuse.runtime.snapshot import positional_states
from test_prefix_cache import check_parity, small_budget
from util import MODELS, fixture

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu  # noqa: E402

cp = require_gpu()


@pytest.mark.parametrize("where", ["device", "host"])
@pytest.mark.parametrize("arch", MODELS)
def test_gpu_cache_gives_the_same_tokens_and_logits_as_no_cache(arch, where, monkeypatch):
    m = ggfuse.load(fixture(arch), device="cuda", chunk=16, precision="f32", max_context=256)
    cache = PrefixCache(256 << 20, where=where)
    cached, cold = check_parity(m, cache, monkeypatch, tol=2e-3, near_tie=1e-3)
    print(f"{arch} ({where}): restored {cached} tokens per turn; {cache.summary()}")
    small = PrefixCache(small_budget(cache), where=where)
    check_parity(m, small, monkeypatch, tol=2e-3, near_tie=1e-3, cold=cold)
    assert small.nbytes <= small.budget


@pytest.mark.parametrize("arch", MODELS)
def test_gpu_snapshot_restore_round_trip(arch):
    m = ggfuse.load(fixture(arch), device="cuda", chunk=16, max_context=128)
    be = m.backend
    m.prefill(list(range(1, 30)))
    truth = {k: cp.asnumpy(v) for k, v in be.states.items()}
    pos = positional_states(m.plan.graph)
    head, tail = be.snapshot(0, "device"), be.snapshot(11, "host")
    head.rows = {k: a[:11].copy() for k, a in head.rows.items()}
    head.stop, head.whole = 11, None
    m.prefill([5, 6, 7])                       # the state moves on
    be.restore([head, tail])
    assert be.n_past == 29
    for k, v in be.states.items():
        got = cp.asnumpy(v)
        if k in pos:
            np.testing.assert_array_equal(got[:29], truth[k][:29])
        else:
            np.testing.assert_array_equal(got, truth[k])
    # the next chunk continues as if nothing happened
    want = ggfuse.load(fixture(arch), device="cuda", chunk=16, max_context=128).prefill(list(range(1, 30)) + [9, 9])
    got = m.prefill([9, 9])
    np.testing.assert_allclose(got, want[-2:], atol=2e-2 * np.abs(want).max(), rtol=0)
