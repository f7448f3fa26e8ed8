"""The decode expert cache of a budgeted plan, on the CPU: the policy (LRU / segmented LRU, never
evicting what the token needs), the plan's record (slots carved from idle memory, the split
points after the streamed layers' routers, the grouped GEMMs reading decode tables), and the
CUDA host logic on the fake device (tests/fake_cupy.py: device memory is host memory, so the
copies really land): one batch of copies per layer with misses, the tables point at the GGUF's
bytes of every routed expert, a prefill empties the cache, the counts add up. The logits on the
device: tests/test_gpu_decode.py::test_decode_under_a_budget_matches_resident."""
import ctypes

import numpy as np
import pytest

from fake_cupy import fake_device
from ggfuse.errors import GGFuseError
from ggfuse.ir.ops import Op
from ggfuse.options import Options
from ggfuse.passes.plan_decode_cache import carve
from ggfuse.runtime.cuda.decode_cache import ExpertCachePolicy
from test_cuda_streaming import streamed_plan


# ---- the policy ---------------------------------------------------------------------------------

def test_lru_evicts_the_least_recent_and_never_the_current_token():
    p = ExpertCachePolicy(3, "lru")
    assert p.lookup(0, [1, 2]) == ([], [(1, 0, None), (2, 1, None)])
    assert p.lookup(1, [5]) == ([], [(5, 2, None)])
    hits, misses = p.lookup(0, [2, 7])         # 2 is a hit (now most recent); 7 evicts (0, 1)
    assert hits == [(2, 1)] and misses == [(7, 0, (0, 1))]
    hits, misses = p.lookup(1, [5, 8, 9])      # two misses evict layer 0's two least recent
    assert hits == [(5, 2)] and sorted(m[2] for m in misses) == [(0, 2), (0, 7)]
    assert (p.hits, p.misses, p.evictions) == (2, 6, 3)
    # the current token's experts are never evicted, even when they are the least recent
    p = ExpertCachePolicy(2, "lru")
    p.lookup(0, [1])
    p.lookup(0, [2])
    hits, misses = p.lookup(0, [1, 3])
    assert hits == [(1, 0)] and misses == [(3, 1, (0, 2))]


def test_more_experts_than_slots_is_an_error():
    with pytest.raises(GGFuseError, match="3 experts of layer 4 at once, but only 2 slots"):
        ExpertCachePolicy(2).lookup(4, [1, 2, 3])


def test_slru_keeps_experts_hit_twice_through_a_run_of_one_offs():
    p = ExpertCachePolicy(4, "slru", protected=2)
    p.lookup(0, [0])
    p.lookup(0, [0])                  # a second hit: protected
    assert (0, 0) in p.protected
    for e in range(10, 30):           # a scan of one-off experts
        p.lookup(1, [e])
    assert (0, 0) in p and p.slot_of((0, 0)) == 0
    lru = ExpertCachePolicy(4, "lru")
    lru.lookup(0, [0])
    lru.lookup(0, [0])
    for e in range(10, 30):
        lru.lookup(1, [e])
    assert (0, 0) not in lru
    # the protected segment is bounded: its least recent entry drops back to probation
    p = ExpertCachePolicy(4, "slru", protected=1)
    for e in (1, 1, 2, 2):
        p.lookup(0, [e])
    assert list(p.protected) == [(0, 2)] and (0, 1) in p.probation
    assert p.hottest(1) == [((0, 1), 2)] or p.hottest(1) == [((0, 2), 2)]


def test_clear_keeps_counts_and_frees_every_slot():
    p = ExpertCachePolicy(2, "slru", protected=1)
    p.lookup(0, [1, 2])
    p.clear()
    assert len(p) == 0 and p.misses == 2 and p.freq[(0, 1)] == 1
    assert p.lookup(0, [3]) == ([], [(3, 0, None)])


def test_carve_fills_regions_in_order_up_to_the_limit():
    assert carve([100, 0, 250], 50) == [[0, 50], [], [0, 50, 100, 150, 200]]
    assert carve([100, 0, 250], 50, limit=3) == [[0, 50], [], [0]]


@pytest.mark.parametrize("kw,what", [({"decode_cache": "fifo"}, "decode_cache"),
                                     ({"decode_cache_protected": 1.5}, "decode_cache_protected"),
                                     ({"decode_cache_protected": "x"}, "decode_cache_protected"),
                                     ({"decode_cache_slots": 0}, "decode_cache_slots")])
def test_decode_cache_options_are_validated(kw, what):
    with pytest.raises(GGFuseError, match=f"option {what}"):
        Options.make(**kw)
    assert Options.make(decode_cache_protected="0.25").decode_cache_protected == 0.25


# ---- the plan -----------------------------------------------------------------------------------

