"""Generation on the CPU backend: greedy continuations identical to llama.cpp's on the F32 fixtures
(up to detected near-ties), decode steps giving the logits a longer prefill gives, the decode
hook, stop strings, end-of-generation tokens, the context limit, streaming, chat sessions."""
import os

import numpy as np
import pytest

import ggfuse
from ggfuse.errors import GGFuseError
from ggfuse.runtime.generate import ChatSession, decode_step
from util import ARCHS, FIXTURES, fixture

GREEDY_PROMPT = "Once upon a time"   # make_text_fixtures.py's
NEAR_TIE = 1e-3      # a top-2 margin (logits) below which another fp32 implementation may pick the other token
LOGIT_TOL = 2e-4     # max |ours - llama.cpp| / max |llama.cpp| along the compared steps


def greedy_ref(arch):
    with np.load(os.path.join(FIXTURES, "text", f"greedy-{arch}.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def models():
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = ggfuse.load(fixture(arch), device="cpu")
        return made[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_llama_cpp(models, arch):
    ref = greedy_ref(arch)
    m = models(arch)
    prompt = m.tokenizer.encode(GREEDY_PROMPT, add_special=True, parse_special=True)
    assert prompt == ref["prompt"].tolist()
    want = ref["ids"].tolist()
    ids = m.generate(GREEDY_PROMPT, len(want))
    assert m.last_stats.finish == "length" and m.last_stats.n_new == len(want)
    n = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), len(want))
    if n < len(want):
        # a divergence is accepted only where llama.cpp's own top-2 were nearly tied
        assert ref["margin"][n] < NEAR_TIE, (f"step {n}: ours {ids[n]}, llama.cpp {want[n]} with a top-2 margin "
                                             f"of {ref['margin'][n]:.4g} (not a near-tie)")
    assert n >= 8, f"only {n} steps compared"
    # the logits along llama.cpp's path, up to where the paths part
    m.reset()
    logits = m.prefill(prompt, logits="last")[-1]
    for step in range(n):
        err = np.abs(logits - ref["logits"][step]).max() / np.abs(ref["logits"][step]).max()
        assert err < LOGIT_TOL, f"step {step}: relative logit error {err:.3g}"
        logits = decode_step(m.backend, want[step])


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_after_prefill_equals_prefill_of_the_longer_sequence(models, arch):
    m = models(arch)
    ref = greedy_ref(arch)
    seq = ref["prompt"].tolist() + ref["ids"].tolist()[:20]
    m.reset()
    whole = m.prefill(seq)
    m.reset()
    k = len(ref["prompt"])
    rows = [m.prefill(seq[:k], logits="last")[-1]]
    for t in seq[k:-1]:
        rows.append(decode_step(m.backend, t))
    assert m.n_past == len(seq) - 1
    got = np.stack(rows)
    np.testing.assert_allclose(got, whole[k - 1:-1], atol=2e-5 * np.abs(whole).max(), rtol=0)


class Scripted:
    """A backend wrapper: forces token script[i] at the i-th logits row it hands out (a large
    bias), optionally with a cache size (max_context) or a decode_step of its own."""

    def __init__(self, inner, script=None, max_context=None, with_decode_step=False):
        self.inner, self.script, self.rows, self.steps = inner, dict(script or {}), 0, 0
        if max_context is not None:
            self.max_context = max_context
        if with_decode_step:
            self.decode_step = self._decode_step

    name = property(lambda self: self.inner.name)
    n_past = property(lambda self: self.inner.n_past)

    def reset(self):
        self.inner.reset()

    def _force(self, out):
        if out is not None and self.rows in self.script:
            out = out.copy()
            out[-1, self.script[self.rows]] += 1e4
        self.rows += out is not None
        return out

    def run_chunk(self, tokens, want="all"):
        out = self.inner.run_chunk(tokens, want)
        return self._force(out) if want == "last" else out

    def _decode_step(self, token_id):
        self.steps += 1
        return self.run_chunk(np.array([token_id]), "last")[0]


@pytest.fixture()
def tiny(models):
    m = models("qwen35moe")
    inner = m.backend
    yield m
    m.backend = inner


def test_the_decode_hook_is_used_when_a_backend_offers_it(tiny):
    plain = tiny.generate(GREEDY_PROMPT, 12)
    tiny.backend = hooked = Scripted(tiny.backend, with_decode_step=True)
    assert tiny.generate(GREEDY_PROMPT, 12) == plain
    assert hooked.steps == 11 == tiny.last_stats.n_decode


def test_end_of_generation_token_stops_and_is_not_returned(tiny):
    eog = tiny.tokenizer.token_to_id["<|im_end|>"]
    assert tiny.tokenizer.is_eog(eog)
    plain = tiny.generate(GREEDY_PROMPT, 12)
    tiny.backend = Scripted(tiny.backend, {5: eog})
    ids = tiny.generate(GREEDY_PROMPT, 12)
    assert ids == plain[:5] and tiny.last_stats.finish == "eog" and tiny.last_stats.n_new == 5


def test_stream_never_splits_a_character(tiny):
    byte_ids = tiny.tokenizer.encode("日本", add_special=False)
    tiny.backend = Scripted(tiny.backend, dict(enumerate(byte_ids)))
    pieces = list(tiny.stream(GREEDY_PROMPT, len(byte_ids)))
    assert pieces == ["日", "本"]


def test_stream_joins_to_the_decoded_ids(tiny):
    ids = tiny.generate(GREEDY_PROMPT, 24, temperature=0.9, seed=4)
    s = tiny.stream(GREEDY_PROMPT, 24, temperature=0.9, seed=4)
    assert "".join(s) == tiny.tokenizer.decode(ids) and s.stats.n_new == 24
    assert tiny.generate(GREEDY_PROMPT, 24, temperature=0.9, seed=5) != ids
    assert tiny.generate(tiny.tokenizer.encode(GREEDY_PROMPT, parse_special=True), 24, temperature=0.9, seed=4) == ids


def test_stopping_the_iteration_early_still_gives_stats(tiny):
    s = tiny.stream(GREEDY_PROMPT, 20)
    for i, _ in enumerate(s):
        if i == 2:
            break
    s.close()
    assert s.stats is tiny.last_stats and tiny.last_stats.finish == "cancelled" and 3 <= tiny.last_stats.n_new <= 4


def test_stop_strings(tiny):
    ids = tiny.generate(GREEDY_PROMPT, 32)
    text = tiny.tokenizer.decode(ids)
    stop = text[12:15]
    cut = text.find(stop)
    assert 0 < cut
    s = tiny.stream(GREEDY_PROMPT, 32, stop=["never in this text \u2603", stop])
    assert "".join(s) == text[:cut] and s.stats.finish == "stop"
    got = tiny.generate(GREEDY_PROMPT, 32, stop=stop)
    assert got == ids[:len(got)]
    assert stop in tiny.tokenizer.decode(got) and stop not in tiny.tokenizer.decode(got[:-1])


def test_context_limit(tiny):
    tiny.backend = Scripted(tiny.backend, max_context=20)
    n_prompt = len(tiny.tokenizer.encode(GREEDY_PROMPT, parse_special=True))
    assert n_prompt == 14
    with pytest.raises(GGFuseError) as e:
        tiny.generate(GREEDY_PROMPT, 10)
    assert "do not fit the context of 20 tokens; ask for at most 7 new tokens" in str(e.value)
    assert "\n" not in str(e.value) and tiny.gguf.path in str(e.value)
    ids = tiny.generate(GREEDY_PROMPT, None)
    assert len(ids) == 7 and tiny.last_stats.finish == "context" and tiny.n_past == 20
    with pytest.raises(GGFuseError, match="the prompt needs 20 positions but the context holds 20"):
        tiny.generate(list(range(20)), 1)


def test_bad_arguments(tiny):
    for kw, words in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                      (dict(prompt=[]), "prompt is empty"), (dict(prompt=[1.5]), "list of token ids"),
                      (dict(prompt=[400]), "outside the vocabulary"), (dict(stop=[3]), "stop must be")]:
        args = {"prompt": GREEDY_PROMPT, "max_new_tokens": 4, **kw}
        with pytest.raises(GGFuseError, match=words):
            tiny.generate(args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert tiny.generate(GREEDY_PROMPT, 0) == []


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_session_keeps_the_state_and_feeds_only_the_new_turn(tiny):
    tok = tiny.tokenizer
    answer = tok.encode("Hi there", add_special=False)
    script = {**dict(enumerate(answer)), len(answer): tok.token_to_id["<|im_end|>"]}
    tiny.backend = Scripted(tiny.backend, script)
    chat = ChatSession(tiny, template=CHATML)
    assert "".join(chat.reply("Hello", 16)) == "Hi there" and chat.last.stats.finish == "eog"
    assert chat.messages[-1] == {"role": "assistant", "content": "Hi there"}
    fed = list(chat.fed)
    second = "".join(chat.reply("And now?", 16))
    full = tok.encode(chat.template.render(chat.messages[:-1]), add_special=False, parse_special=True)
    # only what follows the first turn was fed: the state carried over ...
    assert len(fed) > 20 and full[:len(fed)] == fed and chat.last.stats.n_prompt == len(full) - len(fed)
    # ... and gives what a fresh prefill of the whole conversation gives
    tiny.backend = tiny.backend.inner
    fresh = tiny.generate(full, 16)
    assert second == tok.decode(fresh)


def test_chat_needs_a_template(tiny):
    from ggfuse.runtime.chat import ChatTemplateError
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatSession(tiny)
    example = ggfuse.load(os.path.join(os.path.dirname(FIXTURES), "..", "examples", "qwen35moe-tiny-q4_k_m.gguf"),
                          device="cpu")
    chat = ChatSession(example)   # the example model carries Qwen3.5's template
    text = "".join(chat.reply("Hello", 4))
    assert chat.last.stats.n_prompt == len(example.tokenizer.encode(
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n", add_special=False, parse_special=True))
    assert isinstance(text, str)
