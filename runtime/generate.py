"""Text generation on a loaded model: prefill the prompt, then feed one token at a time.

    ids = m.generate("Once upon a time", max_new_tokens=32)          # greedy, the new ids
    for piece in m.stream("Once upon a time", 32, temperature=0.8, seed=1):
        print(piece, end="", flush=True)

The decode step: a backend may offer `decode_step(token_id) -> logits [n_vocab]` (one token
through every layer, advancing its state by one position; the CUDA backend will replay a captured
one-token graph); any other backend runs the token as a one-token chunk through
`run_chunk(np.array([token_id]), "last")`, which both backends support (the graph is symbolic in
the token count T). Generation stops at an end-of-generation token (EOS, EOT, <|im_end|>, ...,
from the GGUF's metadata; it is not returned), at a stop string, after max_new_tokens, or when
the context is full (max_new_tokens=None).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ggfuse.errors import GGFuseError
from ggfuse.runtime.sampling import Sampler, SamplingParams

__all__ = ["Generation", "GenerationStats", "generate", "stream", "decode_step", "context_limit",
           "ChatSession", "chat_prompt_ids", "encode_rendered", "prompt_ids"]


@dataclass
class GenerationStats:
    """What one generation did and how long it took (seconds)."""
    n_prompt: int = 0          # prompt tokens fed (after whatever the model already held)
    n_cached: int = 0          # of those, restored from a prefix cache instead of prefilled
    n_new: int = 0             # tokens generated (an end-of-generation token not counted)
    tokenize_s: float = 0.0    # turning a text prompt into ids
    prefill_s: float = 0.0     # feeding the prompt
    ttft_s: float = 0.0        # tokenizing, prefill and the first sample: until the first new token
    decode_s: float = 0.0      # the one-token steps after the first token
    n_decode: int = 0          # how many one-token steps that was
    finish: str = ""           # "eog", "stop", "length", "context" or "cancelled" (the consumer stopped)
    expert_cache: dict | None = None   # decode under a budget: the expert cache's hit rate and bytes
    #                                    moved per token over the decode steps (runtime/cuda/decode_cache.py)

    @property
    def prefill_tok_per_s(self) -> float:
        return (self.n_prompt - self.n_cached) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        return self.n_decode / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        cached = f" ({self.n_cached} cached)" if self.n_cached else ""
        return (f"prompt {self.n_prompt} tokens{cached}, TTFT {self.ttft_s * 1e3:.1f} ms, prefill "
                f"{self.prefill_tok_per_s:.1f} tok/s, decode {self.decode_tok_per_s:.1f} tok/s "
                f"({self.n_new} tokens, stopped: {self.finish})" + expert_cache_text(self.expert_cache))


def expert_cache_text(rep: dict | None) -> str:
    """'; experts on the device 87% (cache 61%), 12.3 MB moved/token' of a decode cache report."""
    if not rep or not rep.get("tokens"):
        return ""
    return (f"; experts on the device {100 * rep['hit_rate']:.0f}% (cache {100 * rep['cache_hit_rate']:.0f}%), "
            f"{rep['bytes_per_token'] / 1e6:.1f} MB moved/token")


def decode_cache_report(backend, reset: bool = False) -> dict | None:
    """The backend's decode expert cache report (None without one). reset: empty the cache and
    start counting anew (a prompt's prefill empties it anyway; a bench repeating one token
    sequence must not find the previous run's experts)."""
    cache = getattr(backend, "decode_cache", None)
    if cache is None:
        return None
    if reset:
        cache.invalidate()
        cache.reset_stats()
        return None
    return cache.report()


def decode_step(backend, token_id: int) -> np.ndarray:
    """Feed one token; the logits [n_vocab] for the next position. Uses the backend's own
    `decode_step` when it has one, else a one-token chunk."""
    step = getattr(backend, "decode_step", None)
    if step is not None:
        return np.asarray(step(int(token_id)), dtype=np.float32).reshape(-1)
    return np.asarray(backend.run_chunk(np.array([token_id], dtype=np.int64), "last"), dtype=np.float32)[0]


def context_limit(model) -> int | None:
    """How many positions the model can hold: the backend's cache size where it has one (the
    CUDA KV cache, --max-context), else the context the model was trained for (from the GGUF)."""
    limit = getattr(model.backend, "max_context", None)
    if limit:
        return int(limit)
    if not hasattr(model.gguf, "arch"):
        return None
    from ggfuse.compiler.metadata import Metadata
    n = Metadata(model.gguf).scope(f"{model.gguf.arch}.").int("context_length", None, min=0)
    return n if n else None


def prompt_ids(model, prompt) -> list[int]:
    """A prompt's token ids: a str tokenized as llama-cli tokenizes -p, or a list of ids as given."""
    if isinstance(prompt, str):
        # what llama-cli does with -p: BOS as the GGUF asks, special tokens in the text parsed
        return model.tokenizer.encode(prompt, add_special=True, parse_special=True)
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise GGFuseError(None, f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    from ggfuse.runtime.api import token_array
    return token_array(prompt, model.n_vocab, getattr(getattr(model, "gguf", None), "path", None)).tolist()


class _StopStrings:
    """Text released as it comes, except a tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in stops if s]
        if any(not isinstance(s, str) for s in self.stops):
            raise GGFuseError(None, "stop must be a str or a list of str")
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Text that can be shown now (the caller stops once .hit is set)."""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0
        for s in self.stops:   # the longest tail of pending that starts some stop string
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One generation, run lazily: iterate for the text pieces (str), or call .ids() for the new
    token ids. .stats (GenerationStats) is complete once the iteration ends."""

    def __init__(self, model, prompt, max_new_tokens: int | None = 128, *, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop: Sequence[str] | str = (),
                 reset: bool = True, cache=None, on_chunk=None, cache_marks: Sequence[int] = ()):
        """cache: a runtime.prefix_cache.PrefixCache: the prompt resumes from its longest cached
        prefix, and the state after the prompt's chunks and after the generation is kept there
        (the prompt is then the whole sequence: reset must stay True); cache_marks: positions of
        the prompt to keep a snapshot at too (runtime/prefix_cache.py). on_chunk(n_past): called
        after each prefill chunk; what it raises abandons the generation (a server's cancel)."""
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                                           or max_new_tokens < 0):
            raise GGFuseError(None, f"max_new_tokens must be a non-negative integer or None, got {max_new_tokens!r}")
        self.model = model
        self.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.stats = GenerationStats()
        if isinstance(prompt, str):
            model.tokenizer   # built (once per model) before the clock starts
        t = time.perf_counter()
        self.prompt = prompt_ids(model, prompt)
        self.stats.tokenize_s = time.perf_counter() - t
        if not isinstance(reset, bool):
            raise GGFuseError(None, f"reset must be True or False, got {reset!r}")
        self.reset = reset
        self.cache = cache
        self.on_chunk = on_chunk
        self.cache_marks = tuple(cache_marks)
        if cache is not None and not reset:
            raise GGFuseError(None, "a prefix cache needs the whole sequence as the prompt (reset=True)")
        if not self.prompt:
            raise GGFuseError(None, "the prompt is empty: give at least one token to continue from")
        self.stops = _StopStrings(stop)
        self.new_ids: list[int] = []
        self.n_fed_new = 0   # how many of new_ids went into the model's state (all but a last one)
        self._started = False
        self._check_context()

    def _check_context(self) -> None:
        limit = context_limit(self.model)
        if limit is None:
            return
        have = 0 if self.reset else self.model.n_past
        need = have + len(self.prompt)
        if need >= limit:
            raise GGFuseError(self.model.gguf.path, f"the prompt needs {need} positions but the context holds "
                                                    f"{limit} (with room for at least one new token); shorten it"
                                                    + self._context_hint())
        if self.max_new_tokens is not None and need + self.max_new_tokens - 1 > limit:
            raise GGFuseError(self.model.gguf.path, f"{need} prompt positions + {self.max_new_tokens} new tokens do "
                                                    f"not fit the context of {limit} tokens; ask for at most "
                                                    f"{limit - need + 1} new tokens" + self._context_hint())

    def _context_hint(self) -> str:
        return " (or compile with a larger --max-context)" if getattr(self.model.backend, "max_context", None) else ""

    def _tokens(self) -> Iterator[int]:
        """The core loop: yields each new token id (an end-of-generation token ends it unyielded)."""
        if self._started:
            raise GGFuseError(None, "a Generation runs once; start another for a new one")
        self._started = True
        m, st = self.model, self.stats
        tok = m.tokenizer if _has_tokenizer(m) else None
        eog = tok.eog_ids if tok is not None else frozenset()
        sampler = Sampler(self.params)
        limit = context_limit(m)
        t0 = time.perf_counter()
        history = list(self.prompt)
        if self.cache is not None:
            logits, st.n_cached = self.cache.prefill(m, self.prompt, on_chunk=self.on_chunk, marks=self.cache_marks)
        else:
            if self.reset:
                m.reset()
            logits = m.prefill(self.prompt, logits="last", on_chunk=self.on_chunk)[-1]
        st.n_prompt = len(self.prompt)
        st.prefill_s = time.perf_counter() - t0
        budget = self.max_new_tokens if self.max_new_tokens is not None else (limit - m.n_past + 1 if limit else None)
        t_first = None
        decode_cache_report(m.backend, reset=True)
        try:
            while budget is None or len(self.new_ids) < budget:
                check_finite(m, logits)
                t = sampler.sample(logits, history)
                if t_first is None:
                    t_first = time.perf_counter()
                    st.ttft_s = st.tokenize_s + (t_first - t0)
                if t in eog:
                    st.finish = "eog"
                    break
                self.new_ids.append(t)
                history.append(t)
                st.n_new = len(self.new_ids)
                yield t
                if self.stops.hit:
                    st.finish = "stop"
                    break
                if budget is not None and len(self.new_ids) >= budget:
                    break
                if limit is not None and m.n_past >= limit:
                    break
                logits = decode_step(m.backend, t)
                self.n_fed_new += 1
                st.n_decode += 1
            if not st.finish:
                st.finish = "length" if self.max_new_tokens is not None else "context"
            if self.cache is not None:   # the state after the answer: where the next turn starts
                self.cache.insert(m, self.prompt + self.new_ids[:self.n_fed_new], logits=logits)
        finally:
            # also when the consumer stops early (st.finish then stays "": "cancelled")
            st.finish = st.finish or "cancelled"
            if t_first is not None:
                st.decode_s = time.perf_counter() - t_first
            st.expert_cache = decode_cache_report(m.backend)
            m.last_stats = st

    def __iter__(self) -> Iterator[str]:
        """The new text, piece by piece: a multi-byte character is never split, a stop string
        and what follows it never shown."""
        self._active = self._text()
        return self._active

    def close(self) -> None:
        """Stop a generation part way (e.g. the reader went away); .stats then say "cancelled"."""
        active = getattr(self, "_active", None)
        if active is not None:
            active.close()

    def _text(self) -> Iterator[str]:
        steps = self.pieces()
        try:
            for _, piece in steps:
                if piece:
                    yield piece
        finally:
            steps.close()

    def pieces(self) -> Iterator[tuple[int | None, str]]:
        """(token id, the text it lets out) for each new token, the text "" while a character or
        a possible stop string is incomplete; then (None, the held-back tail) if there is one.
        What a server streams: the first pair marks the first token. Close it to stop early."""
        text = self.model.tokenizer.stream()
        tokens = self._tokens()
        try:
            for t in tokens:
                yield t, self.stops.push(text.push(t))
        finally:
            tokens.close()   # now, not when collected: its stats say "cancelled" at once
        tail = self.stops.push(text.flush()) + ("" if self.stops.hit else self.stops.flush())
        if tail:
            yield None, tail

    def ids(self) -> list[int]:
        """Run to the end and return the new ids. With stop strings: up to the token whose text
        completed one (where the vocabulary cleans up spaces, text settles a word late, so a
        token or two more may come)."""
        if self.stops.stops:
            for _ in self:
                pass
        else:
            for _ in self._tokens():
                pass
        return list(self.new_ids)


def _has_tokenizer(model) -> bool:
    try:
        model.tokenizer
    except GGFuseError:
        return False
    return True


def check_finite(model, logits) -> None:
    """NaN or Inf logits (a weight holding NaN / Inf values the default check_tensors="small"
    does not read) are a one-line error naming the model file, never sampled from."""
    # one reduction per token (a NaN anywhere makes the max NaN; +Inf makes it Inf), no mask array
    if not np.isfinite(np.max(logits)):
        gf = getattr(model, "gguf", None)
        raise GGFuseError(getattr(gf, "path", None), "the logits hold NaN or Inf values: a weight of the model may "
                                                     "hold NaN / Inf; compile with --check-tensors all to find it")


def generate(model, prompt, max_new_tokens: int | None = 128, **kwargs) -> list[int]:
    """The new token ids (see Generation for the arguments)."""
    return Generation(model, prompt, max_new_tokens, **kwargs).ids()


def stream(model, prompt, max_new_tokens: int | None = 128, **kwargs) -> Generation:
    """An iterator of text pieces; its .stats are complete once it is exhausted."""
    return Generation(model, prompt, max_new_tokens, **kwargs)


def chat_prompt_ids(tokenizer, template, messages, **template_kwargs) -> list[int]:
    """The token ids of a conversation rendered with a chat template (runtime/chat.py), ending
    with the prompt for the assistant's answer."""
    return encode_rendered(tokenizer, template.render(messages, add_generation_prompt=True, **template_kwargs))


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of text a chat template rendered: the template writes the special tokens itself
    (no BOS added) as text, so control tokens in it are parsed."""
    return tokenizer.encode(text, add_special=False, parse_special=True)


@dataclass
class ChatSession:
    """A conversation kept across turns: each user turn renders the whole conversation with the
    chat template and feeds the model only what it has not seen yet (when a template rewrites an
    earlier turn, it starts over from an empty context: a recurrent state cannot be rolled back).

        chat = ChatSession(m)
        for piece in chat.reply("Hi!", max_new_tokens=64):
            print(piece, end="")
        chat.last.stats
    """
    model: object
    system: str | None = None
    template: str | None = None   # a Jinja chat template instead of the GGUF's own
    template_kwargs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    fed: list = field(default_factory=list)   # the token ids the model's state holds, in order
    last: Generation | None = None

    def __post_init__(self):
        from ggfuse.runtime.chat import ChatTemplate
        self.template = ChatTemplate.from_tokenizer(self.model.tokenizer, self.template)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.model.reset()

    def reply(self, user_text: str, max_new_tokens: int | None = 512, **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer, which joins the conversation."""
        t0 = time.perf_counter()
        messages = [*self.messages, {"role": "user", "content": user_text}]
        ids = chat_prompt_ids(self.model.tokenizer, self.template, messages, **self.template_kwargs)
        t_text = time.perf_counter() - t0
        keep = len(self.fed) if ids[:len(self.fed)] == self.fed and self.model.n_past == len(self.fed) else 0
        if keep == len(ids):   # nothing new to feed: start over so that there are logits to sample
            keep = 0
        self.last = gen = Generation(self.model, ids[keep:], max_new_tokens, reset=keep == 0, **sampling)
        gen.stats.tokenize_s = t_text   # the template and the tokenizer: part of the time to first token
        self.messages = messages   # the turn joins once it can run (a prompt too long raised above)
        pieces = []
        try:
            for piece in gen:
                pieces.append(piece)
                yield piece
        finally:   # an answer cut short joins the conversation as far as it went
            gen.close()
            self.fed = ids + gen.new_ids[:gen.n_fed_new] if gen.stats.n_prompt else []
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
