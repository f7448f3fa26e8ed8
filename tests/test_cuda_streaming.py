"""Streamed experts in the CUDA backend, on the CPU (tests/fake_cupy.py: the fake device is host
memory, so the copies really move bytes): streamed weights are not uploaded, slots are allocated
as the plan says, every FETCH_WEIGHTS is bound, the copies land the GGUF's bytes in the slot the
grouped GEMM reads, and the events order slot reuse and consumers both ways, eagerly and inside
the capture. The numbers on the device: tests/test_gpu_streaming.py."""
import numpy as np
import pytest

from fake_cupy import fake_device
from ggfuse.compiler.driver import compile_gguf as _compile
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.errors import GGFuseError, PlanError
from ggfuse.ir.ops import Op
from util import fixture

MOE_ARCHS = ["qwen35moe", "qwen3moe", "qwen3next"]


def compile_gguf(*args, **kw):
    """Plans lowered for the H200 (the fake device's target), dense matrices as stored (so a
    resident plan's fixed bytes are a budgeted one's), unless a test says otherwise."""
    return _compile(*args, **{"target": "sm_90a", "dense_form": "raw", **kw})


def tight_budget(plan, layers: float) -> int:
    """A budget holding the fixed part and `layers` layers' experts (the reserve is budget/16
    for toy budgets: solve for it), as tests/test_pass_schedule.py does."""
    from ggfuse.passes.schedule_expert_prefetch import fixed_bytes
    p = plan.stats["prefetch"]
    # the fixed part of a plan that streams (embedding gathered on the host, small LM head block)
    lean = fixed_bytes(plan.graph, chunk=p["chunk"], max_context=p["max_context"], lean=True)
    fixed = sum(lean.values()) - lean["reserve"]
    per_layer = p["expert_bytes_total"] / plan.hparams["n_layer"]
    return int((fixed + layers * per_layer) * 16 / 15) + 1


def streamed_plan(arch, quant="q4_k_m", chunk=8, room="split", **opts):
    """A plan that streams. room "split": room for all layers' experts but half of one (every
    layer keeps its first experts and streams its last 1-3 of 4: qwen35moe's 4 layers through
    two slots, the 2-layer fixtures' through one); "whole": room for 1.1 layers' experts beside
    the fixed part (every layer streams all its experts, through one slot)."""
    gf = GGUFFile(fixture(arch, quant))
    full = compile_gguf(gf.path, chunk=chunk, gf=gf, max_context=64, **opts)
    budget = tight_budget(full, layers=full.hparams["n_layer"] - 0.5 if room == "split" else 1.1)
    plan = compile_gguf(gf.path, chunk=chunk, gf=gf, max_context=64, vram_budget=budget, **opts)
    assert plan.stats["prefetch"]["streamed_layers"], plan.stats["prefetch"]
    return gf, plan, budget


def _ptr_in(arr, buf) -> bool:
    a, b = buf.data.ptr, buf.data.ptr + buf.nbytes
    return a <= arr.data.ptr < b


def _reads(w, buf) -> bool:
    """Does a grouped GEMM's weight operand (a stack, or an ExpertTable) read inside buf?"""
    from ggfuse.kernels.moe.table import ExpertTable
    a, b = buf.data.ptr, buf.data.ptr + buf.nbytes
    if isinstance(w, ExpertTable):
        return bool(((w.ptrs >= a) & (w.ptrs < b)).any())
    return _ptr_in(w, buf)


def _streamed_bytes(gf, p):
    """The bytes of a piece's streamed experts [first, end) in device form."""
    if p.convert:
        from ggfuse.kernels.dequant.ref import f32_to_bf16_bits
        full = f32_to_bf16_bits(gf.dequantize(p.name)).view(np.uint8).reshape(-1)
        return full[p.first * p.dev_e:p.end * p.dev_e]
    return gf.raw(p.name)[p.first * p.src_e:p.end * p.src_e]


def _slot_contents_ok(be, gf):
    """The last layer fetched into each slot sits there byte for byte as the GGUF stores it."""
    st = be.streamer
    last = {}
    for f in st.fetches:
        last[f.slot] = f
    for f in last.values():
        buf = np.asarray(st.slot_buffers[f.slot])
        for p in f.pieces:
            got = buf[p.slot_offset:p.slot_offset + p.dev_bytes]
            assert np.array_equal(got, _streamed_bytes(gf, p)), p.name


