"""The CPU backend's dequantised-expert cache (runtime/weights.py ExpertCache): later prefill
calls reuse the experts an earlier one dequantised (a prefix-cache cut, the next chunk or decode
step no longer dequantises them again), least recently used dropped past the budget, and the
logits are the same with it as without it."""
import numpy as np

import ggfuse
from ggfuse.runtime import weights as wmod
from ggfuse.runtime.weights import ExpertCache
from util import fixture, refs


def test_lru_budget():
    c = ExpertCache(3 * 400)
    for i in range(4):
        c.put(("t", i), np.zeros(100, np.float32))          # 400 bytes each
    assert c.get(("t", 0)) is None and c.get(("t", 3)) is not None and c.nbytes == 1200
    c.get(("t", 1))                                         # now the most recent
    c.put(("t", 4), np.zeros(100, np.float32))
    assert c.get(("t", 1)) is not None and c.get(("t", 2)) is None
    c.put(("big", 0), np.zeros(1000, np.float32))           # over the budget alone: not kept
    assert c.get(("big", 0)) is None and c.nbytes <= c.budget


def test_second_call_dequantises_no_expert_and_logits_match(monkeypatch):
    tokens = refs("qwen35moe")["tokens"][:24]
    cold = ggfuse.load(fixture("qwen35moe", "q4_k_m"), device="cpu")
    cold.backend.weights.experts.budget = 0                 # no cache: the reference
    want = np.concatenate([cold.prefill(tokens[:12]), cold.prefill(tokens[12:])])
    m = ggfuse.load(fixture("qwen35moe", "q4_k_m"), device="cpu")
    m.prefill(tokens[:12])
    m.reset()
    calls = []
    real = wmod._dequant
    monkeypatch.setattr(wmod, "_dequant", lambda raw, t, shape: calls.append(len(shape)) or real(raw, t, shape))
    again = m.prefill(tokens[:12])
    # the same tokens route to the same experts: all of them come from the cache (2-D slices
    # are experts; embedding rows are 1-D, dense weights were kept whole by the first call)
    assert calls.count(2) == 0, calls
    rest = m.prefill(tokens[12:])
    np.testing.assert_array_equal(np.concatenate([again, rest]), want)
    assert m.backend.weights.experts.nbytes > 0
