"""Which grouped-GEMM schedule the lowering records per captured chunk size (kernels/moe/launch.py
pick_schedule): the few-rows kernels (moe/grouped_small.cu) for few rows per expert on both
paths, the wgmma tiles beyond on sm_90a, both halves of a layer agreeing, and a forced schedule the
kernels cannot take a one-line error naming the node."""
import pytest

from ggfuse.compiler.driver import compile_gguf
from ggfuse.errors import GGFuseError
from ggfuse.kernels.moe import launch as moe
from util import fixture


def test_pick_schedule_rules():
    E, k = 256, 8
    # either impl: small up to SMALL_MAX_ROWS rows per expert on average, tiles beyond
    few = moe.SMALL_MAX_ROWS * E // k
    assert moe.pick_schedule(None, "q4_k", "bf16", few, k, E, K=2048, N=512, row_step=16) == "small"
    assert moe.pick_schedule(None, "q4_k", "bf16", 64, k, E, K=2048, N=512, row_step=16) == "small"
    assert moe.pick_schedule(None, "q4_k", "bf16", few + 1, k, E, K=2048, N=512, row_step=16) != "small"
    # wgmma beyond: persist, wide from WIDE_MIN_ROWS (GGML weights, bf16 activations only)
    assert moe.pick_schedule(None, "q4_k", "bf16", few + 1, k, E, K=2048, N=512, row_step=16) == "persist"
    assert moe.pick_schedule(None, "q4_k", "bf16", 4096, k, E) == "wide"
    assert moe.pick_schedule(None, "bf16", "bf16", 4096, k, E) == "persist"
    assert moe.tile_schedule(None, "q4_k", "bf16", 64, k, E) == "persist"
    with pytest.raises(ValueError, match="tile schedule"):
        moe.tile_schedule("small", "q4_k", "bf16", 64, k, E)
    # types and shapes the few-rows kernels do not take keep the tiles
    assert moe.pick_schedule(None, "q4_k", "bf16", 64, k, E, K=2048, N=520, row_step=16) != "small"
    assert moe.pick_schedule(None, "q4_k", "bf16", 64, k, E, K=2040, N=512, row_step=16) != "small"
    with pytest.raises(ValueError, match="schedule small"):
        moe.pick_schedule("small", "q4_k", "bf16", 64, k, E, K=2048, N=520, row_step=16)
    with pytest.raises(ValueError, match="schedule must be one of"):
        moe.pick_schedule("tiny", "q4_k", "bf16", 64, k, E)


def _schedules(plan):
    out = {}
    for n in plan.graph.nodes():
        rec = n.meta.get("kernel") or {}
        if rec.get("name") == "moe.grouped":
            for c, at in rec["by_chunk"].items():
                if "schedule_gate_up" in at:
                    out[int(c)] = (at["schedule_gate_up"], at["schedule_down"])
    return out


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3moe"])
def test_lowering_records_small_for_few_rows_on_both_paths(arch):
    path = fixture(arch, "q4_k_m")
    for target in ("sm_89", "sm_90a"):
        got = _schedules(compile_gguf(path, chunk=16, target=target, max_context=64))
        assert got, target
        for c, (gu, dn) in got.items():
            assert (gu == "small") == (dn == "small"), "both halves small or neither"
        assert any(gu == "small" for gu, _ in got.values()), target
    # a forced tile schedule stays a tile schedule at every size
    forced = _schedules(compile_gguf(path, chunk=16, target="sm_90a", max_context=64, moe_schedule="persist"))
    assert forced and all(s == ("persist", "persist") for s in forced.values())


def test_forced_small_on_sm90_and_bad_schedule():
    path = fixture("qwen35moe", "q4_k_m")
    forced = _schedules(compile_gguf(path, chunk=16, target="sm_90a", max_context=64, moe_schedule="small"))
    assert forced and all(s == ("small", "small") for s in forced.values())
    with pytest.raises(GGFuseError, match="moe_schedule"):
        compile_gguf(path, chunk=16, target="sm_90a", max_context=64, moe_schedule="tiny")


def test_smallq_is_only_chosen_by_the_option():
    path = fixture("qwen35moe", "q4_k_m")
    for target in ("sm_89", "sm_90a"):
        auto = _schedules(compile_gguf(path, chunk=16, target=target, max_context=64))
        assert all("smallq" not in s for s in auto.values())
        forced = _schedules(compile_gguf(path, chunk=16, target=target, max_context=64, moe_schedule="smallq"))
        assert forced and all(s == ("smallq", "smallq") for s in forced.values())
    assert set(moe.SMALLQ_TYPES) <= set(moe.GEMV_TYPES)
