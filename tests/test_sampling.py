"""runtime/sampling.py: llama.cpp's sampler chain (penalty, top-k, top-p, min-p, temperature)."""
import math

import numpy as np
import pytest

from ggfuse.errors import GGFuseError
from ggfuse.runtime.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))   # most likely: 1, 3, 4, 2, 0


def test_greedy_is_the_argmax_lowest_id_first():
    s = Sampler(SamplingParams(temperature=0))
    assert s.sample(LOGITS) == 1
    assert s.sample(np.array([1.0, 3.0, 3.0, 2.0])) == 1


def test_repeat_penalty_divides_positive_multiplies_negative_in_the_window():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2))
    x = s.penalised(np.array([4.0, -1.0, 3.0, 2.0]), history=[0, 1, 1])   # window: [1, 1]
    assert x.tolist() == [4.0, -2.0, 3.0, 2.0]
    x = s.penalised(np.array([4.0, -1.0, 3.0, 2.0]), history=[2, 0])
    assert x.tolist() == [2.0, -1.0, 1.5, 2.0]
    # greedy sees the penalised logits
    assert Sampler(SamplingParams(repeat_penalty=2.0)).sample(np.array([4.0, 3.0]), history=[0]) == 1
    assert Sampler(SamplingParams(repeat_penalty=1.0)).penalised(LOGITS, [1, 2]).tolist() == LOGITS.tolist()


@pytest.mark.parametrize("params, ids", [
    (dict(top_k=0, top_p=1.0, min_p=0.0), [1, 3, 4, 2, 0]),
    (dict(top_k=2, top_p=1.0, min_p=0.0), [1, 3]),
    (dict(top_k=0, top_p=0.69, min_p=0.0), [1, 3]),         # 0.4 + 0.3 reaches 0.69
    (dict(top_k=0, top_p=0.71, min_p=0.0), [1, 3, 4]),
    (dict(top_k=0, top_p=1.0, min_p=0.3), [1, 3, 4]),       # p >= 0.3 * 0.4 = 0.12
    (dict(top_k=3, top_p=0.5, min_p=0.0), [1, 3]),          # top-p over the top-k
    (dict(top_k=0, top_p=0.01, min_p=0.0), [1]),            # at least one token
])
def test_candidates(params, ids):
    got, prob = Sampler(SamplingParams(temperature=1.0, **params)).candidates(LOGITS)
    assert got.tolist() == ids
    p = np.exp(LOGITS[ids] - LOGITS[ids].max())
    np.testing.assert_allclose(prob, p / p.sum(), rtol=1e-6)


def test_temperature_reshapes_the_kept_probabilities():
    ids, prob = Sampler(SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0)).candidates(LOGITS)
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])[ids] ** 2
    np.testing.assert_allclose(prob, p / p.sum(), rtol=1e-6)


def test_draws_follow_the_distribution_and_the_seed():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    s = Sampler(params)
    draws = np.array([s.sample(LOGITS) for _ in range(20000)])
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.015)

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        return [s.sample(LOGITS) for _ in range(50)]
    assert run(1) == run(1) and run(1) != run(2)
    # top-k 1 with any temperature is greedy
    assert {Sampler(SamplingParams(temperature=5.0, top_k=1, seed=i)).sample(LOGITS) for i in range(20)} == {1}


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(min_p=1.0), "min_p must be in [0, 1)"),
    (dict(repeat_penalty=0.0), "repeat_penalty must be > 0"),
    (dict(repeat_last_n=-3), "repeat_last_n must be >= 0"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(seed="x"), "seed must be a non-negative integer"),
])
def test_bad_parameters(kw, words):
    with pytest.raises(GGFuseError) as e:
        SamplingParams(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)