def _check_order(calls, be, *, captured: bool):
    """For each fetch: the slot's previous reader < fork recorded on compute < copy stream waits
    for it < copies on the copy stream < done recorded on copy < compute waits for done < the
    layer's first expert GEMM. Within one eager run, or within one capture."""
    st = be.streamer
    if captured:
        begin = min(i for i, c in enumerate(calls) if c[0] == "capture.begin")     # the body's
        end = min(i for i, c in enumerate(calls) if c[0] == "capture.end")
    else:
        begin = 0
        end = min([i for i, c in enumerate(calls) if c[0] == "capture.begin"] + [len(calls)])
    seq = list(enumerate(calls))[begin:end]
    s, c = be.stream, be.copy_stream
    gemms = [(i, x[1]) for i, x in seq if x[0] in ("moe.moe_gate_up", "moe.moe_down")]

    def reads(bound, slot):
        w = bound.arguments.get("w_gate", bound.arguments.get("w_down"))
        return _reads(w, st.slot_buffers[slot])
    for slot in range(st.n_slots):
        fetches = [f for f in st.fetches if f.slot == slot]
        buf = st.slot_buffers[slot]
        lo, hi = buf.data.ptr, buf.data.ptr + buf.nbytes
        copies = [i for i, x in seq if x[0] == "runtime.memcpyAsync" and lo <= x[1][0] < hi]
        assert all(calls[i][1][4] == c.ptr for i in copies)
        readers = [i for i, b in gemms if reads(b, slot)]
        # group the slot's copies by fetch: a group ends where the slot is next read
        groups, cur = [], []
        for i in copies:
            if cur and any(cur[-1] < r < i for r in readers):
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        assert len(groups) == len(fetches), (slot, groups)
        for f, grp in zip(fetches, groups):
            k0 = grp[0]
            fork_wait = max(i for i, x in seq if i < k0 and x[0] == "stream.wait_event" and x[1][0] is c)
            fork_ev = calls[fork_wait][1][1]
            fork_rec = max(i for i, x in seq if i < fork_wait and x[0] == "event.record" and x[1][0] is fork_ev)
            assert calls[fork_rec][1][1] is s
            done_rec = min(i for i, x in seq if i > grp[-1] and x[0] == "event.record" and x[1][1] is c)
            done_ev = calls[done_rec][1][0]
            join = min(i for i, x in seq if i > done_rec and x[0] == "stream.wait_event" and x[1][1] is done_ev)
            assert calls[join][1][0] is s
            first_use = min(r for r in readers if r > grp[-1])
            assert fork_rec < fork_wait < k0 <= grp[-1] < done_rec < join < first_use, f.layer
            # nothing reads the slot while it is being overwritten
            assert not [r for r in readers if fork_rec < r < join], f.layer


