"""The CUDA backend's plumbing on the CPU: every step of every architecture's lowered plan binds
to the launcher its kernel record names, called with the launcher's real signature and the
variant the plan recorded; views, arena offsets and workspace resolve; a chunk runs eagerly and
is captured (with a numpy stand-in for CuPy and stubbed kernels). The kernels themselves are
tested on the GPU (tests/test_gpu_*.py)."""
import numpy as np
import pytest

from fake_cupy import fake_device
from util import ARCHS, GEMMA4, fixture

from ggfuse.kernels.dense.launch import GEMV1_TYPES

MODELS = list(ARCHS) + list(GEMMA4)

# kernel record name -> the launcher stub it must call (fake_cupy names stubs module.function)
CALLS = {"gemm.gemm": "gemm.gemm", "gemm.gemm_swiglu": "gemm.gemm_swiglu", "cublas.gemm_bf16": "gemm.gemm_bf16",
         "dense.get_rows": "dense.get_rows", "dense.rms_norm": "dense.rms_norm", "dense.kv_append": "dense.kv_append",
         "attention.flash_prefill": "attention.flash_attn_prefill", "moe.route": "moe.moe_route",
         "moe.grouped": "moe.moe_gate_up", "deltanet.chunk": "deltanet.chunk_gated_delta_rule",
         "deltanet.recurrent": "deltanet.gated_delta_rule_recurrent", "dense.copy": "dense.copy",
         "dense.ssm_conv_silu": "dense.ssm_conv_silu", "dense.deltanet_gates": "dense.deltanet_gates",
         # Gemma 4
         "attention.window": "attention.window_attn", "dense.kv_ring_append": "dense.kv_ring_append",
         "dense.ple_gather": "dense.ple_gather", "dense.norm_add": "dense.norm_add",
         "dense.norm_add_norm": "dense.norm_add", "dense.gelu_mul": "dense.gelu_mul", "dense.scale": "dense.scale",
         "dense.norm_rope": "dense.norm_rope"}


def _prefill_then_step(be, calls) -> list:
    """A 10-token prefill, then one decode step (the captured T=1 graph): the prefill's launcher
    names; `calls` keeps the step's calls only."""
    be.run_chunk(np.arange(10, dtype=np.int32), "last")
    prefill = [c[0] for c in calls]
    calls.clear()
    be.run_chunk(np.array([5], dtype=np.int32), "last")
    return prefill


def _backend(arch, quant, monkeypatch, **opts):
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.runtime.cuda.backend import CUDABackend
    gf = GGUFFile(fixture(arch, quant))
    plan = compile_gguf(gf.path, gf=gf, **{"chunk": 16, "target": "sm_90a", **opts})
    return plan, CUDABackend(plan, gf, progress=False)


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("arch", MODELS)
def test_backend_binds_every_op(arch, quant, monkeypatch):
    from ggfuse.ir.ops import Op
    from ggfuse.passes import plan_memory
    with fake_device(monkeypatch) as calls:
        plan, be = _backend(arch, quant, monkeypatch)
        ops = {n.op.value for n in be.launch_nodes}
        expected = {n.op.value for n in plan.graph.nodes()} - {"input", "weight", "slice", "fetch_weights", "lm_head"}
        assert expected - {"reshape"} <= ops
        out = be.run_chunk(np.arange(10, dtype=np.int32))
        assert out.shape == (10, plan.hparams["n_vocab"])
        assert be.cuda_graph is not None
        be.run_chunk(np.arange(16, dtype=np.int32))   # replay path
        assert be.run_chunk(np.arange(16, dtype=np.int32), "none") is None
        last = be.run_chunk(np.arange(7, dtype=np.int32), "last")
        assert last.shape == (1, plan.hparams["n_vocab"])
        assert set(be.graphs) == {"body", "head_last"}   # all rows: eager blocks straight to the host
        assert be.head_node.op == Op.LM_HEAD and be.head_node not in be.launch_nodes
        names = {c[0] for c in calls}
        assert "dense.gemv" in names
        # each kernel the plan names is the launcher that ran
        for n in plan.graph.nodes():
            rec = n.meta.get("kernel")
            if rec and rec["name"] in CALLS:
                assert CALLS[rec["name"]] in names, (n.name, rec["name"])
        # the variants recorded are the arguments the launchers got
        for name, bound in calls:
            if name == "gemm.gemm":
                assert bound.arguments.get("impl") in ("wgmma", "mma")
            if name in ("moe.moe_gate_up", "moe.moe_down"):
                assert bound.arguments["schedule"] in ("small", "smallq", "wide", "persist", "tiles")
        # values the plan stores bf16 are bf16 on the device; every value in its planned slot
        for n in plan.graph.nodes():
            for i, st in enumerate(n.meta.get("storage") or []):
                v = n.value(i)
                if v in be.ctx.vals and n.op not in (Op.INPUT,):
                    assert (be.ctx.vals[v].dtype == np.uint16) == (st == "bf16"), (n.name, st)
        # activations and workspace share one arena without overlap while live
        intervals, _ = plan_memory.buffers(plan.graph, 16)
        offsets, peak = plan_memory.place(intervals)
        plan_memory.check_no_overlap(intervals, offsets)
        assert peak <= be.arena.nbytes
        assert any(isinstance(k, tuple) for k in intervals)      # workspace is in the arena
        assert plan.graph.outputs["logits"].node not in {n.id for n in plan.graph.nodes() if n.meta.get("arena")}
        assert "dense.get_rows" in names
        if arch in ("qwen35", "qwen35moe"):   # tensor-core chunked kernel for K, V in {64, 128}, else the fallback
            assert names & {"deltanet.chunk_gated_delta_rule", "deltanet.gated_delta_rule_recurrent"}
        if arch not in ("qwen35", "gemma4-dense"):
            assert {"moe.moe_route", "moe.moe_gate_up", "moe.moe_down"} <= names
        if arch in GEMMA4:
            _check_gemma4_calls(plan, calls)


