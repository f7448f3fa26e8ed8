"""plan_memory, segment_graphs and schedule_expert_prefetch on the real frontends."""
import numpy as np
import pytest

from ggfuse.compiler.driver import build_graph
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.errors import GGFuseError
from ggfuse.ir.ops import Op
from ggfuse.ir.verify import verify
from ggfuse.passes import plan_memory, schedule_expert_prefetch as sep, segment_graphs
from ggfuse.passes.pipeline import run_pipeline
from util import ARCHS, fixture, refs, rel_err, run_graph

MIB = 1 << 20


@pytest.mark.parametrize("target", ["cpu", "sm_90a"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 16, 512])
def test_plan_memory_places_without_overlap(arch, chunk, target):
    g, _ = run_pipeline(build_graph(GGUFFile(fixture(arch))), chunk=chunk, target=target,
                        skip=["plan_memory", "segment_graphs"])
    res = plan_memory.run(g, chunk=chunk)
    verify(res.graph)
    sizes = [int(c) for c in res.graph.meta["memory"]["by_chunk"]]
    assert sizes == (res.graph.meta["lowering"]["captures"] if target != "cpu" else [chunk])
    for c in sizes:
        key = str(c)
        intervals, alias = plan_memory.buffers(res.graph, c)
        offsets, peak = plan_memory.place(intervals)
        plan_memory.check_no_overlap(intervals, offsets)
        m = res.graph.meta["memory"]["by_chunk"][key]
        assert m["peak_bytes"] == peak <= m["naive_bytes"] and peak <= res.graph.meta["memory"]["arena_bytes"]
        if c >= 16:     # at one token the LM head's logits block is most of it
            assert m["peak_bytes"] < 0.5 * m["naive_bytes"]
        # workspace (lowered plans): each launch's declared bytes, placed, live at its own step
        for k, (first, last_, size) in intervals.items():
            if isinstance(k, tuple):
                _, nid, name = k
                n = res.graph.node(nid)
                assert size >= n.meta["workspace"][key][name] and n.meta["workspace_at"][key][name] == offsets[k]
        assert any(isinstance(k, tuple) for k in intervals) == (target != "cpu")
        # every non-weight, non-state value has an arena offset on its node; views share their source's
        logits = res.graph.outputs["logits"]
        head = res.graph.node(logits.node)
        assert "arena" not in head.meta            # the LM head writes into its workspace, after the chunk
        last = len(res.graph.topo())
        for v in head.inputs:                       # the LM head runs after the chunk: inputs stay live
            root = alias.get(v)
            if root in intervals:
                assert intervals[root][1] == last
        for n in res.graph.nodes():
            if n.op in (Op.WEIGHT, Op.INPUT, Op.KV_APPEND) or n.id == head.id:
                continue
            assert key in n.meta["arena"], n
            if plan_memory.is_view(n):
                src = res.graph.node(n.inputs[0].node)
                if "arena" in src.meta:
                    assert n.meta["arena"][key][0] == src.meta["arena"][key][n.inputs[0].index]
    assert "memory" not in g.meta or g.meta["memory"] is not res.graph.meta["memory"]


def test_plan_memory_detects_overlap():
    intervals = {"a": [0, 3, 256], "b": [2, 5, 256]}
    with pytest.raises(AssertionError, match="overlap"):
        plan_memory.check_no_overlap(intervals, {"a": 0, "b": 0})


@pytest.mark.parametrize("arch", ARCHS)
def test_everything_resident_is_one_segment(arch):
    g, _ = run_pipeline(build_graph(GGUFFile(fixture(arch))), chunk=16)
    assert len(g.meta["segments"]) == 1
    assert not g.by_op(Op.FETCH_WEIGHTS)
    assert {n.meta["segment"] for n in g.nodes()} == {0}


def _tight_budget(full, layers: float) -> int:
    """A budget that holds the fixed part and `layers` layers' experts (the runtime reserve is
    budget/16 for toy budgets, so solve for it)."""
    p = full.meta["prefetch"]
    # a plan that streams sheds the embedding table and most of the LM head block: its fixed part
    lean = sep.fixed_bytes(full, chunk=p["chunk"], max_context=p["max_context"], lean=True)
    fixed = sum(lean.values()) - lean["reserve"]
    per_layer = p["expert_bytes_total"] / full.meta["hparams"]["n_layer"]
    return int((fixed + layers * per_layer) * 16 / 15) + 1


