"""Streamed experts on the GPU (run by the lead on the device): under a budget small enough to
force streaming, the logits are bit-identical to fully resident (same kernels: dense matrices
forced to the same form, dense_form=raw; the MoE scatter adds k=2 terms onto zero, which is
order-independent), eager and graph-replayed, multi-chunk, with registered and staged host
paths, from a cold page cache; measured device memory stays under the budget. Plans are
lowered for sm_90a with dense matrices as stored (test_cuda_streaming.compile_gguf)."""
import os

import numpy as np
import pytest

from gpu_util import require_gpu
from test_cuda_streaming import MOE_ARCHS, compile_gguf, streamed_plan
from util import refs

pytestmark = pytest.mark.gpu
cp = require_gpu()


def _model(gf, plan, chunk, host="auto"):
    from ggfuse.options import Options
    from ggfuse.runtime.api import Model
    from ggfuse.runtime.cuda.backend import CUDABackend
    be = CUDABackend(plan, gf, chunk=chunk, progress=False, options=Options.make(stream_host=host))
    return Model(plan, gf, be, chunk), be


def _resident(arch, quant, chunk, tokens):
    gf, plan, _ = streamed_plan(arch, quant, chunk)
    full = compile_gguf(gf.path, chunk=chunk, gf=gf, max_context=64)
    m, be = _model(gf, full, chunk)
    assert be.streamer is None
    out = m.prefill(tokens)
    be.close()
    return out


@pytest.mark.parametrize("host", ["registered", "staged"])
@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_streamed_logits_are_bit_identical(arch, quant, host):
    tokens = refs(arch)["tokens"]
    chunk = 8                               # several chunks, the last one short
    ref = _resident(arch, quant, chunk, tokens)
    gf, plan, budget = streamed_plan(arch, quant, chunk)
    m, be = _model(gf, plan, chunk, host)
    assert be.streamer.host_mode == host
    first = m.prefill(tokens)               # eager first chunk, then replays
    assert be.cuda_graph is not None
    np.testing.assert_array_equal(first, ref)
    m.reset()
    again = m.prefill(tokens)               # every chunk replayed
    np.testing.assert_array_equal(again, ref)
    mem = be.device_memory()
    print(f"{arch} {quant} {host}: budget {budget} B, pool {mem['pool_bytes']} B, "
          f"device-wide {mem['used_since_load_bytes']} B since load")
    be.close()


@pytest.mark.parametrize("room,precision", [("whole", "bf16"), ("split", "f32")])
def test_whole_layers_and_f32_precision_stream_bit_identical(room, precision):
    """Every layer's experts streamed whole (no expert table), and a split plan under
    precision="f32" (its own grouped kernels read the tables): logits as fully resident."""
    from ggfuse.runtime.api import Model
    from ggfuse.runtime.cuda.backend import CUDABackend
    arch, chunk = "qwen35moe", 8
    tokens = refs(arch)["tokens"]
    gf, plan, _ = streamed_plan(arch, "q4_k_m", chunk, room=room, precision=precision)
    full = compile_gguf(gf.path, chunk=chunk, gf=gf, max_context=64, precision=precision)
    outs = []
    for p in (full, plan):
        be = CUDABackend(p, gf, chunk=chunk, progress=False)
        outs.append(Model(p, gf, be, chunk).prefill(tokens))
        be.close()
    np.testing.assert_array_equal(outs[1], outs[0])


def test_f32_experts_stream_converted():
    tokens = refs("qwen35moe")["tokens"]
    ref = _resident("qwen35moe", "f32", 8, tokens)
    gf, plan, _ = streamed_plan("qwen35moe", "f32", 8)
    m, be = _model(gf, plan, 8)
    assert be.streamer.host_mode == "staged"
    np.testing.assert_array_equal(m.prefill(tokens), ref)
    be.close()