def test_sm89_plan_runs_the_mma_kernels_on_an_h200(monkeypatch):
    """A plan lowered for Ada (sm_89) binds only mma.sync GEMMs, also on a cc 9.0 device, and the
    kernels are built for that target; an sm_90a plan refuses an Ada device."""
    from ggfuse.errors import DeviceError
    from ggfuse.kernels import nvrtc
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, target="sm_89", dense_gemm="ggfuse")
        be.run_chunk(np.arange(16, dtype=np.int32), "last")
        impls = {bound.arguments.get("impl") for name, bound in calls
                 if name in ("gemm.gemm", "gemm.gemm_swiglu", "moe.moe_gate_up", "moe.moe_down")}
        assert impls == {"mma"}, impls
        assert be.target.name == "sm_89"
        assert nvrtc.device_arch() == "sm_90"
        with be.building():      # the driver compiles sm_89 PTX for the H200
            assert nvrtc.build_arch() == "compute_89"
        recs = [n.meta["kernel"] for n in plan.graph.nodes() if "kernel" in n.meta]
        assert not any("wgmma" in str(r) for r in recs)
    with fake_device(monkeypatch, cc="89"):
        with pytest.raises(DeviceError, match="lowered for sm_90a .* compute capability 89; recompile with --target sm_89"):
            _backend("qwen35moe", "q4_k_m", monkeypatch)


def test_short_chunks_run_a_smaller_graph(monkeypatch):
    """A prompt (or tail) shorter than half the chunk runs the smallest captured size that holds
    it: its own memory layout and graphs, sharing weights, states and the arena."""
    with fake_device(monkeypatch):
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, chunk=1024, max_context=4096)
        assert be.captures == [1024, 512, 256, 1]
        assert be.executor_for(1024) is be and be.executor_for(600) is be
        small = be.executor_for(200)
        assert small.chunk == 256 and small.arena is be.arena and small.states is be.states
        mem = plan.graph.meta["memory"]["by_chunk"]
        assert mem["256"]["peak_bytes"] < mem["1024"]["peak_bytes"] <= be.arena.nbytes
        out = be.run_chunk(np.arange(300, dtype=np.int32) % 300, "last")
        assert out.shape == (1, plan.hparams["n_vocab"]) and be.n_past == 300
        assert be._views[512].graphs and not be.graphs
        be.run_chunk(np.arange(1000, dtype=np.int32) % 300, "none")
        assert be.n_past == 1300 and "body" in be.graphs
        plan2, be2 = _backend("qwen35moe", "q4_k_m", monkeypatch, chunk=1024, max_context=4096, sub_chunks=False)
        assert be2.captures == [1024, 1] and be2.executor_for(10) is be2 and be2.executor_for(1).chunk == 1


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
@pytest.mark.parametrize("arch", MODELS)
def test_backend_binds_precision_f32(arch, quant, monkeypatch):
    """precision f32: every GEMM binds to the f32 kernels (dense/qf32.py, moe/launch_f32.py) on
    the weights as the GGUF stores them, no activation is stored bf16, the delta rule runs the
    f32 recurrence. The f32 launchers run for real (their checks see the views the backend
    binds, in the workspace the plan placed); only their kernels are stubbed."""
    import ctypes
    import sys
    from ggfuse.ir.ops import Op
    from ggfuse.kernels.dense import qf32
    from ggfuse.kernels.moe import launch_f32
    real = [(m, n, getattr(m, n)) for m in (qf32, launch_f32) for n in dir(m)
            if not n.startswith("_") and callable(getattr(m, n))]
    with fake_device(monkeypatch) as calls:
        for m, n, f in real:
            monkeypatch.setattr(m, n, f)
        monkeypatch.setattr(qf32, "_call", lambda name, grid, args, stream, defines=None:
                            calls.append(("qf32." + name, grid, defines)))
        monkeypatch.setattr(launch_f32, "_fn", lambda name, defines=None: lambda grid, block, args:
                            calls.append(("qf32." + name, grid, defines)))
        cp = sys.modules["cupy"]
        cp.cuda.runtime.memsetAsync = lambda ptr, v, n, s: ctypes.memset(ptr, v, n)
        plan, be = _backend(arch, quant, monkeypatch, precision="f32")
        assert all(fmts == ["raw"] or "f32" in fmts for fmts in be.buf.formats.values())
        assert not any("bf16" in fmts for fmts in be.buf.formats.values())
        out = be.run_chunk(np.arange(10, dtype=np.int32))
        assert out.shape == (10, plan.hparams["n_vocab"])
        be.run_chunk(np.arange(16, dtype=np.int32))
        assert be.run_chunk(np.arange(7, dtype=np.int32), "last").shape == (1, plan.hparams["n_vocab"])
        names = {c[0] for c in calls}
        assert not names & {"gemm.gemm", "gemm.gemm_swiglu", "moe.moe_gate_up", "moe.moe_down",
                            "deltanet.chunk_gated_delta_rule", "gemm.gemm_bf16"}, names
        assert any(n.startswith("qf32.gemm_qf32_") for n in names)
        # no activation is stored bf16 (graph inputs and the KV caches / rings they extend stay as they are)
        assert not any(be.ctx.vals[v].dtype == np.uint16 for v in be.ctx.vals
                       if be.graph.node(v.node).op not in (Op.INPUT, Op.KV_APPEND, Op.KV_RING_APPEND))
        if arch in ("qwen35", "qwen35moe"):
            assert "deltanet.gated_delta_rule_recurrent" in names
        if arch not in ("qwen35", "gemma4-dense"):
            assert "moe.moe_route" in names and "qf32.moe_sum_slots_f32" in names
            assert any(n.startswith("qf32.moe_gate_up_qf32_") for n in names)
            assert any(n.startswith("qf32.moe_down_qf32_") for n in names)
        else:
            assert any(n.startswith("qf32.gemm_swiglu_qf32_") for n in names)
        # Gemma's GLUs are the same kernels built with the GELU-tanh gate (GLU_ACT=1)
        glu = [c for c in calls if c[0].startswith(("qf32.gemm_swiglu_qf32_", "qf32.moe_gate_up_qf32_"))]
        assert glu and all((c[2] or {}).get("GLU_ACT") == (1 if arch in GEMMA4 else None) for c in glu), glu


