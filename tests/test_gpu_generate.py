"""Generation on the CUDA backend (gpu marker): with precision="f32", greedy continuations equal to
llama.cpp's on the F32 fixtures (up to detected near-ties), decode steps giving the logits a
longer prefill gives, and the CPU's decode logits; the default bf16 path generates the same
tokens where no near-tie intervenes. The decode step is whatever the backend offers
(runtime/generate.py decode_step: its own decode_step, else a one-token run_chunk)."""
import numpy as np
import pytest

import ggfuse
from ggfuse.runtime.generate import decode_step
from test_generate import GREEDY_PROMPT, NEAR_TIE, greedy_ref
from util import ARCHS, fixture

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu  # noqa: E402

cp = require_gpu()


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_f32_greedy_matches_llama_cpp(arch):
    ref = greedy_ref(arch)
    m = ggfuse.load(fixture(arch), device="cuda", chunk=16, precision="f32")
    want = ref["ids"].tolist()
    ids = m.generate(GREEDY_PROMPT, len(want))
    n = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), len(want))
    print(f"{arch}: {n} of {len(want)} steps identical; {m.last_stats.line()}")
    if n < len(want):
        assert ref["margin"][n] < NEAR_TIE, f"step {n}: ours {ids[n]}, llama.cpp {want[n]} (margin {ref['margin'][n]:.4g})"
    m.reset()
    logits = m.prefill(ref["prompt"].tolist(), logits="last")[-1]
    for step in range(n):
        err = np.abs(logits - ref["logits"][step]).max() / np.abs(ref["logits"][step]).max()
        # precision f32 keeps attention's bf16 KV cache: ~2.5e-3 of the largest logit on qwen3moe
        assert err < 5e-3, f"step {step}: relative logit error {err:.3g}"
        logits = decode_step(m.backend, want[step])


# precision f32 keeps attention's bf16 KV cache (~2.5e-3 of the largest logit on qwen3moe)
@pytest.mark.parametrize("precision, tol", [("f32", 5e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_decode_after_prefill_equals_longer_prefill_and_cpu(arch, precision, tol):
    ref = greedy_ref(arch)
    seq = ref["prompt"].tolist() + ref["ids"].tolist()[:12]
    k = len(ref["prompt"])
    m = ggfuse.load(fixture(arch), device="cuda", chunk=16, precision=precision)
    whole = m.prefill(seq)
    m.reset()
    rows = [m.prefill(seq[:k], logits="last")[-1]] + [decode_step(m.backend, t) for t in seq[k:-1]]
    got = np.stack(rows)
    scale = np.abs(whole).max()
    assert np.abs(got - whole[k - 1:-1]).max() <= tol * scale
    cpu = ggfuse.load(fixture(arch), device="cpu").prefill(seq)
    assert np.abs(got - cpu[k - 1:-1]).max() <= tol * scale


def test_gpu_stream_and_timing_line():
    m = ggfuse.load(fixture("qwen35moe", "q4_k_m"), device="cuda")
    s = m.stream(GREEDY_PROMPT, 16)
    text = "".join(s)
    assert s.stats.n_new == 16 and s.stats.decode_tok_per_s > 0 and isinstance(text, str)
    print(s.stats.line())