def test_cold_page_cache(tmp_path):
    """The GGUF's pages dropped from the page cache before load (a private copy, so other
    tests' mappings do not keep them): registration faults them in, staging reads them."""
    import shutil
    arch = "qwen35moe"
    tokens = refs(arch)["tokens"]
    ref = _resident(arch, "q4_k_m", 8, tokens)
    for host in ("registered", "staged"):
        gf0, plan0, budget = streamed_plan(arch, "q4_k_m", 8)
        path = tmp_path / f"cold-{host}.gguf"
        shutil.copyfile(gf0.path, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)                  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        from ggfuse.compiler.gguf_file import GGUFFile
        gf = GGUFFile(str(path))
        plan = compile_gguf(gf.path, chunk=8, gf=gf, max_context=64, vram_budget=budget)
        # the upload reads only the resident weights: the experts' pages are still cold here
        m, be = _model(gf, plan, 8, host)
        np.testing.assert_array_equal(m.prefill(tokens), ref)
        be.close()


def test_measured_memory_under_budget_on_a_shortened_35b(tmp_path):
    """A 4-layer synthetic Qwen3.5-35B-A3B (real layer shapes, 256 experts) under a budget that
    streams the last experts of every layer: measured device memory (the pool, and device-wide
    since load) stays under the budget; and the logits are bit-identical to resident under
    precision="f32", whose kernels are deterministic. (The default kernels' top-8 scatter adds
    with f32 atomics in a varying order; on a random 256-expert router that noise flips near-tied
    experts a few layers on, resident against resident too, so bf16 runs are not compared.)"""
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.compiler.synth import write_synth
    from ggfuse.runtime.api import Model
    from ggfuse.runtime.cuda.backend import CUDABackend
    from test_cuda_streaming import tight_budget
    import gc
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    path = tmp_path / "q35-4l.gguf"
    write_synth("qwen3.5-35b-a3b", "q4_k_m", str(path), layers=4, progress=False)
    gf = GGUFFile(str(path))
    full = compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048)
    budget = tight_budget(full, layers=2.5)
    plan = compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048, vram_budget=budget)
    split = plan.stats["prefetch"]["streamed_experts"]
    assert split and all(0 < m < 256 for m in split.values())
    tokens = np.random.default_rng(0).integers(0, plan.hparams["n_vocab"], size=1000)
    m, be = _model(gf, plan, 512)
    m.prefill(tokens, logits="last")
    mem = be.device_memory()
    print(f"budget {budget / 2**30:.3f} GiB, pool {mem['pool_bytes'] / 2**30:.3f} GiB, "
          f"device-wide {mem['used_since_load_bytes'] / 2**30:.3f} GiB")
    assert mem["pool_bytes"] <= budget and mem["used_since_load_bytes"] <= budget
    be.close()
    del m, be
    outs = []
    for p in (compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048, vram_budget=budget, precision="f32"),
              compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048, precision="f32")):
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        be = CUDABackend(p, gf, chunk=512, progress=False)
        outs.append(Model(p, gf, be, 512).prefill(tokens, logits="last"))
        be.close()
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gathered_embedding_through_sub_chunks(arch):
    """A streamed plan gathers the token embedding on the host and keeps a 16-row LM head block:
    through the main executor and the sub-chunk executors (a 32-token chunk, then an 8-token
    tail; a 12-token prompt on the 16-token executor) the logits equal fully resident's:
    bit-identical for the last row (the same GEMV), to rounding for all rows (the all-rows head
    runs in blocks of 16 rows instead of 32)."""
    tokens = refs(arch)["tokens"]
    gf, plan, _ = streamed_plan(arch, "q4_k_m", 32, sub_chunk_min=8)
    assert plan.stats["prefetch"]["embedding"] == "host-gathered"
    full = compile_gguf(gf.path, chunk=32, gf=gf, max_context=64, sub_chunk_min=8)
    out = {}
    for name, p in (("resident", full), ("streamed", plan)):
        m, be = _model(gf, p, 32)
        assert (be.embedding is not None) == (name == "streamed")
        got = []
        for toks in (tokens, tokens[:12]):
            for want in ("all", "last", "last"):      # eager, then replayed
                m.reset()
                got.append(m.prefill(toks, logits=want))
        out[name] = got
        be.close()
    for a, b in zip(out["streamed"], out["resident"]):
        if a.shape[0] == 1:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