def test_plan_for_the_cpu_is_refused_by_the_cuda_device(monkeypatch):
    from ggfuse.errors import PlanError
    with fake_device(monkeypatch):
        with pytest.raises(PlanError, match="target 'cpu'.*--target sm_90a"):
            _backend("qwen35moe", "q4_k_m", monkeypatch, target="cpu")


def test_prompt_past_the_kv_cache_is_a_clear_error(monkeypatch):
    """A chunk whose padded rows would pass the KV cache's max_context rows: one-line error naming
    the file, the rows needed and the fix, before anything runs."""
    from ggfuse.errors import GGFuseError
    with fake_device(monkeypatch):
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, max_context=24)
        be.run_chunk(np.arange(16, dtype=np.int32))
        with pytest.raises(GGFuseError, match=r"needs 32 KV-cache rows but the cache holds 24; use --max-context >= 32"):
            be.run_chunk(np.arange(4, dtype=np.int32))
        assert "qwen35moe" in str(pytest.raises(GGFuseError, be.run_chunk, np.arange(4, dtype=np.int32)).value)


def test_replayed_profile_times_every_launch(monkeypatch):
    """ggfuse bench's op profile of the replayed prefill: every launch of every chunk captured
    alone and replayed in order, an event between each two; each op against its floor."""
    from ggfuse.runtime import bench
    from ggfuse.runtime.api import Model
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch)
        m = Model(plan, be.gf, be, 16)
        ops = []
        tokens = np.arange(20, dtype=np.int32)
        phases = bench.replay_profile(m, be, tokens, ops, {"matmul_tflops": 700.0, "copy_gbs": 4000.0})
        launches = len(be.launch_nodes) + len(be.executor_for(4).launch_nodes) + 1
        assert sum(o["launches"] for o in ops) == launches
        assert sum(1 for c in calls if c[0] == "graph.launch") >= launches
        assert abs(sum(phases.values()) - launches * 1.0) < 1e-6      # the fake events: 1 ms apart
        assert "moe gemm" in phases and "lm head" in phases
        moe = next(o for o in ops if o["op"] == "moe_grouped_gemm")
        assert moe["gflop"] > 0 and moe["floor_ms"] > 0 and 0 < moe["of_floor"] < 1


