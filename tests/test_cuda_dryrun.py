"""The CUDA backend's plumbing on the CPU: every op of every architecture's plan binds to a
kernel launcher called with the launcher's real signature, views and arena offsets resolve, and
a chunk runs eagerly and is captured (with a numpy stand-in for CuPy and stubbed kernels).
The kernels themselves are tested on the GPU (tests/test_gpu_*.py)."""
import numpy as np
import pytest

from fake_cupy import fake_device
from util import ARCHS, GEMMA4, fixture

# Gemma 4's ops (attention_window, kv_ring_append, ple_gather, gelu, softcap and their fusions)
# have no CUDA launchers yet (the CUDA half of issue 13); its fixtures join here when they do.
NO_CUDA_YET = [pytest.param(a, marks=pytest.mark.skip(reason="gemma4 ops have no CUDA launchers yet"))
               for a in GEMMA4]


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("arch", list(ARCHS) + NO_CUDA_YET)
def test_backend_binds_every_op(arch, quant, monkeypatch):
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    with fake_device(monkeypatch) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        gf = GGUFFile(fixture(arch, quant))
        plan = compile_gguf(gf.path, chunk=16, gf=gf)
        be = CUDABackend(plan, gf, chunk=16, progress=False)
        ops = {n.op.value for n in be.launch_nodes}
        expected = {n.op.value for n in plan.graph.nodes()} - {"input", "weight", "slice", "concat", "fetch_weights"}
        assert expected - {"reshape"} <= ops
        out = be.run_chunk(np.arange(10, dtype=np.int32))
        assert out.shape == (10, plan.hparams["n_vocab"])
        assert be.cuda_graph is not None
        be.run_chunk(np.arange(16, dtype=np.int32))   # replay path
        assert be.run_chunk(np.arange(16, dtype=np.int32), "none") is None
        last = be.run_chunk(np.arange(7, dtype=np.int32), "last")
        assert last.shape == (1, plan.hparams["n_vocab"])
        assert set(be.graphs) == {"body", "head_last"}   # all rows: eager blocks straight to the host
        assert be.head_node.name == "lm_head" and be.head_node not in be.launch_nodes
        names = {c[0] for c in calls}
        assert "dense.gemv" in names
        # norm / gate outputs that only GEMMs read are stored bf16 (the GEMM rounds them anyway)
        from ggfuse.runtime.cuda.ops import bf16_activations
        vals = bf16_activations(be.graph)
        assert vals and all(be.ctx.vals[v].dtype == np.uint16 for v in vals)
        assert all(be.graph.type_of(v).dtype.value == "f32" for v in vals)
        # the scratch beside the arena is what runtime/cuda/workspace.py says (the budget counts it)
        from ggfuse.runtime.cuda.workspace import workspace_bytes
        est = workspace_bytes(be.graph, 16)
        named = be.scratch_shared["named"]
        assert set(named) <= set(est), set(named) - set(est)
        for k, buf in named.items():
            assert buf.nbytes <= max(est[k], 256), (k, buf.nbytes, est[k])
        live = be.scratch_shared["live"]
        assert sum(b.nbytes for b in live) <= est.get("reshape_copies", 0)
        assert be.graph.outputs["logits"].node not in {n.id for n in be.graph.nodes() if n.meta.get("arena")}

        assert "dense.get_rows" in names and "gemm.gemm" in names
        if arch != "qwen3moe":   # tensor-core chunked kernel for K, V in {64, 128}, else the fallback
            assert names & {"deltanet.chunk_gated_delta_rule", "deltanet.gated_delta_rule_recurrent"}
        if arch != "qwen35":
            assert {"moe.moe_route", "moe.moe_gate_up", "moe.moe_down"} <= names