@pytest.mark.parametrize("arch,room", [(a, "split") for a in MOE_ARCHS] + [("qwen35moe", "whole")])
def test_streamed_plan_binds_registered(arch, room, monkeypatch):
    gf, plan, budget = streamed_plan(arch, room=room)
    info = plan.stats["prefetch"]
    with fake_device(monkeypatch) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        read = []
        raw = gf.raw
        monkeypatch.setattr(gf, "raw", lambda name: read.append(name) or raw(name))
        be = CUDABackend(plan, gf, chunk=8, progress=False)
        st = be.streamer
        assert st.host_mode == "registered"
        fetch_nodes = be.graph.by_op(Op.FETCH_WEIGHTS)
        assert sorted(st.by_node) == sorted(n.id for n in fetch_nodes)
        assert sorted(st.by_layer) == info["streamed_layers"]
        assert max(len(fs) for fs in st.by_layer.values()) == info["pieces_per_layer"]
        # streamed tensors: a whole streamed layer's never read for upload and bound to a view of
        # its layer's slot; a split layer's (experts [0, first) resident): its resident experts
        # uploaded, the tensor bound to an expert table, expert e < first in that upload and
        # expert e >= first at slot offset + (e - first) * expert bytes
        from ggfuse.kernels.moe.table import ExpertTable
        split = {n for n in st.tensors if st.resident_experts(n) > 0}
        assert bool(split) == (room == "split") and (room == "whole" or split == set(st.tensors))
        assert not (set(read) & set(st.tensors)) - split
        assert len(st.slot_buffers) == info["slots"]
        assert st.slot_bytes >= max(f.dev_bytes for f in st.fetches)
        assert {l: fs[0].pieces[0].n_experts - st.resident_experts(fs[0].pieces[0].name)
                for l, fs in st.by_layer.items()} == {int(l): m for l, m in info["streamed_experts"].items()}
        for name, fps in st.tensors.items():
            arr = be.weight(name, "gemm")[0]
            f0, p0 = fps[0]
            if len(fps) == 1 and p0.first == 0:        # a whole layer in one fetch: the slot's view
                slot = st.slot_buffers[f0.slot]
                assert _ptr_in(arr, slot)
                assert (arr.data.ptr - slot.data.ptr) % 256 == 0   # CuPy bases are 512-aligned
                continue
            assert isinstance(arr, ExpertTable)
            want = np.zeros(p0.n_experts, dtype=np.uint64)
            if p0.first:
                part = be.buf.parts[name]
                assert np.array_equal(np.asarray(part).view(np.uint8).reshape(-1), gf.raw(name)[:p0.first * p0.src_e])
                want[:p0.first] = [part.data.ptr + e * p0.dev_e for e in range(p0.first)]
            for f, p in fps:
                slot = st.slot_buffers[f.slot]
                want[p.first:p.end] = [slot.data.ptr + p.slot_offset + (e - p.first) * p.dev_e
                                       for e in range(p.first, p.end)]
            assert np.array_equal(arr.ptrs, want), name
        regs = [c[1] for c in calls if c[0] == "runtime.hostRegister"]
        assert regs and all(flags == 0x09 and ptr % 4096 == 0 for ptr, _, flags in regs)
        # every fetch bound: a step and a join in the schedule
        assert sum(n.op == Op.FETCH_WEIGHTS for n in be.launch_nodes) == 2 * len(fetch_nodes)
        out = be.run_chunk(np.arange(8, dtype=np.int32))
        assert out.shape == (8, plan.hparams["n_vocab"])
        _slot_contents_ok(be, gf)
        # the grouped GEMMs of split layers read through device tables of their experts' addresses
        # (gate then up; down), the others through their stacks
        from ggfuse.kernels.moe import table
        for fn, w in (("moe.moe_gate_up", "w_gate"), ("moe.moe_down", "w_down")):
            bound = [x[1].arguments for x in calls if x[0] == fn]
            assert bound and all((b["wtab"] is not None) == isinstance(b[w], ExpertTable) for b in bound)
            for b in bound:
                if b["wtab"] is None:
                    continue
                E = b["E"]
                want = (table.pointers(b["w_down"], E) if fn == "moe.moe_down" else
                        table.gate_up_pointers(b["w_gate"], b["w_up"], E, None if b["w_up"] is not None else 0))
                if fn == "moe.moe_down" or b["w_up"] is not None:
                    assert np.array_equal(np.asarray(b["wtab"]), want)
            assert any(b["wtab"] is not None for b in bound) == bool(split)
        _check_order(calls, be, captured=False)
        assert be.cuda_graph is not None and not hasattr(be.cuda_graph, "items")   # one graph
        _check_order(calls, be, captured=True)
        be.run_chunk(np.arange(5, dtype=np.int32))
        # only resident weights and the slots: under the budget (plus tiny I/O buffers)
        be.close()
        assert [c for c in calls if c[0] == "runtime.hostUnregister"]


@pytest.mark.parametrize("why", ["option", "refused"])
def test_staged_fallback(why, monkeypatch, capsys):
    from ggfuse.options import Options
    gf, plan, _ = streamed_plan("qwen35moe")
    opts = Options.make(stream_host="staged" if why == "option" else "auto")
    with fake_device(monkeypatch, refuse_register=(why == "refused")) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, chunk=8, progress=False, options=opts)
        assert be.streamer.host_mode == "staged"
        if why == "refused":
            assert "cannot page-lock" in capsys.readouterr().err
        for n in (8, 8, 3):          # eager, captured, replayed (segments with host steps)
            be.run_chunk(np.arange(n, dtype=np.int32) % 7)
            _slot_contents_ok(be, gf)
        prog = be.cuda_graph
        assert prog.n_graphs > 1 and any(type(x).__name__ == "HostStep" for x in prog.items)
        _check_order(calls, be, captured=False)
        be.close()


def test_f32_experts_are_converted_while_staged(monkeypatch, capsys):
    gf, plan, _ = streamed_plan("qwen3moe", quant="f32")
    with fake_device(monkeypatch):
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, chunk=8, progress=False)
        assert be.streamer.host_mode == "staged"
        assert all(p.convert and p.fmt == "bf16" for f in be.streamer.fetches for p in f.pieces)
        be.run_chunk(np.arange(8, dtype=np.int32))
        _slot_contents_ok(be, gf)
        be.close()