def _check_gemma4_calls(plan, calls):
    """Gemma 4's steps ran as the plan says: every sliding layer's attention over its ring with
    the window and ring rows recorded, KV-shared layers over their source's rings and caches,
    the GLUs with the GELU gate, the soft-cap folded into the LM head, the PLE gathered on the
    device, the router scaling each expert's slots."""
    from ggfuse.ir.ops import Op
    g = plan.graph
    hp = plan.hparams
    # each launch runs eagerly and again while captured, at every chunk size: one per output array
    win = list({id(b.arguments["out"]): b for name, b in calls if name == "attention.window_attn"
                and b.arguments["T"] == 16}.values())
    n_swa, n_full = sum(hp["sliding"]), len(hp["sliding"]) - sum(hp["sliding"])
    sliding = [b for b in win if b.arguments["ring_rows"] > 0]
    assert len(sliding) == n_swa, (len(sliding), n_swa)
    assert all(b.arguments["window"] == hp["n_swa"] and b.arguments["ring_rows"] >= hp["n_swa"] - 1
               for b in sliding)
    assert all(b.arguments["D"] == hp["head_dim_swa"] for b in sliding)
    # KV sharing: the shared layers read the very arrays of their source layer
    rings = {}
    for n in g.by_op(Op.ATTENTION_WINDOW):
        rings.setdefault(tuple(n.inputs[3:]), []).append(n.name)
    assert len(rings) == len([i for i, s in enumerate(hp["sliding"]) if s and hp["kv_source"][i] == i])
    ring_ids = {id(b.arguments["k_ring"]) for b in sliding}
    assert len(ring_ids) == len(rings)
    appends = {(id(b.arguments["ring"]), id(b.arguments["x"])) for name, b in calls if name == "dense.kv_ring_append"
               and b.arguments["x"].shape[0] == 16}
    assert len(appends) == 2 * len(rings)
    # full layers at head dims the tensor cores lack run the CUDA-core kernel over the cache
    full = [b for b in win if b.arguments["ring_rows"] == 0] + \
        list({id(b.arguments["out"]): b for name, b in calls if name == "attention.flash_attn_prefill"
              and b.arguments["T"] == 16}.values())
    assert len(full) == n_full
    # the GELU GLUs: dense FFN and experts
    for name, b in calls:
        if name in ("gemm.gemm_swiglu", "moe.moe_gate_up"):
            assert b.arguments["act"] == "gelu", name
        if name in ("moe.moe_route",):
            assert b.arguments["gating"] == "softmax"
    names = [name for name, _ in calls]
    assert "gemm.gemm_swiglu" in names
    if hp["n_expert"]:
        assert names.count("dense.scale_by_expert") == names.count("moe.moe_route") > 0
    if hp["n_embd_per_layer"]:
        ples = [b for name, b in calls if name == "dense.ple_gather"]
        assert ples and all(b.arguments["scale"] == pytest.approx(hp["n_embd_per_layer"] ** 0.5) for b in ples)
    # the soft-cap runs on the head's rows (the last row's GEMV and every all-rows block)
    head = next(iter(g.by_op(Op.LM_HEAD)))
    assert head.meta["kernel"]["softcap"] == hp["final_softcap"] and not g.by_op(Op.SOFTCAP)
    caps = [b for name, b in calls if name == "dense.softcap"]
    assert caps and all(b.arguments["cap"] == hp["final_softcap"] for b in caps)
    # the full layers' rope factors reach the kernel
    ffs = list({id(b.arguments["out"]): b for name, b in calls if name == "dense.norm_rope"
                and b.arguments.get("freq_factors") is not None and b.arguments["x"].shape[0] == 16}.values())
    assert len(ffs) == 2 * sum(1 for i, s in enumerate(hp["sliding"]) if not s and hp["kv_source"][i] == i) + \
        sum(1 for i, s in enumerate(hp["sliding"]) if not s and hp["kv_source"][i] != i)


class _FakeFunction:
    """A kernel looked up in a compiled module: attributes settable, calls recorded."""

    def __init__(self, module, name, log):
        self.module, self.name, self.log = module, name, log
        self.max_dynamic_shared_size_bytes = 0
        self.preferred_shared_memory_carveout = 0

    def __call__(self, grid, block, args, **kw):
        self.log.append((self.module, self.name, tuple(grid), tuple(block), args))