def test_short_chunks_run_a_smaller_graph(monkeypatch):
    """A prompt (or tail) shorter than half the chunk runs the smallest chunk size that holds
    it: its own memory plan and graphs, sharing weights, states and the arena."""
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    with fake_device(monkeypatch):
        from ggfuse.runtime.cuda.backend import CUDABackend
        gf = GGUFFile(fixture("qwen35moe", "q4_k_m"))
        plan = compile_gguf(gf.path, chunk=1024, gf=gf)
        be = CUDABackend(plan, gf, chunk=1024, max_context=4096, progress=False)
        assert sorted(be.sub_graphs) == [256, 512]
        assert be.executor_for(1024) is be and be.executor_for(600) is be
        small = be.executor_for(200)
        assert small.chunk == 256 and small.arena is be.arena and small.states is be.states
        assert small.graph.meta["memory"]["peak_bytes"] < be.graph.meta["memory"]["peak_bytes"]
        out = be.run_chunk(np.arange(300, dtype=np.int32) % 300, "last")
        assert out.shape == (1, plan.hparams["n_vocab"]) and be.n_past == 300
        assert be._views[512].graphs and not be.graphs
        be.run_chunk(np.arange(1000, dtype=np.int32) % 300, "none")
        assert be.n_past == 1300 and "body" in be.graphs
        monkeypatch.setenv("GGFUSE_SUBCHUNKS", "0")
        be2 = CUDABackend(plan, gf, chunk=1024, max_context=4096, progress=False)
        assert be2.sub_graphs == {} and be2.executor_for(10) is be2


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("arch", list(ARCHS) + NO_CUDA_YET)
def test_backend_binds_precision_f32(arch, quant, monkeypatch):
    """precision="f32": every GEMM binds to the f32 kernels (dense/qf32.py, moe/launch_f32.py) on
    the weights as the GGUF stores them, no activation is stored bf16, the delta rule runs the
    f32 recurrence, and the scratch is what workspace_bytes(..., "f32") says. The f32 launchers
    run for real (their checks see the views the backend binds); only their kernels are stubbed."""
    import ctypes
    import sys
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.ir.ops import Op
    from ggfuse.kernels.dense import qf32
    from ggfuse.kernels.moe import launch_f32
    real = [(m, n, getattr(m, n)) for m in (qf32, launch_f32) for n in dir(m)
            if not n.startswith("_") and callable(getattr(m, n))]
    with fake_device(monkeypatch) as calls:
        for m, n, f in real:
            monkeypatch.setattr(m, n, f)
        monkeypatch.setattr(qf32, "_call", lambda name, grid, args, stream: calls.append(("qf32." + name, grid)))
        monkeypatch.setattr(launch_f32, "_fn", lambda name: lambda grid, block, args: calls.append(("qf32." + name, grid)))
        cp = sys.modules["cupy"]
        cp.cuda.runtime.memsetAsync = lambda ptr, v, n, s: ctypes.memset(ptr, v, n)
        from ggfuse.runtime.cuda.backend import CUDABackend
        gf = GGUFFile(fixture(arch, quant))
        plan = compile_gguf(gf.path, chunk=16, gf=gf)
        be = CUDABackend(plan, gf, chunk=16, progress=False, precision="f32")
        assert all(fmts == ["raw"] or "f32" in fmts for fmts in be.buf.formats.values())
        assert not any("bf16" in fmts for fmts in be.buf.formats.values())
        out = be.run_chunk(np.arange(10, dtype=np.int32))
        assert out.shape == (10, plan.hparams["n_vocab"])
        be.run_chunk(np.arange(16, dtype=np.int32))
        assert be.run_chunk(np.arange(7, dtype=np.int32), "last").shape == (1, plan.hparams["n_vocab"])
        names = {c[0] for c in calls}
        assert not names & {"gemm.gemm", "gemm.gemm_swiglu", "moe.moe_gate_up", "moe.moe_down",
                            "deltanet.chunk_gated_delta_rule"}, names
        assert any(n.startswith("qf32.gemm_qf32_") for n in names)
        # no activation is stored bf16 (graph inputs and the KV caches they extend stay as they are)
        assert not any(be.ctx.vals[v].dtype == np.uint16 for v in be.ctx.vals
                       if be.graph.node(v.node).op not in (Op.INPUT, Op.CONCAT))
        if arch != "qwen3moe":
            assert "deltanet.gated_delta_rule_recurrent" in names
        if arch != "qwen35":
            assert "moe.moe_route" in names and "qf32.moe_sum_slots_f32" in names
            assert any(n.startswith("qf32.moe_gate_up_qf32_") for n in names)
            assert any(n.startswith("qf32.moe_down_qf32_") for n in names)
        else:
            assert any(n.startswith("qf32.gemm_swiglu_qf32_") for n in names)
        from ggfuse.runtime.cuda.workspace import workspace_bytes
        est = workspace_bytes(be.graph, 16, "f32")
        named = be.scratch_shared["named"]
        assert set(named) <= set(est), set(named) - set(est)
        for k, buf in named.items():
            assert buf.nbytes <= max(est[k], 256), (k, buf.nbytes, est[k])


def test_prompt_past_the_kv_cache_is_a_clear_error(monkeypatch):
    """A chunk whose padded rows would pass the KV cache's max_context rows: one-line error naming
    the file, the rows needed and the fix, before anything runs."""
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.errors import GGFuseError
    with fake_device(monkeypatch):
        from ggfuse.runtime.cuda.backend import CUDABackend
        gf = GGUFFile(fixture("qwen35moe", "q4_k_m"))
        plan = compile_gguf(gf.path, chunk=16, gf=gf, max_context=24)
        be = CUDABackend(plan, gf, chunk=16, max_context=24, progress=False)
        be.run_chunk(np.arange(16, dtype=np.int32))
        with pytest.raises(GGFuseError, match=r"needs 32 KV-cache rows but the cache holds 24; use --max-context >= 32"):
            be.run_chunk(np.arange(4, dtype=np.int32))
        assert "qwen35moe" in str(pytest.raises(GGFuseError, be.run_chunk, np.arange(4, dtype=np.int32)).value)