def test_routed_fetch_copies_only_routed_experts(monkeypatch):
    """Force routed mode as test_pass_schedule does (top-1 in the planner's estimate, chunk 1),
    then set the layer's expert offsets as the route kernel would: experts 0 and 2 routed."""
    from ggfuse.compiler import driver
    gf = GGUFFile(fixture("qwen35moe", "q4_k_m"))
    full = compile_gguf(gf.path, chunk=1, gf=gf, max_context=64)
    budget = tight_budget(full, layers=2.2)
    real = driver.build_graph

    def top1(g_f):
        g = real(g_f)
        g.meta["hparams"]["n_expert_used"] = 1
        return g
    monkeypatch.setattr(driver, "build_graph", top1)
    # decode_cache off: a one-token chunk would otherwise take the decode cache's host steps
    # (tests/test_decode_cache.py) instead of the routed fetch
    plan = compile_gguf(gf.path, chunk=1, gf=gf, max_context=64, vram_budget=budget, decode_cache="off")
    monkeypatch.setattr(driver, "build_graph", real)
    assert plan.stats["prefetch"]["mode"] == "routed"
    with fake_device(monkeypatch) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, chunk=1, progress=False)
        st = be.streamer
        E = st.fetches[0].pieces[0].n_experts
        for n in be.graph.by_op(Op.MOE_GROUPED_GEMM):
            offs = be.ctx.v(n.inputs[3])
            offs[:] = np.array([0, 128, 128, 256, 256][: E + 1], dtype=np.int32)
        be.run_chunk(np.array([3], dtype=np.int32))
        assert st.routed_counts
        f = st.fetches[-1]
        buf = np.asarray(st.slot_buffers[f.slot])
        routed = [0, 2]
        for p in f.pieces:
            eb = p.src_e
            raw = gf.raw(p.name)
            for e in routed:
                if p.first <= e < p.end:     # this fetch's experts (before the first: resident)
                    at = p.slot_offset + (e - p.first) * eb
                    assert np.array_equal(buf[at:at + eb], raw[e * eb:(e + 1) * eb])
        first = {l: st.resident_experts(fs[0].pieces[0].name) for l, fs in st.by_layer.items()}
        assert {l: sum(e >= first[l] for e in routed) for l in st.routed_counts} == st.routed_counts
        copied = sum(c[1][2] for c in calls if c[0] == "runtime.memcpyAsync")
        assert copied == sum(p.src_e * sum(p.first <= e < p.end for e in routed) for f in st.fetches for p in f.pieces)
        assert any(type(x).__name__ == "HostStep" for x in be.launches)
        be.close()


def test_plan_for_another_budget_is_refused(tmp_path, monkeypatch):
    import ggfuse
    gf, plan, budget = streamed_plan("qwen35moe")
    path = tmp_path / "p.json"
    plan.save(str(path))
    with pytest.raises(PlanError, match=r"p\.json: plan was compiled with vram_budget=\d+, not \d+; recompile"):
        ggfuse.load(str(path), device="cpu", vram_budget=budget * 2)
    with pytest.raises(PlanError, match="chunk 16 needs a larger arena"):
        ggfuse.load(str(path), device="cpu", chunk=16)
    m = ggfuse.load(str(path), device="cpu", vram_budget=budget)   # the same budget is fine
    assert m.plan.stats["prefetch"]["budget_bytes"] == budget


