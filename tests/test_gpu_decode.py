"""The one-token step on the GPU (the plan's decode capture, chunk size 1): tokens fed one at a
time after a prefill give the logits of the prefill of the longer sequence, on both code paths
(this GPU's and the sm_89 one), and the step is a replayed CUDA graph."""
import numpy as np
import pytest

import ggfuse
from util import ARCHS, fixture, refs

pytestmark = pytest.mark.gpu
from gpu_util import require_gpu  # noqa: E402

cp = require_gpu()


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("target", ["auto", "sm_89"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_match_the_longer_prefill(arch, target, precision):
    """f32: the exact recurrence and f32 GEMMs, so one-token steps equal the prefill to f32
    rounding; bf16: the chunked delta rule's roundings depend on where chunks start, so the
    model tolerance."""
    tokens = refs(arch)["tokens"]
    m = ggfuse.load(fixture(arch, "q4_k_m"), device="cuda", chunk=16, target=target, precision=precision)
    assert 1 in m.backend.captures
    full = m.prefill(tokens)
    m.reset()
    m.prefill(tokens[:30], logits="last")
    steps = np.concatenate([m.prefill(tokens[i:i + 1], logits="last") for i in range(30, 40)])
    assert m.backend.executor_for(1).chunk == 1 and "body" in m.backend.executor_for(1).graphs
    scale = float(np.abs(full).max())
    err = float(np.abs(steps - full[30:40]).max()) / scale
    print(f"{arch} {target} {precision}: decode steps vs prefill max|diff|/max = {err:.2e}")
    if precision == "f32":
        assert err < 2e-3 and (steps.argmax(-1) == full[30:40].argmax(-1)).all()
    else:
        assert err < 2e-2


# ---- decode under --vram-budget: the expert cache (runtime/cuda/decode_cache.py) ---------------

def _budget_model(arch, quant, chunk, host="auto", room="split", resident=False, **opts):
    from ggfuse.options import Options
    from ggfuse.runtime.api import Model
    from ggfuse.runtime.cuda.backend import CUDABackend
    from test_cuda_streaming import compile_gguf, streamed_plan
    gf, plan, _ = streamed_plan(arch, quant, chunk, room=room, **opts)
    if resident:
        plan = compile_gguf(gf.path, chunk=chunk, gf=gf, max_context=64, **opts)
    be = CUDABackend(plan, gf, chunk=chunk, progress=False, options=Options.make(stream_host=host))
    return Model(plan, gf, be, chunk), be


def _prefill_then_steps(m, tokens, n0=20, n=12):
    m.reset()
    m.prefill(tokens[:n0], logits="last")
    return np.concatenate([m.prefill(tokens[i:i + 1], logits="last") for i in range(n0, n0 + n)])


@pytest.mark.parametrize("room,host,opts", [
    ("split", "registered", {}), ("whole", "registered", {}), ("split", "staged", {}),
    ("whole", "registered", {"decode_cache": "lru"}),
    ("whole", "registered", {"decode_cache_slots": 2}),      # k slots: every layer evicts
    ("split", "registered", {"decode_cache": "off"}),       # every streamed expert per token
])
@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0"])
@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3moe", "qwen3next"])
def test_decode_under_a_budget_matches_resident(arch, quant, room, host, opts):
    """One-token steps under a budget (misses copied after each router into cache slots, the
    grouped GEMM reading the decode tables) give the resident plan's logits bit for bit: same
    kernels (dense matrices as stored in both), the experts' bytes only read from elsewhere.
    Twice: the second pass replays the captured step graphs with a warm cache."""
    tokens = refs(arch)["tokens"]
    ref_m, ref_be = _budget_model(arch, quant, 8, resident=True, **opts)
    assert ref_be.streamer is None
    ref = _prefill_then_steps(ref_m, tokens)
    ref_be.close()
    m, be = _budget_model(arch, quant, 8, host, room, **opts)
    assert be.streamer.host_mode == host
    for _ in range(2):
        got = _prefill_then_steps(m, tokens)
        np.testing.assert_array_equal(got, ref)
    rep = be.decode_cache_report()
    if opts.get("decode_cache") == "off":
        assert be.decode_cache is None and rep is None
    else:
        assert "body" in be.executor_for(1).graphs and rep["tokens"] == 2 * 12   # both passes: the stats span resets
        assert rep["bytes_per_token"] < rep["streaming_bytes_per_token"]
        print(f"{arch} {quant} {room} {host} {opts}: hit rate {rep['hit_rate']:.2f} (cache "
              f"{rep['cache_hit_rate']:.2f}), {rep['bytes_per_token']:.0f} B/token of "
              f"{rep['streaming_bytes_per_token']} streaming")
    be.close()


def test_generate_under_a_budget_reports_the_cache():
    """Greedy text under a budget is the resident plan's, and the stats line reports the cache."""
    tokens = [int(t) for t in refs("qwen35moe")["tokens"][:12]]
    ref_m, ref_be = _budget_model("qwen35moe", "q4_k_m", 8, resident=True)
    want = ref_m.generate(tokens, max_new_tokens=16)
    ref_be.close()
    m, be = _budget_model("qwen35moe", "q4_k_m", 8)
    got = m.generate(tokens, max_new_tokens=16)
    assert list(got) == list(want)
    st = m.last_stats
    assert st.expert_cache is not None and st.expert_cache["tokens"] == st.n_decode
    assert "experts on the device" in st.line()
    be.close()


# ---- programmatic dependent launch (kernels/graph.py, option pdl) ------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_programmatic_launch_changes_no_result(arch):
    """The captured prefill chunks and one-token steps with programmatic edges (pdl auto on
    sm_90a) give the same logits, bit for bit, as with full dependencies (pdl off): every kernel
    waits before it reads what the kernels before it wrote."""
    tokens = refs(arch)["tokens"]
    out = {}
    for pdl in ("off", "auto"):
        m = ggfuse.load(fixture(arch, "q4_k_m"), device="cuda", chunk=16, pdl=pdl)
        full = []
        for _ in range(2):                                   # eager, then replayed
            m.reset()
            full.append(m.prefill(tokens))
        m.reset()
        m.prefill(tokens[:30], logits="last")
        steps = np.concatenate([m.prefill(tokens[i:i + 1], logits="last") for i in range(30, 40)])
        out[pdl] = (full[1], steps, m.backend.pdl, m.backend.pdl_edges)
        assert np.array_equal(full[0], full[1])
    assert out["off"][2:] == (False, 0)
    sm90 = int(cp.cuda.Device().compute_capability) >= 90
    assert out["auto"][2] is sm90 and (out["auto"][3] > 0) is sm90, out["auto"][2:]
    assert np.array_equal(out["off"][0], out["auto"][0]) and np.array_equal(out["off"][1], out["auto"][1])
