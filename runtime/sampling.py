"""Choosing the next token from a row of logits, in numpy.

The chain is llama.cpp's default one (common/sampling.cpp): repetition penalty, then top-k, top-p
and min-p on the penalised logits, then temperature, then a draw from the softmax. Temperature 0
is greedy: the penalised argmax (the lowest id among equal maxima). The draw uses numpy's PCG64
seeded by `seed`, so a seed repeats a run of ggfuse (not of llama.cpp, whose generator differs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ggfuse.errors import GGFuseError

__all__ = ["SamplingParams", "Sampler"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature: 0 (the default here) is greedy; llama.cpp's CLI default is 0.8.
    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set whose probability
    reaches p (1: off). min_p: keep tokens at least min_p times as likely as the best (0: off).
    repeat_penalty: divide a positive logit (multiply a negative one) of every token among the
    last repeat_last_n tokens, prompt included (1: off). seed: None draws one from the OS.
    The top-k / top-p / min-p defaults are llama.cpp's; they matter only when temperature > 0."""
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, want):
            raise GGFuseError(None, f"{name} must be {want}, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, v, "a finite number")
        for name in ("top_k", "repeat_last_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(name, v, "an integer")
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0 (0 is greedy)")
        if self.top_k < 0:
            bad("top_k", self.top_k, ">= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1] (1 is off)")
        if not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "in [0, 1) (0 is off)")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty", self.repeat_penalty, "> 0 (1 is off)")
        if self.repeat_last_n < 0:
            bad("repeat_last_n", self.repeat_last_n, ">= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            bad("seed", self.seed, "a non-negative integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """sample(logits, history) -> token id. logits: [n_vocab]; history: the token ids so far
    (prompt and generated), which the repetition penalty looks at."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def penalised(self, logits: np.ndarray, history) -> np.ndarray:
        p = self.params
        x = np.array(logits, dtype=np.float32).reshape(-1)
        if p.repeat_penalty != 1 and p.repeat_last_n and len(history):
            seen = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < x.size)]
            v = x[seen]
            x[seen] = np.where(v <= 0, v * p.repeat_penalty, v / p.repeat_penalty)
        return x

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids that survive top-k, top-p and min-p, most likely first, and their
        probabilities after temperature (they sum to 1)."""
        p = self.params
        order = np.argsort(-logits, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        x = logits[order].astype(np.float64)
        if p.top_p < 1:
            prob = np.exp(x - x[0])
            cum = np.cumsum(prob / prob.sum())
            keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1   # first index where cum >= p
            order, x = order[:keep], x[:keep]
        if p.min_p > 0:
            keep = x >= x[0] + math.log(p.min_p)
            order, x = order[keep], x[keep]
        z = (x - x[0]) / p.temperature
        prob = np.exp(z)
        return order, prob / prob.sum()

    def sample(self, logits: np.ndarray, history=()) -> int:
        x = self.penalised(logits, history)
        if self.params.greedy:
            return int(np.argmax(x))
        ids, prob = self.candidates(x)
        return int(ids[self.rng.choice(ids.size, p=prob)])

    __call__ = sample