def _budget_graph(arch, chunk, budget, max_context=64):
    g = build_graph(GGUFFile(fixture(arch, "q4_k_m")))
    return run_pipeline(g, chunk=chunk, vram_budget=budget, max_context=max_context)[0]


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3moe", "qwen3next"])
def test_budget_forces_streaming_and_keeps_the_numbers(arch):
    g0 = build_graph(GGUFFile(fixture(arch, "q4_k_m")))
    full, _ = run_pipeline(g0, chunk=8, max_context=64)
    # room for the fixed part and a bit over two layers of experts: some layers must stream
    budget = _tight_budget(full, layers=full.meta["hparams"]["n_layer"] - 0.5)
    g = _budget_graph(arch, 8, budget)
    info = g.meta["prefetch"]
    assert info["streamed_layers"], info
    assert info["resident_bytes"] <= info["budget_bytes"] == budget
    fetches = g.by_op(Op.FETCH_WEIGHTS)
    _check_fetch_pieces(g, info)
    order = {n.id: i for i, n in enumerate(g.topo())}
    for f in fetches:
        layer = f.attrs.layer
        # every streamed expert weight reaches its consumers only through the fetches
        for w in g.weights():
            if w.outputs[0].rank == 3 and w.attrs.tensor.startswith(f"blk.{layer}."):
                assert all(u.op == Op.FETCH_WEIGHTS for u in g.users(w.id))
        for i in range(len(f.outputs)):
            for u, _ in g.uses_of(f.value(i)):
                assert order[f.id] < order[u.id]
    # same logits as fully resident, through the prefetch plan
    gf = GGUFFile(fixture(arch, "q4_k_m"))
    tok = refs(arch)["tokens"]
    assert rel_err(run_graph(g, gf, tok, 8), run_graph(full, gf, tok, 8)) == 0.0


def _check_fetch_pieces(g, info):
    """A streamed layer's fetches: pieces_per_layer (or fewer, one per expert at most) chained
    fetches of contiguous expert ranges covering [E - m, E), m its streamed experts; fetch i of
    the chunk into slot i % slots; only the last one feeds the layer's expert consumers."""
    if not info["streamed_layers"]:
        assert not g.by_op(Op.FETCH_WEIGHTS)
        return
    E, k, slots = info["n_experts"], info["pieces_per_layer"], info["slots"]
    fetches = sorted(g.by_op(Op.FETCH_WEIGHTS), key=lambda f: (f.attrs.layer, f.attrs.first_expert))
    by_layer = {}
    for f in fetches:
        by_layer.setdefault(f.attrs.layer, []).append(f)
    assert sorted(by_layer) == info["streamed_layers"]
    i = 0
    for layer, fs in sorted(by_layer.items()):
        m = info["streamed_experts"][str(layer)]
        assert [f.attrs.end_expert - f.attrs.first_expert for f in fs] == sep.piece_sizes(m, k)
        assert fs[0].attrs.first_expert == E - m and fs[-1].attrs.end_expert == E
        assert all(a.attrs.end_expert == b.attrs.first_expert for a, b in zip(fs, fs[1:]))
        for a, b in zip(fs, fs[1:]):        # chained: b passes a's outputs on
            assert list(b.inputs[: b.attrs.n_weights]) == [a.value(j) for j in range(a.attrs.n_weights)]
        for f in fs:
            assert f.attrs.slot == i % slots
            i += 1
        assert all(u.op == Op.FETCH_WEIGHTS for f in fs[:-1] for j in range(len(f.outputs))
                   for u, _ in g.uses_of(f.value(j)))


def test_routed_fetch_splits_capture_segments():
    """Chunk of 1 token, top-2 of 4 experts: routing touches half the experts -> routed mode
    is not chosen (< half needed); with chunk 1 and top-1 it would be. Force it via hparams."""
    g0 = build_graph(GGUFFile(fixture("qwen35moe", "q4_k_m")))
    g0.meta["hparams"]["n_expert_used"] = 1
    full, _ = run_pipeline(g0, chunk=1, max_context=64, only=["fuse_moe", "schedule_expert_prefetch"])
    budget = _tight_budget(full, layers=2.2)
    g, _ = run_pipeline(g0, chunk=1, max_context=64, vram_budget=budget)
    info = g.meta["prefetch"]
    assert info["mode"] == "routed"
    assert len(g.meta["segments"]) == 1 + len(g.by_op(Op.FETCH_WEIGHTS))
    for f in g.by_op(Op.FETCH_WEIGHTS):
        assert any(g.type_of(v).dtype.value == "i32" for v in f.inputs[f.attrs.n_weights:])


