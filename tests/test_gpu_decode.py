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