@pytest.mark.parametrize("room", ["split", "whole"])
def test_plan_records_the_decode_cache(room):
    gf, plan, budget = streamed_plan("qwen35moe", room=room)
    dc = plan.graph.meta["decode_cache"]
    pre = plan.stats["prefetch"]
    assert plan.stats["decode_cache"] == dc
    assert dc["policy"] == "slru" and dc["slots"] >= 2 and dc["cold_experts"] == "copy"
    assert dc["protected_slots"] == int(dc["slots"] * 0.8)
    assert [l["layer"] for l in dc["layers"]] == pre["streamed_layers"]
    routes = {n.name: n for n in plan.graph.by_op(Op.MOE_ROUTE)}
    assert dc["split_points"] == [l["route"] for l in dc["layers"]] and set(dc["split_points"]) <= set(routes)
    for l in dc["layers"]:
        assert l["n_experts"] - l["first_streamed"] == pre["streamed_experts"][str(l["layer"])]
        assert sorted(t["role"] for t in l["tensors"]) == ["down", "gate", "up"]
        assert max(t["offset"] + t["expert_bytes"] for t in l["tensors"]) <= dc["slot_bytes"]
    gemms = [n for n in plan.graph.by_op(Op.MOE_GROUPED_GEMM) if n.meta["kernel"].get("decode_tables")]
    assert sorted(n.name for n in gemms) == sorted(l["experts"] for l in dc["layers"])
    assert sum(r["slots"] for r in dc["regions"]) == dc["slots"]
    assert [r["kind"] for r in dc["regions"]] == ["prefill_slot"] * pre["slots"] + ["arena_tail", "spare_budget"]
    assert dc["regions"][-1]["bytes"] == budget - pre["resident_bytes"]     # never over the budget
    assert dc["bytes_per_token_all"] == sum(
        (l["n_experts"] - l["first_streamed"]) * sum(t["src_expert_bytes"] for t in l["tensors"])
        for l in dc["layers"])


def test_plan_without_decode_cache():
    gf, plan, _ = streamed_plan("qwen35moe", decode_cache="off")
    assert "decode_cache" not in plan.graph.meta
    assert not any(n.meta["kernel"].get("decode_tables") for n in plan.graph.by_op(Op.MOE_GROUPED_GEMM))
    gf, plan, _ = streamed_plan("qwen35moe", decode=False)
    assert "decode_cache" not in plan.graph.meta
    gf, plan, _ = streamed_plan("qwen35moe", decode_cache_slots=1)     # fewer slots than k experts
    dc = plan.graph.meta["decode_cache"]
    assert dc["policy"] == "off" and dc["slots"] == 0 and "fewer than the 2 streamed experts" in dc["why"]
    assert not any(n.meta["kernel"].get("decode_tables") for n in plan.graph.by_op(Op.MOE_GROUPED_GEMM))


# ---- the host logic on the fake device ----------------------------------------------------------

def _bytes_at(addr: int, n: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * n).from_address(int(addr)), dtype=np.uint8).copy()


def _check_tables(be, gf, routed: dict):
    """Every routed expert's gate, up and down address in the decode tables holds its GGUF bytes."""
    dc = be.decode_cache
    for layer, experts in routed.items():
        lay = dc.by_layer[layer]
        E = lay.E
        gu, d = np.asarray(lay.tab_gu), np.asarray(lay.tab_d)
        for e in experts:
            for role, addr in (("gate", gu[e]), ("up", gu[E + e]), ("down", d[e])):
                t = lay.roles[role]
                want = gf.raw(t["name"])[e * t["src_expert_bytes"]:(e + 1) * t["src_expert_bytes"]]
                assert np.array_equal(_bytes_at(addr, want.size), want), (layer, e, role)


@pytest.mark.parametrize("arch,room,stream_host", [("qwen35moe", "split", "auto"), ("qwen35moe", "whole", "auto"),
                                                   ("qwen35moe", "split", "staged"), ("qwen3moe", "split", "auto"),
                                                   ("qwen3next", "split", "auto"), ("qwen3next", "whole", "staged")])