@pytest.mark.slow   # compiles every module the plan loads (NVRTC, minutes the first time; cached after)
@pytest.mark.parametrize("arch", list(GEMMA4) + ["qwen3moe"])
def test_real_launchers_accept_what_the_backend_binds(arch, monkeypatch):
    """The launchers' own Python runs (their shape, stride, dtype and alignment checks see the
    arrays the backend binds); only the kernel calls are recorded. Every kernel they ask for
    exists in the module they load (its compiled cubin's symbols, for the plan's target), and
    each call passes its grid and block."""
    import importlib
    import os

    pytest.importorskip("cuda.bindings.nvrtc")
    from ggfuse.kernels import nvrtc
    log, missing = [], []
    symbols = {}

    def fake_load_module(path, options=(), defines=None):
        full = path if os.path.isabs(path) else os.path.join(nvrtc.KERNELS_DIR, path)
        key = (full, tuple(sorted((defines or {}).items())))
        if key not in symbols:
            symbols[key] = nvrtc.compile_cubin(full, nvrtc.source_arch(full, "sm_90"), options, defines)
        cubin = symbols[key]

        class Module:
            def get_function(self, name):
                if (name.encode() + b"\0") not in cubin:
                    missing.append((path, name, defines))
                return _FakeFunction(path, name, log)
        return Module()

    mods = [importlib.import_module(m) for m in (
        "ggfuse.kernels.dense.launch", "ggfuse.kernels.gemm.launch", "ggfuse.kernels.moe.launch",
        "ggfuse.kernels.attention.launch", "ggfuse.kernels.deltanet.launch")]
    real = [(m, n, getattr(m, n)) for m in mods for n in dir(m) if not n.startswith("_") and callable(getattr(m, n))]
    with fake_device(monkeypatch):
        for m, n, f in real:
            monkeypatch.setattr(m, n, f)
        for m in mods:
            if hasattr(m, "load_module"):
                monkeypatch.setattr(m, "load_module", fake_load_module)
        # the one-row kernels' grid asks the driver how many blocks one wave holds (an H200's
        # 132 SMs x 5 blocks here)
        monkeypatch.setattr(mods[0], "_one_wave", lambda fn, smem: 5 * 132)
        import sys
        cp = sys.modules["cupy"]
        cp.cuda.runtime.memsetAsync = lambda ptr, v, n, s: None
        cp.cuda.get_current_stream = lambda: cp.cuda.Stream()
        plan, be = _backend(arch, "q4_k_m", monkeypatch, dense_gemm="ggfuse")
        be.run_chunk(np.arange(10, dtype=np.int32))
        be.run_chunk(np.arange(16, dtype=np.int32), "last")
        be.run_chunk(np.arange(1, dtype=np.int32), "last")
    assert not missing, missing
    called = {name for _, name, *_ in log}
    assert all(all(int(x) > 0 for x in grid) and all(int(x) > 0 for x in block) for _, _, grid, block, _ in log)
    if arch in GEMMA4:
        assert any(n.startswith("window_attn_d") for n in called) and "kv_ring_append_bf16" in called
        assert any(n.startswith("norm_add_g") for n in called)


@pytest.mark.parametrize("decode_moe", ["gemv", "grouped"])
def test_decode_step_experts(decode_moe, monkeypatch):
    """The one-token step runs the experts as the plan says: decode_moe gemv binds the
    matrix-vector kernels (kernels/moe/gemv.cu) on the picked experts and the shared expert
    and the f32 router gemv, and never the grouped GEMMs; grouped keeps the prefill's kernels.
    Prefill chunks keep the grouped GEMMs either way."""
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_moe=decode_moe, decode_dense="gemv")
        moe_nodes = [n for n in plan.graph.nodes() if n.op.value == "moe_grouped_gemm"]
        assert moe_nodes
        for n in moe_nodes:
            assert (n.meta["kernel"]["by_chunk"]["1"].get("impl") == "gemv") == (decode_moe == "gemv")
            assert "h_gemv" in n.meta["workspace"]["1"] if decode_moe == "gemv" else "h" in n.meta["workspace"]["1"]
            assert "impl" not in n.meta["kernel"]["by_chunk"]["16"]
        _prefill_then_step(be, calls)     # the decode step (captured T=1)
        names = [c[0] for c in calls]
        n_moe = len(moe_nodes)
        # the first step runs the launches once eagerly and once more while capturing them
        reps = names.count("dense.get_rows")
        assert reps >= 1
        if decode_moe == "gemv":
            # routed and shared experts in one gate_up and one down launch per layer: the shared
            # expert is one more slot of the token in both
            assert names.count("moe.moe_gemv_gate_up") == names.count("moe.moe_gemv_down") == n_moe * reps
            # the layout's slot -> expert map is found by the launcher itself (stubbed here)
            assert "moe.moe_gate_up" not in names and "moe.moe_down" not in names
            # each router, its shared gate and top-k in one launch (option decode_router fused)
            assert names.count("moe.moe_route1") == n_moe * reps
            assert "moe.moe_route_slot_experts" not in names and "dense.rowdot_sigmoid" not in names
            assert names.count("dense.gemv") >= reps   # the LM head's last row
            assert "dense.router_gemm" not in names
            ups = [c[1].arguments for c in calls if c[0] == "moe.moe_gemv_gate_up"]
            downs = [c[1].arguments for c in calls if c[0] == "moe.moe_gemv_down"]
            assert not any(b.get("accumulate", False) for b in downs)      # written, shared expert included
            for u, d in zip(ups, downs):
                assert u["shared"] is not None and u["shared"] is d["shared"]
                assert u["shared"].F == u["shared"].h.shape[1] and u["shared"].scale.size == 1
        else:
            assert names.count("moe.moe_gate_up") == n_moe * reps and "moe.moe_gemv_gate_up" not in names
        # the dense matmuls of one token are gemvs too (option decode_dense), nothing through cuBLAS
        n_mm = sum(1 for n in plan.graph.nodes() if n.op.value == "matmul")
        grouped = sum(len(c[1].arguments["mats"]) for c in calls if c[0] == "dense.gemv_group")
        assert grouped > 0       # the projections of one input, one launch (option decode_gemv_group)
        assert names.count("dense.gemv") + grouped >= (n_mm + 1) * reps
        if decode_moe == "gemv":     # (grouped: the shared expert's GEMMs stay)
            assert "blas.gemm_bf16" not in names and "gemm.gemm" not in names and "gemm.gemm_swiglu" not in names
        # the delta rule of one token is the recurrent state update (option decode_deltanet)
        # (with its l2 norms and gates folded in: option decode_deltanet_fold)
        assert "deltanet.gdr_step_fused" in names and "deltanet.chunk_gated_delta_rule" not in names