def test_budget_too_small_names_the_file():
    path = fixture("qwen35moe", "q4_k_m")
    with pytest.raises(GGFuseError, match=r"q4_k_m\.gguf: --vram-budget .* too small.*minimum is"):
        compile_gguf(path, chunk=8, max_context=64, vram_budget=64 * 1024)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_host_gathered_embedding(arch, monkeypatch):
    """A plan that streams gathers the token embedding on the host: the table is never uploaded
    nor counted; each chunk's raw rows land in a compact device table that the lookup reads with
    an identity index, the main executor's and the sub-chunk executors' alike; and those rows
    dequantise to exactly the table's rows of the chunk's tokens (padding: token 0, as resident)."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize
    from ggfuse.compiler.gguf_file import GGUFFile
    from ggfuse.ir.ops import Op
    from ggfuse.passes.lower_cuda import HEAD_BLOCK_LEAN
    gf, plan, budget = streamed_plan(arch, chunk=32, sub_chunk_min=8)
    info = plan.stats["prefetch"]
    name = "token_embd.weight"
    assert info["embedding"] == "host-gathered" and info["embedding_tensor"] == name
    assert info["head_block"] == HEAD_BLOCK_LEAN
    t = gf.tensor(name)
    row_bytes = info["embedding_row_bytes"]
    full = compile_gguf(gf.path, chunk=32, gf=gf, max_context=64, sub_chunk_min=8).stats["prefetch"]["fixed_bytes"]
    fixed = info["fixed_bytes"]
    assert fixed["dense_weights"] == full["dense_weights"] - t.nbytes
    assert fixed["embedding_rows"] == 32 * (row_bytes + 4)
    table = gf.dequantize(name)
    with fake_device(monkeypatch) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, chunk=32, progress=False)
        emb = be.embedding
        assert emb is not None and emb.device_bytes() == fixed["embedding_rows"]
        assert be.weight(name, "rows")[0] is emb.dev and emb.dev.nbytes == 32 * row_bytes
        assert be.captures == [32, 16, 8, 1]
        rng = np.random.default_rng(1)
        for n in (32, 20, 5, 12):
            tokens = rng.integers(0, plan.hparams["n_vocab"], size=n).astype(np.int32)
            be.reset()
            be.run_chunk(tokens, "none")
            c = be.executor_for(n).chunk
            # the executor's lookup (bound on its first chunk; later chunks replay its graph)
            rows = [x[1].arguments for x in calls if x[0] == "dense.get_rows" and len(x[1].arguments["ids"]) == c]
            assert rows and all(b["raw"].data.ptr == emb.dev.data.ptr for b in rows)
            assert all(np.array_equal(np.asarray(b["ids"]), np.arange(c)) for b in rows)
            padded = np.zeros(c, np.int32)
            padded[:n] = tokens
            got = np.asarray(emb.dev[:c * row_bytes]).reshape(c, row_bytes)
            assert np.array_equal(got, gf.raw(name).reshape(-1, row_bytes)[padded])
            deq = dequantize(got, QT[t.type_name]).reshape(c, -1)
            assert np.array_equal(deq, table[padded])
        # the LM head's all-rows block is small under a budget, as the plan counted it
        head = plan.graph.by_op(Op.LM_HEAD)[0]
        assert head.meta["kernel"]["block_rows"] == HEAD_BLOCK_LEAN
        assert head.meta["workspace"]["32"]["block"] == HEAD_BLOCK_LEAN * plan.hparams["n_vocab"] * 4
        assert be.head_all.buf.shape == (HEAD_BLOCK_LEAN, plan.hparams["n_vocab"])
        be.reset()
        out = be.run_chunk(np.arange(20, dtype=np.int32))
        assert out.shape == (20, plan.hparams["n_vocab"])
        with pytest.raises(GGFuseError, match="outside the vocabulary"):
            be.stage_inputs(np.array([plan.hparams["n_vocab"]], dtype=np.int32))
        be.close()
    # an unlimited plan keeps the table on the device
    assert "embedding" not in compile_gguf(gf.path, chunk=32, gf=gf, max_context=64).stats["prefetch"]


def test_context_of_a_short_prompt_under_a_budget(monkeypatch):
    """`ggfuse bench --vram-budget` compiles each prompt with its own context: a prompt shorter
    than the chunk gets a KV cache smaller than the chunk; the backend binds and runs it through
    the sub-chunk executor that holds it."""
    from ggfuse.passes.lower_cuda import capture_sizes, context_for
    gf = GGUFFile(fixture("qwen35moe", "q4_k_m"))
    ctx = context_for(10, 64, capture_sizes(64, sub_chunk_min=8))
    assert ctx == 16
    full = compile_gguf(gf.path, chunk=64, gf=gf, max_context=ctx, sub_chunk_min=8)
    plan = compile_gguf(gf.path, chunk=64, gf=gf, max_context=ctx, sub_chunk_min=8,
                        vram_budget=tight_budget(full, layers=full.hparams["n_layer"] - 0.5))
    assert plan.stats["prefetch"]["streamed_layers"] and plan.stats["prefetch"]["max_context"] == 16
    with fake_device(monkeypatch):
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, chunk=64, progress=False)
        assert be.max_context == 16 and be.states and all(
            a.shape[0] == 16 for k, a in be.states.items() if "k_cache" in k)
        out = be.run_chunk(np.arange(10, dtype=np.int32), "last")
        assert out.shape == (1, plan.hparams["n_vocab"]) and be.n_past == 10
        be.close()