def test_too_small_budget_says_the_minimum():
    with pytest.raises(GGFuseError, match="too small.*minimum is"):
        _budget_graph("qwen35moe", 8, 64 * 1024)


def test_larger_budget_never_moves_more():
    g0 = build_graph(GGUFFile(fixture("qwen35moe", "q4_k_m")))
    moved = []
    for budget in np.linspace(0.9, 1.6, 15) * MIB:
        try:
            g, _ = run_pipeline(g0, chunk=8, vram_budget=int(budget), max_context=64,
                                only=["fuse_moe", "schedule_expert_prefetch"])
        except GGFuseError:
            continue
        moved.append(g.meta["prefetch"]["bytes_moved_per_chunk"])
    assert len(moved) > 5 and moved[-1] == 0
    assert all(a >= b for a, b in zip(moved, moved[1:])), moved


def test_parse_bytes():
    assert sep.parse_bytes("12GiB") == 12 << 30
    assert sep.parse_bytes("12GB") == 12 * 10**9
    assert sep.parse_bytes("1.5MiB") == int(1.5 * MIB)
    assert sep.parse_bytes(1234) == 1234
    with pytest.raises(GGFuseError, match="size"):
        sep.parse_bytes("twelve")


@pytest.fixture(scope="module")
def real_35b(tmp_path_factory):
    """Qwen3.5-35B-A3B Q4_K_M at its real shapes: header and tensor table only (the data is a
    sparse hole), which is all the compiler needs to plan."""
    from ggfuse.compiler.synth import write_synth
    path = tmp_path_factory.mktemp("real") / "qwen3.5-35b-a3b-q4_k_m.gguf"
    write_synth("qwen3.5-35b-a3b", "q4_k_m", path, sparse=True, progress=False)
    gf = GGUFFile(str(path))
    return gf, build_graph(gf)


def test_real_35b_under_12gib(real_35b):
    gf, g0 = real_35b
    assert sum(t.nbytes for t in gf.tensors.values()) > 20e9
    moved = {}
    for gib in (12, 16, 24, 40):
        g, _ = run_pipeline(g0, chunk=2048, vram_budget=f"{gib}GiB", max_context=8192,
                            only=["fuse_moe", "rewrite_deltanet_chunked", "fuse_elementwise", "schedule_expert_prefetch"])
        p = g.meta["prefetch"]
        assert p["resident_bytes"] <= p["budget_bytes"] == gib << 30
        moved[gib] = p["bytes_moved_per_chunk"]
        fetches = g.by_op(Op.FETCH_WEIGHTS)
        _check_fetch_pieces(g, p)
        order = {n.id: i for i, n in enumerate(g.topo())}
        for f in fetches:
            users = [u for i in range(len(f.outputs)) for u, _ in g.uses_of(f.value(i))]
            assert users and all(u.op in (Op.MOE_GROUPED_GEMM, Op.FETCH_WEIGHTS) and order[f.id] < order[u.id]
                                 for u in users)
            # and the raw expert weights of a streamed layer feed nothing but its first fetch
            for v in f.inputs[: f.attrs.n_weights]:
                assert [u.op for u in g.users(v.node)] == [Op.FETCH_WEIGHTS]
        if gib == 12:
            # every layer but the first streams its last experts, in 2 pieces through 3 slots
            assert len(p["streamed_layers"]) == 39 and p["slots"] == p["pieces_per_layer"] + 1 == 3
            assert 0 < p["predicted"]["hidden_fraction"] <= 1
    assert moved[12] >= moved[16] >= moved[24] >= moved[40]
    assert moved[40] == 0


def test_real_35b_too_small_budget(real_35b):
    gf, g0 = real_35b
    with pytest.raises(GGFuseError, match="minimum is"):
        run_pipeline(g0, chunk=2048, vram_budget="2GiB", only=["fuse_moe", "schedule_expert_prefetch"])