@pytest.mark.parametrize("decode_dense", ["auto", "gemm", "gemv"])
def test_decode_dense_reads_the_stored_rows(decode_dense, monkeypatch):
    """decode_dense auto: the one-token step's matmuls and the LM head's last row are GEMVs on
    the GGUF's quantised rows, uploaded beside the bf16 copy the prefill's GEMMs read; gemm: the
    GEMMs at one row and the head's last row on the bf16 copy, no raw copies; gemv: the stored
    rows too."""
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_dense=decode_dense)
        g = plan.graph
        weights = g.meta["weights"]
        mms = [n for n in g.nodes() if n.op.value == "matmul"]
        assert mms
        reads = set()
        for n in mms:
            name = g.tensor_of(n.inputs[1])
            w = weights[name]
            one = n.meta["kernel"]["by_chunk"]["1"]
            raw = w["ggml_type"].lower()
            if decode_dense == "gemm" or (decode_dense == "auto" and raw not in GEMV1_TYPES):
                assert one == {"impl": "gemm"} and w["forms"] == ["bf16"]
            else:
                assert {k: one[k] for k in ("impl", "w")} == {"impl": "gemv", "w": raw} and set(one) <= {"impl", "w", "group", "in_group", "norm"} and w["forms"] == ["bf16", "raw"]
                assert w["device_bytes"] > 2 * int(np.prod(w["shape"]))       # both copies counted
                reads.add(raw)
            assert n.meta["kernel"]["by_chunk"]["16"] == {"impl": "gemm"}
        head = g.node(g.outputs["logits"].node).meta["kernel"]
        assert head["all"]["w"] == "bf16"
        assert head["last"]["w"] == ("bf16" if decode_dense == "gemm" else "q6_k")     # (auto: Q6_K in GEMV1_TYPES)
        assert ("q4_k" in reads) == (decode_dense != "gemm")
        _prefill_then_step(be, calls)
        gemvs = [b for name, b in calls if name == "dense.gemv"]
        types = {b.arguments["w_type"] for b in gemvs}
        if decode_dense == "gemm":
            assert types == {"bf16"}           # the head's bf16 copy (the f32 routers: moe_route1)
        else:
            assert reads <= types and "bf16" not in types     # the head's last row: Q6_K as stored
            # each launch got the raw array of its tensor: bytes as stored
            raw_sizes = {w["device_bytes"] - 2 * int(np.prod(w["shape"])) for w in weights.values()
                         if w["forms"] == ["bf16", "raw"]}
            assert {int(b.arguments["w"].nbytes) for b in gemvs if b.arguments["w_type"] not in ("f32", "bf16")} <= raw_sizes


def test_gemv_warps_per_row():
    from ggfuse.kernels.dense.launch import gemv1_warps_per_row, gemv_warps_per_row
    assert gemv1_warps_per_row(32, 2048) == 2 and gemv1_warps_per_row(32, 4096) == 4
    assert gemv1_warps_per_row(8192, 2048) == 1
    assert gemv1_warps_per_row(32, 2048, step=2048) == 1 and gemv1_warps_per_row(32, 4096, step=2048) == 2
    assert gemv_warps_per_row(32, 2048) == 8           # the DeltaNet gates: 32 blocks, not 4
    assert gemv_warps_per_row(2048, 4096) == 2
    assert gemv_warps_per_row(4096, 2048) == 1 and gemv_warps_per_row(248320, 2048) == 1
    assert gemv_warps_per_row(32, 256) == 1            # every lane keeps a group of each row


@pytest.mark.parametrize("precision", ["bf16", "f32"])
def test_one_token_delta_rule_kernel_is_the_plans(precision, monkeypatch):
    """The plan names the one-token delta rule's kernel (by_chunk kernel: step at chunk 1 for the
    head dims gdr_step_* takes, loop for the prefill chunks) and the launcher is told it."""
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, precision=precision, decode_deltanet_fold=False)
        dn = [n for n in plan.graph.nodes() if n.op.value == "chunk_gated_delta_rule"]
        assert dn
        for n in dn:
            by = n.meta["kernel"]["by_chunk"]
            assert by["1"]["kernel"] == "step"
            if precision == "f32":
                assert n.meta["kernel"]["name"] == "deltanet.recurrent" and by["16"] == {"kernel": "loop"}
        _prefill_then_step(be, calls)
        kernels = {b.arguments.get("kernel") for name, b in calls if name == "deltanet.gated_delta_rule_recurrent"}
        assert kernels == {"step"}