def test_decode_steps_copy_misses_in_one_batch(arch, room, stream_host, monkeypatch):
    gf, plan, _ = streamed_plan(arch, room=room)
    rng = np.random.default_rng(0)
    with fake_device(monkeypatch) as calls:
        from ggfuse.runtime.cuda.backend import CUDABackend
        be = CUDABackend(plan, gf, progress=False, options=Options.make(stream_host=stream_host))
        dc = be.decode_cache
        assert dc is not None and dc.policy.n_slots == plan.graph.meta["decode_cache"]["slots"]
        be.run_chunk(np.arange(8), "none")
        ex = be.executor_for(1)
        assert ex.decode_cache is dc and set(dc.by_layer) == set(plan.stats["prefetch"]["streamed_layers"])
        k = dc.info["layers"][0]["k"]
        lookups = 0
        routed, checked = {}, []
        run = dc._run

        def run_and_check(lay, ids, first_layer):
            # what the layer's grouped GEMM reads, right after its host step (a later layer of
            # the same token may evict these experts again: its GEMM has run by then)
            # the router's output (the layers' ids share arena bytes at chunk 1: set them here)
            ids[...] = np.array(routed[lay.layer], dtype=np.int32).reshape(ids.shape)
            run(lay, ids, first_layer)
            _check_tables(be, gf, {lay.layer: routed[lay.layer]})
            checked.append(lay.layer)
        monkeypatch.setattr(dc, "_run", run_and_check)
        for step in range(6):
            for layer, lay in dc.by_layer.items():
                ids = rng.choice(lay.E, size=k, replace=False) if step % 3 else np.arange(lay.E - k, lay.E)
                routed[layer] = [int(e) for e in ids]
            mark = len(calls)
            be.run_chunk(np.array([step]), "last")
            new = calls[mark:]
            # no prefill fetch copies whole layers: every copy is one expert's tensor or a table
            sizes = {t["src_expert_bytes"] for l in dc.info["layers"] for t in l["tensors"]}
            copies = [c for c in new if c[0] == "runtime.memcpyAsync" and c[1][3] == 1]     # host -> device
            reads = [c for c in new if c[0] == "runtime.memcpyAsync" and c[1][3] == 2]
            # the routing read back once per streamed layer, k ids, on the compute stream
            assert [c[1][2] for c in reads] == [4 * k] * len(dc.by_layer)
            assert all(c[1][4] == be.stream.ptr for c in reads)
            tables = {lay.tab.nbytes for lay in dc.by_layer.values()}
            assert all(c[1][2] in sizes | tables for c in copies)
            assert all(c[1][4] == be.copy_stream.ptr for c in copies)
            # per layer with misses: its copies back to back, one event on the copy stream, the
            # compute stream waits for it
            recs = [i for i, c in enumerate(new) if c[0] == "event.record" and c[1][1] is be.copy_stream]
            for i in recs:
                assert new[i + 1][0] == "stream.wait_event" and new[i + 1][1] == (be.stream, new[i][1][0])
                # the experts' copies, then the layer's patched tables (one copy) last
                assert new[i - 1][0] == new[i - 2][0] == "runtime.memcpyAsync"
                assert new[i - 1][1][2] in tables and new[i - 2][1][2] in sizes
            assert checked[-len(dc.by_layer):] == sorted(dc.by_layer)
            for layer, experts in routed.items():
                lookups += sum(e >= dc.by_layer[layer].first for e in experts)
        rep = be.decode_cache_report()
        assert rep["tokens"] == 6 and rep["routed_experts_per_token"] == k * len(dc.by_layer)
        assert dc.stats["cache_hits"] + dc.stats["misses"] == lookups
        assert 0 <= rep["hit_rate"] <= 1 and rep["bytes_per_token"] > 0
        assert rep["bytes_per_token"] < rep["streaming_bytes_per_token"]
        if room == "split" and arch == "qwen35moe":
            # 4 slots for 5 streamed experts: step 3 routes as step 0 did, and hits (a cache
            # smaller than a token's streamed experts, "whole", cycles through LRU with no hit)
            assert dc.stats["cache_hits"] > 0 and rep["hit_rate"] > 0
        # a prefill chunk overwrites the slots: the cache empties
        be.run_chunk(np.arange(8), "none")
        assert len(dc.policy) == 0 and dc.stats["invalidations"] == 1
        # the decode executor's experts (the one-token gemvs, option decode_moe) read the decode tables
        tabs = {lay.tab_d.data.ptr for lay in dc.by_layer.values()}
        downs = [c[1].arguments for c in calls if c[0] == "moe.moe_gemv_down"]
        dec = [b for b in downs if b.get("wtab") is not None and b["wtab"].data.ptr in tabs]
        assert len(dec) == 2 * len(dc.by_layer)       # the eager step, and the capture
        # the one-token step is captured as graphs between the layers' host steps
        from ggfuse.runtime.cuda.streaming import SegmentedProgram
        body = ex.graphs["body"]
        assert isinstance(body, SegmentedProgram) and body.n_graphs == len(dc.by_layer) + 1


def test_generation_stats_report_the_cache(monkeypatch):
    from ggfuse.runtime.generate import GenerationStats, expert_cache_text
    st = GenerationStats(n_prompt=3, n_new=2, finish="length",
                         expert_cache={"tokens": 4, "hit_rate": 0.875, "cache_hit_rate": 0.5,
                                       "bytes_per_token": 12.5e6})
    assert st.line().endswith("; experts on the device 88% (cache 50%), 12.5 MB moved/token")
    assert expert_cache_text(None) == "" and GenerationStats().line().endswith("stopped: )")