def _split_use(expert_bytes, m, slots, pieces=1):
    """(resident expert bytes + slot bytes, moved bytes) of a split {layer: streamed experts}
    whose layers stream in `pieces` pieces."""
    E_res = sum((E_ - m.get(l, 0)) * sum(b) for l, b in expert_bytes.items() for E_ in [_E])
    slot = max((sep.slot_size(expert_bytes[l], -(-v // pieces)) for l, v in m.items() if v), default=0)
    moved = sum(v * sum(expert_bytes[l]) for l, v in m.items())
    return E_res + slots * slot, moved


_E = 3


def _brute_split(expert_bytes, avail, slots, pieces=1):
    """Least bytes moved over every split with `slots` slots of `pieces` pieces (None: none fits)."""
    import itertools
    ls = list(expert_bytes)
    best = None
    for ms in itertools.product(range(_E + 1), repeat=len(ls)):
        m = dict(zip(ls, ms))
        if not any(ms):
            continue
        used, moved = _split_use(expert_bytes, m, slots, pieces)
        if used <= avail and (best is None or moved < best):
            best = moved
    return best


@pytest.mark.parametrize("pieces", [1, 2])
def test_choose_split_against_brute_force(pieces):
    """Every split of a few small layers into resident / streamed experts: choose_split fits the
    room, uses pieces + 1 slots whenever such a split fits (else one, else none), and moves at
    most 1% (the price of keeping the first layer whole) and one expert's bytes more than the
    best split with its number of slots."""
    rng = np.random.default_rng(pieces)
    checked = 0
    for trial in range(40):
        n = int(rng.integers(2, 6))
        expert_bytes = {l: [int(x) for x in rng.integers(100, 900, size=int(rng.integers(1, 4)))] for l in range(n)}
        total = _E * sum(sum(b) for b in expert_bytes.values())
        for avail in rng.integers(0, total + 1, size=5):
            m, slots, s = sep.choose_split(expert_bytes, _E, int(avail), pieces)
            two = _brute_split(expert_bytes, int(avail), pieces + 1, pieces)
            one = _brute_split(expert_bytes, int(avail), 1)
            if m is None:
                assert two is None and one is None, (expert_bytes, avail)
                continue
            assert slots == (pieces + 1 if two is not None else 1), (expert_bytes, avail, slots)
            assert all(0 < v <= _E for v in m.values())
            used, moved = _split_use(expert_bytes, m, slots, pieces if slots > 1 else 1)
            k = pieces if slots > 1 else 1
            assert used <= avail and s == max(sep.slot_size(expert_bytes[l], -(-v // k)) for l, v in m.items())
            best = two if slots > 1 else one
            assert best <= moved <= 1.01 * best + max(sum(b) for b in expert_bytes.values()), (expert_bytes, avail, m)
            checked += 1
    assert checked > 80


def test_choose_split_at_35b_sizes():
    """Q4_K_M's mix (a Q6_K ffn_down_exps on some layers): a budget sweep never moves more than
    an expert more as the budget grows (with the same number of slots); at 2048-token room for experts (10.74 GB) two slots of
    under 0.25 GB, every layer but the first streaming its last experts, about 9.25 GB moved
    (whole-layer streaming moved 9.82 GB there); an expert per layer less than a whole layer's
    worth makes each slot a fraction of a layer."""
    E = 256
    q4, q6 = 151_000_000 // E, 220_200_000 // E
    eb = {l: [q4, q4, q6] if (l < 5 or l >= 35 or l % 3 == 2) else [q4, q4, q4] for l in range(40)}
    total = E * sum(sum(b) for b in eb.values())
    prev = {}
    for avail in np.linspace(0.3e9, total + 1e9, 90):
        m, slots, s = sep.choose_split(eb, E, int(avail))
        if m is None:
            assert not prev
            continue
        moved = sum(v * sum(eb[l]) for l, v in m.items())
        if slots in prev:     # (going from one slot to two moves a slot's bytes more, on purpose)
            assert moved <= prev[slots] + max(sum(b) for b in eb.values()), avail
        prev[slots if m else 2] = moved
        if slots == 2:
            prev.pop(1, None)
    assert prev[2] == 0 and sep.choose_split(eb, E, int(0.3e9))[0] is None
    m, slots, s = sep.choose_split(eb, E, int(10.739e9))
    moved = sum(v * sum(eb[l]) for l, v in m.items())
    assert slots == 2 and s < 0.25e9 and 0 not in m and len(m) == 39
    assert 9.2e9 < moved < 9.3e9
    assert E * sum(sum(b) for b in eb.values()) - moved + 2 * s <= 10.739e9


def test_budget_sheds_the_embedding_and_the_head_block_first():
    """Just under the all-resident size: the table is gathered on the host and the LM head block
    shrinks, which may be all it takes (no layer streams); an untied table only."""
    from ggfuse.passes.lower_cuda import HEAD_BLOCK, HEAD_BLOCK_LEAN
    g0 = build_graph(GGUFFile(fixture("qwen35moe", "q4_k_m")))
    opts = dict(chunk=256, max_context=256, target="sm_90a", dense_form="raw")
    full, _ = run_pipeline(g0, **opts)
    p = full.meta["prefetch"]
    total = p["resident_bytes"]
    # a budget that holds everything: today's resident plan
    g, _ = run_pipeline(g0, vram_budget=total * 16 // 15 + 16, **opts)
    assert g.meta["prefetch"]["policy"].startswith("all resident") and "embedding" not in g.meta["prefetch"]
    leaner = full.copy()
    sep.lean_head(leaner)                       # the small LM head block: a smaller arena
    lean = sep.fixed_bytes(leaner, chunk=256, max_context=256, lean=True)
    saved = sum(p["fixed_bytes"].values()) - sum(lean.values())
    assert saved > 0 and lean["arena"] <= p["fixed_bytes"]["arena"]   # the block only counts where it is the peak
    budget = int((total - p["fixed_bytes"]["reserve"] - saved / 2) * 16 / 15)
    g, _ = run_pipeline(g0, vram_budget=budget, **opts)
    q = g.meta["prefetch"]
    assert q["embedding"] == "host-gathered" and q["head_block"] == HEAD_BLOCK_LEAN < HEAD_BLOCK
    assert g.meta["weights"]["token_embd.weight"]["residency"] == "host-gathered"
    assert [n.meta["kernel"]["source"] for n in g.by_op(Op.GET_ROWS)] == ["host"]
    assert not q["streamed_layers"] and not g.by_op(Op.FETCH_WEIGHTS)
    assert q["resident_bytes"] <= budget and "token_embd.weight" not in str(q["fixed_bytes"])
    # a table the LM head also reads (tied) stays resident
    tied = build_graph(GGUFFile(fixture("qwen35moe", "q4_k_m")))
    head = next(n for n in tied.nodes() if n.op == Op.LM_HEAD)
    emb = next(w for w in tied.weights() if w.attrs.tensor == "token_embd.weight")
    tied.replace_node(head.id, inputs=(head.inputs[0], emb.out))
    assert sep.gathered_embedding(tied) is None


def test_simulate_pieces_and_the_spare_slot():
    """The planner's two-stream timeline by hand: layer 0 resident, layers 1 and 2 each streamed
    in two pieces of 2 ms (1 GB/s). Through 3 slots (pieces + 1) layer 2's first piece lands in
    the spare slot while layer 1 computes: 9 ms. Through 2 slots it waits for layer 1's MoE to
    free slot 0: 10 ms."""
    pre = {0: 0.1, 1: 0.1, 2: 0.1}
    moe = {0: 1.0, 1: 1.0, 2: 1.0}
    fetches = [(1, 2_000_000), (1, 2_000_000), (2, 2_000_000), (2, 2_000_000)]
    three = sep.simulate([0, 1, 2], fetches, 3, pre, moe, h2d_gbps=1.0, routed=False, tail_ms=0.5)
    assert three["chunk_ms"] == 9.5 and three["transfer_ms"] == 8.0
    assert three["hidden_fraction"] == round(1 - (2.8 + 2.9) / 8.0, 4)
    two = sep.simulate([0, 1, 2], fetches, 2, pre, moe, h2d_gbps=1.0, routed=False, tail_ms=0.5)
    assert two["chunk_ms"] == 10.5
    # routed: a fetch also waits for its own layer's routing (the end of the pre-MoE part)
    routed = sep.simulate([0, 1, 2], fetches, 3, pre, moe, h2d_gbps=1.0, routed=True)
    assert routed["chunk_ms"] == 1.2 + 4.0 + 1.0 + 0.1 + 4.0 + 1.0
    assert sep.piece_sizes(7, 3) == [3, 2, 2] and sep.piece_sizes(2, 4) == [1, 1] and sep.piece_sizes(0, 2) == []