@pytest.mark.parametrize("group", [True, False])
def test_decode_projections_of_one_input_share_a_launch(group, monkeypatch):
    """At chunk 1 the one-row products of one input on one stored type (qkv / z / beta / alpha,
    q / k / v) are one gemv_group launch: the first records the others' names, they name it and
    launch nothing, their outputs are live in the memory plan from its step (so nothing placed
    between can share their bytes); each output is its own arena buffer. Off: one gemv each."""
    from ggfuse.passes import plan_memory
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_gemv_group=group, decode_norm_fold=False)
        g = plan.graph
        by_name = {n.name: n for n in g.nodes()}
        leads = [n for n in g.nodes() if n.op.value == "matmul" and n.meta["kernel"]["by_chunk"]["1"].get("group")]
        members = [n for n in g.nodes() if n.op.value == "matmul" and n.meta["kernel"]["by_chunk"]["1"].get("in_group")]
        assert bool(leads) is group and bool(members) is group
        intervals, _ = plan_memory.buffers(g, 1)
        order = {n.id: i for i, n in enumerate(g.topo())}
        for m in members:
            at = m.meta["kernel"]["by_chunk"]["1"]
            lead = by_name[at["in_group"]]
            assert m.name in lead.meta["kernel"]["by_chunk"]["1"]["group"] and m.inputs[0] == lead.inputs[0]
            assert lead.meta["kernel"]["by_chunk"]["1"]["w"] == at["w"]
            assert intervals[m.out][0] == order[lead.id] < order[m.id]
            assert "in_group" not in m.meta["kernel"]["by_chunk"]["16"]
        for lead in leads:
            assert 2 <= 1 + len(lead.meta["kernel"]["by_chunk"]["1"]["group"]) <= 4
        _prefill_then_step(be, calls)
        groups = [c[1].arguments for c in calls if c[0] == "dense.gemv_group"]
        if group:
            assert groups
            for a in groups:
                outs = [m[2].data.ptr for m in a["mats"]]
                assert len(outs) == len(set(outs))
            assert not any(n in be.executor_for(1).launch_nodes for n in members)
        else:
            assert not groups


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("fold", [True, False])
def test_decode_norm_runs_in_the_next_launch(fold, group, monkeypatch):
    """decode_norm_fold: at chunk 1 an add_rms_norm whose first reader is a one-row product or
    the fused router on its normed output records folded_into (that step's name), the step
    records norm (the norm's name) and launches with the norm's second operand, weight, eps,
    sum and normed outputs (gemv_group norm=, with or without grouping; moe_route1 add_norm=);
    the norm launches nothing there, its operands stay live in the memory plan to that step and
    its outputs are live from its own step. Every layer's two norms but the first layer's input
    norm (an rms_norm) fold; the output norm before the LM head does not. Prefill chunks keep
    the norms' launches. Off: no record, an add_rms_norm launch each."""
    from ggfuse.passes import plan_memory
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_norm_fold=fold, decode_gemv_group=group)
        g = plan.graph
        by_name = {n.name: n for n in g.nodes()}
        norms = [n for n in g.nodes() if n.op.value == "add_rms_norm"]
        folded = [n for n in norms if (n.meta["kernel"].get("by_chunk") or {}).get("1", {}).get("folded_into")]
        into = [n for n in g.nodes() if ((n.meta.get("kernel") or {}).get("by_chunk") or {}).get("1", {}).get("norm")]
        assert bool(folded) is fold and len(into) == len(folded)
        assert not fold or len(folded) == 2 * plan.hparams["n_layer"] - 1 == len(norms) - 1
        assert {n.op.value for n in into} <= {"matmul", "moe_route"}
        order = {n.id: i for i, n in enumerate(g.topo())}
        intervals, alias = plan_memory.buffers(g, 1)
        for n in folded:
            p = by_name[n.meta["kernel"]["by_chunk"]["1"]["folded_into"]]
            assert p.meta["kernel"]["by_chunk"]["1"]["norm"] == n.name and p.inputs[0] == n.value(0)
            assert "in_group" not in p.meta["kernel"]["by_chunk"]["1"]
            assert n.meta["kernel"]["by_chunk"]["16"] == {}
            # nothing between the two reads the norm's outputs
            assert not [u for i in range(2) for u, _ in g.uses_of(n.value(i)) if order[u.id] < order[p.id]]
            for v in n.inputs[:2]:
                assert intervals[alias[v]][1] >= order[p.id]
            for i in range(2):
                assert intervals[n.value(i)][0] == order[n.id]
        prefill = _prefill_then_step(be, calls)
        names = [c[0] for c in calls]
        reps = names.count("dense.get_rows")
        gemv_norm = [c[1].arguments for c in calls if c[0] == "dense.gemv_group" and c[1].arguments.get("norm")]
        route_norm = [c[1].arguments for c in calls if c[0] == "moe.moe_route1" and c[1].arguments.get("add_norm")]
        assert prefill.count("dense.add_rms_norm") == len(norms) * prefill.count("dense.get_rows")
        if fold:
            assert len(gemv_norm) == sum(n.op.value == "matmul" for n in into) * reps
            assert len(route_norm) == sum(n.op.value == "moe_route" for n in into) * reps
            assert names.count("dense.add_rms_norm") == (len(norms) - len(folded)) * reps
            for x, (b, w, eps, osum, onorm) in [(a["x"], a["norm"]) for a in gemv_norm] + \
                                               [(a["x"], a["add_norm"]) for a in route_norm]:
                assert x.dtype == b.dtype == w.dtype == osum.dtype == np.float32 and eps > 0
                assert onorm is not None and osum.data.ptr not in (x.data.ptr, b.data.ptr)
        else:
            assert not gemv_norm and not route_norm and names.count("dense.add_rms_norm") == len(norms) * reps


@pytest.mark.parametrize("router", ["fused", "gemv"])
def test_decode_router_in_one_launch(router, monkeypatch):
    """decode_router fused: the one-token step's router GEMV, shared gate and top-k are one
    moe_route1 launch reading the f32 router and shared gate and writing the slots' experts;
    gemv: the f32 GEMV, the top-k and the shared gate's row dot, a launch each."""
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_router=router)
        routes = [n for n in plan.graph.nodes() if n.op.value == "moe_route"]
        assert routes and all(n.meta["kernel"]["by_chunk"]["1"]["router"] == router for n in routes)
        assert all(n.meta["kernel"]["by_chunk"]["16"].get("router") is None for n in routes)
        _prefill_then_step(be, calls)
        names = [c[0] for c in calls]
        reps = names.count("dense.get_rows")
        if router == "fused":
            r1 = [c[1].arguments for c in calls if c[0] == "moe.moe_route1"]
            assert len(r1) == len(routes) * reps and "moe.moe_route_slot_experts" not in names
            for a in r1:
                assert a["w_router"].dtype == np.float32 and a["w_shared"] is not None
                assert a["counter"].dtype == np.uint32 and a["counter"].size == 1
        else:
            assert names.count("moe.moe_route_slot_experts") == len(routes) * reps
            assert names.count("dense.rowdot_sigmoid") == len(routes) * reps and "moe.moe_route1" not in names


@pytest.mark.parametrize("precision", ["bf16", "f32"])
@pytest.mark.parametrize("fold", [True, False])
def test_decode_delta_rule_folds_its_norms_and_gates(fold, precision, monkeypatch):
    """decode_deltanet_fold: at chunk 1 the delta rule's record names its q / k l2 norms and its
    gates, which name it back and launch nothing; the one launch reads the raw q, k (the l2
    norms' inputs), v and the gate inputs, and those stay live in the memory plan to its step.
    Prefill chunks keep every launch."""
    from ggfuse.passes import plan_memory
    with fake_device(monkeypatch) as calls:
        plan, be = _backend("qwen35moe", "q4_k_m", monkeypatch, decode_deltanet_fold=fold, precision=precision)
        g = plan.graph
        by_name = {n.name: n for n in g.nodes()}
        dn = [n for n in g.nodes() if n.op.value == "chunk_gated_delta_rule"]
        order = {n.id: i for i, n in enumerate(g.topo())}
        intervals, alias = plan_memory.buffers(g, 1)
        for n in dn:
            f = n.meta["kernel"]["by_chunk"]["1"].get("fold")
            assert bool(f) is fold
            if not fold:
                continue
            lq, lk, gates = by_name[f["q"]], by_name[f["k"]], by_name[f["gates"]]
            assert (lq.op.value, lk.op.value, gates.op.value) == ("l2_norm", "l2_norm", "deltanet_gates")
            for x in (lq, lk, gates):
                assert x.meta["kernel"]["by_chunk"]["1"] == {"folded_into": n.name}
                assert x.meta["kernel"]["by_chunk"]["16"] == {}
                for v in x.inputs:
                    root = alias.get(v)
                    if root in intervals:
                        assert intervals[root][1] >= order[n.id]
        prefill = _prefill_then_step(be, calls)
        names = [c[0] for c in calls]
        reps = names.count("dense.get_rows")
        assert "dense.l2_norm" in prefill and "dense.deltanet_gates" in prefill
        if fold:
            fused = [c[1].arguments for c in calls if c[0] == "deltanet.gdr_step_fused"]
            assert len(fused) == len(dn) * reps
            assert "dense.l2_norm" not in names and "dense.deltanet_gates" not in names
            for a in fused:
                assert a["q"].dtype == np.float32 and a["eps_q"] > 0 and a["n_valid"] is be.nvalid_dev
        else:
            assert names.count("dense.l2_norm") == 2 * len(dn) * reps and "deltanet.gdr_step_fused" not in names
