"""The prompt-prefix cache (runtime/prefix_cache.py) and the backends' snapshot()/restore().

- The tree on a counting backend (its state is a function of the tokens, so a restored state
  can be checked exactly): longest boundary, splits, shared prefixes, the LRU budget.
- Parity on every architecture (util.MODELS: a fixture listed there joins): a greedy multi-turn
  conversation gives the same tokens and logits with the cache as without it, on the CPU.
- The CUDA backend's snapshots on the CPU (tests/fake_cupy.py): only the KV rows in use are
  copied, device or host, and restore puts every state back in place.
The same conversation on the GPU: tests/test_gpu_prefix_cache.py."""
import numpy as np
import pytest

import ggfuse
from ggfuse.errors import GGFuseError
from ggfuse.runtime import generate as generate_module
from ggfuse.runtime.generate import Generation
from ggfuse.runtime.sampling import Sampler
from ggfuse.runtime.prefix_cache import PrefixCache
from ggfuse.runtime.snapshot import StateSnapshot, positional_states
from util import ARCHS, MODELS, fixture

# ---- a backend whose state is a function of its tokens ------------------------------------------


class CountingBackend:
    """Positional state "kv": one row per token (the id and its position); whole state "sum":
    the running sum and count. Logits: a row that depends on every token so far."""
    name = "counting"

    def __init__(self, n_logits=4):
        self.n_logits = n_logits
        self.chunks = []     # (n_past before, tokens) of every chunk run
        self.reset()

    def reset(self):
        self.kv = np.zeros((0, 2), np.float32)
        self.sum = np.zeros(2, np.float64)
        self.n_past = 0

    def run_chunk(self, tokens, want="all"):
        tokens = np.asarray(tokens)
        self.chunks.append((self.n_past, tokens.tolist()))
        pos = self.n_past + np.arange(len(tokens))
        self.kv = np.concatenate([self.kv, np.stack([tokens, pos], 1).astype(np.float32)])
        self.sum = self.sum + [tokens.sum(), len(tokens)]
        self.n_past += len(tokens)
        row = np.zeros((1, self.n_logits), np.float32)
        row[0, int(self.sum[0] * 7 + self.sum[1]) % self.n_logits] = 1
        return None if want == "none" else row

    def snapshot(self, start=0, where="host"):
        return StateSnapshot(start, self.n_past, {"kv": self.kv[start:].copy()}, {"sum": self.sum.copy()}, where)

    def restore(self, pieces):
        from ggfuse.runtime.snapshot import check_chain
        check_chain(pieces)
        self.kv = np.concatenate([p.rows["kv"] for p in pieces])
        self.sum = pieces[-1].whole["sum"].copy()
        self.n_past = pieces[-1].stop

    def state_of(self, tokens):
        """The state a cold run of `tokens` ends in."""
        t = np.asarray(tokens)
        return np.stack([t, np.arange(len(t))], 1).astype(np.float32), np.array([t.sum(), len(t)], np.float64)


class CountingModel:
    def __init__(self, chunk=4):
        self.backend = CountingBackend()
        self.chunk = chunk

    n_past = property(lambda self: self.backend.n_past)

    def reset(self):
        self.backend.reset()

    def prefill(self, ids, logits="all", on_chunk=None):   # Model.prefill's chunking
        from ggfuse.runtime.api import Model
        return Model.prefill(self, ids, logits, on_chunk)

    n_vocab = 200
    gguf = None


def _check_state(model, tokens):
    kv, s = model.backend.state_of(tokens)
    np.testing.assert_array_equal(model.backend.kv, kv)
    np.testing.assert_array_equal(model.backend.sum, s)
    assert model.n_past == len(tokens)


def test_restore_resumes_from_the_longest_boundary_and_leaves_a_token_to_feed():
    m, cache = CountingModel(chunk=4), PrefixCache(1 << 20)
    a = list(range(1, 11))                              # boundaries at 4, 8, 10
    cache.prefill(m, a)
    assert sorted(n.n for n in cache.nodes()) == [4, 8, 10]
    m.backend.chunks.clear()
    logits, start = cache.prefill(m, a + [20, 21, 22])
    assert start == 10 and m.backend.chunks == [(10, [20, 21, 22])]
    _check_state(m, a + [20, 21, 22])
    m.reset()
    cold = m.prefill(a, logits="last")[-1]
    m.backend.chunks.clear()
    logits, start = cache.prefill(m, a)                 # all cached, with its logits: nothing to run
    assert start == 10 and m.backend.chunks == []
    np.testing.assert_array_equal(logits, cold)
    _check_state(m, a)
    _, start = cache.prefill(m, a[:8])                  # a chunk boundary keeps no logits: resume at 4
    assert start == 4 and m.backend.chunks == [(4, a[4:8])]
    _check_state(m, a[:8])
    _, start = cache.prefill(m, a[:6] + [99, 98])       # parts from a inside [4, 8): resume at 4
    assert start == 4
    _check_state(m, a[:6] + [99, 98])
    _, start = cache.prefill(m, [5, 6, 7])
    assert start == 0 and cache.stats.misses == 2
    assert cache.stats.hits == 4 and cache.stats.cached_tokens == 28


def test_rows_are_kept_once_along_a_prefix_and_shared_by_branches():
    m, cache = CountingModel(chunk=4), PrefixCache(1 << 20)
    cache.prefill(m, list(range(1, 9)))
    cache.prefill(m, list(range(1, 5)) + [50, 51, 52, 53])    # shares the node at 4
    nodes = {n.n: n for n in cache.nodes()}
    assert len(cache.nodes()) == 3 and len(nodes[4].children) == 2
    assert all(n.snap.rows["kv"].shape[0] == 4 for n in cache.nodes())   # each its own segment
    assert cache.nbytes == sum(n.nbytes for n in cache.nodes())


def test_a_boundary_inside_a_cached_segment_splits_it():
    m, cache = CountingModel(chunk=8), PrefixCache(1 << 20)
    a = list(range(1, 9))
    cache.prefill(m, a)                       # one node at 8
    m.reset()
    m.prefill(a[:5])
    cache.insert(m, a[:5])                    # 5 falls inside [0, 8)
    (five,) = cache.root.children
    assert five.n == 5 and [c.n for c in five.children] == [8]
    assert five.snap.rows["kv"].shape[0] == 5 and five.children[0].snap.rows["kv"].shape[0] == 3
    assert cache.nbytes == sum(n.nbytes for n in cache.nodes())
    for want in (a + [30], a[:5] + [31, 32]):
        _, start = cache.prefill(m, want)
        assert start == (8 if len(want) == 9 else 5)
        _check_state(m, want)


def test_the_budget_evicts_least_recently_used_states_first_and_keeps_rows_that_children_need():
    m = CountingModel(chunk=4)
    one = CountingBackend()
    one.run_chunk(np.arange(4))
    row_bytes, state_bytes = one.snapshot().row_bytes // 4, one.snapshot().whole_bytes
    logit_bytes = 4 * one.n_logits      # a prompt's or an answer's end keeps the logits after it
    # room for the rows of 17 tokens and two states with their logits
    cache = PrefixCache(17 * row_bytes + 2 * (state_bytes + logit_bytes))
    cache.prefill(m, list(range(1, 13)))                      # boundaries 4, 8, 12
    assert len(cache.nodes()) == 3 and cache.stats.evictions == 0
    cache.prefill(m, list(range(1, 13)) + [7, 7, 7, 7, 8])    # 16 and 17 join
    assert cache.nbytes <= cache.budget and cache.stats.evictions == 3
    assert sorted(n.n for n in cache.nodes()) == [4, 8, 12, 16, 17]          # rows: all kept
    assert sorted(n.n for n in cache.nodes() if n.snap.whole is not None) == [16, 17]
    assert cache.nbytes == sum(n.nbytes for n in cache.nodes())
    _, start = cache.prefill(m, list(range(1, 13)) + [7, 7, 7, 7, 8, 9])
    assert start == 17
    _check_state(m, list(range(1, 13)) + [7, 7, 7, 7, 8, 9])
    # the node at 4 has rows but no state: a prompt that parts there starts cold
    _, start = cache.prefill(m, [1, 2, 3, 4, 0, 0])
    assert start == 0
    _check_state(m, [1, 2, 3, 4, 0, 0])
    assert cache.nbytes <= cache.budget
    # a smaller budget: the other branch goes, leaf first, and the stateless nodes above it
    cache.budget = 6 * row_bytes + state_bytes + logit_bytes
    cache.insert(m, [1, 2, 3, 4, 0, 0])
    assert {n.n: n.snap.whole is not None for n in cache.nodes()} == {4: False, 6: True}
    # below one chain: nothing is left
    cache.budget = 5 * row_bytes
    cache.insert(m, [1, 2, 3, 4, 0, 0])
    assert cache.nodes() == [] and cache.nbytes == 0


def test_budget_zero_keeps_nothing_and_a_leaf_larger_than_the_budget_is_dropped():
    m = CountingModel(chunk=4)
    off = PrefixCache(0)
    off.prefill(m, list(range(10)))
    assert off.nodes() == [] and off.nbytes == 0
    tiny = PrefixCache(10)
    tiny.prefill(m, list(range(10)))
    assert tiny.nodes() == [] and tiny.nbytes == 0
    _, start = tiny.prefill(m, list(range(10)))
    assert start == 0
    _check_state(m, list(range(10)))


def test_a_resume_the_device_cannot_run_starts_over_cold():
    class Padded(CountingBackend):
        """Pads each chunk to 4 rows in a cache of 12, like a device with captured chunk sizes."""
        def run_chunk(self, tokens, want="all"):
            if self.n_past + 4 > 12:
                raise GGFuseError(None, "a 4-token chunk does not fit the KV cache")
            return super().run_chunk(tokens, want)

    m, cache = CountingModel(chunk=4), PrefixCache(1 << 20)
    m.backend = Padded()
    cache.prefill(m, list(range(1, 6)))             # nodes at 4 and 5
    _, start = cache.prefill(m, list(range(1, 12)))  # from 5: chunks at 5 and 9 (9 + 4 > 12)
    assert start == 0 and cache.stats.cached_tokens == 0
    _check_state(m, list(range(1, 12)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="memory"):
        PrefixCache(10, where="disk")
    m = CountingModel()
    m.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="3 positions"):
        PrefixCache(100).insert(m, [1, 2])


# ---- parity on every architecture ---------------------------------------------------------------


class RecordingSampler(Sampler):
    """The sampler generation uses, keeping every logits row it picks a token from."""
    rows: list = []

    def sample(self, logits, history=()):
        RecordingSampler.rows.append(np.array(logits, dtype=np.float32))
        return super().sample(logits, history)


def conversation(model, cache, turns, n_new, monkeypatch):
    """A greedy multi-turn conversation: each turn's prompt is the whole conversation so far (what a
    chat client sends) plus the turn's new ids. Returns per turn (new ids, the logits rows the
    tokens were picked from [k, vocab], tokens restored from the cache)."""
    monkeypatch.setattr(generate_module, "Sampler", RecordingSampler)
    out, seq = [], []
    for user in turns:
        seq = seq + list(user)
        RecordingSampler.rows = []
        gen = Generation(model, seq, n_new, cache=cache) if cache is not None else Generation(model, seq, n_new)
        ids = gen.ids()
        out.append((ids, np.stack(RecordingSampler.rows), gen.stats.n_cached))
        seq = seq + ids
    return out


def conversation_turns(n_vocab, seed=0):
    rng = np.random.default_rng(seed)
    # turn 1 spans chunks; an empty turn: the same conversation again (all of it cached, with
    # the logits after it); a turn of one new token
    return [rng.integers(1, n_vocab, 13).tolist(), rng.integers(1, n_vocab, 6).tolist(), [], [7],
            rng.integers(1, n_vocab, 9).tolist()]


def small_budget(cache) -> int:
    """A budget that evicts states along a conversation `cache` held whole: its KV rows fit (an
    inner node keeps its rows for its children: a budget under them keeps nothing to resume from,
    and a Gemma fixture's rows are most of its bytes), a quarter of the rest does."""
    rows = sum(n.snap.row_bytes for n in cache.nodes())
    return rows + (cache.nbytes - rows) // 4


def check_parity(model, cache, monkeypatch, n_new=4, tol=2e-5, seed=0, near_tie=0.0, cold=None):
    """The conversation with and without the cache: the same tokens, logits within tol (relative to
    the largest). Tokens may part only where the uncached top-2 logits are within near_tie (a
    rounding difference picks the other one); the conversations differ from there, so the
    comparison ends. cold: the uncached conversation, if already run. Returns (the tokens restored
    per turn, the uncached conversation)."""
    turns = conversation_turns(model.n_vocab, seed)
    cold = cold or conversation(model, None, turns, n_new, monkeypatch)
    warm = conversation(model, cache, turns, n_new, monkeypatch)
    cached = [w[2] for w in warm]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    for k, ((ids_c, rows_c, _), (ids_w, rows_w, _)) in enumerate(zip(cold, warm)):
        n = min(len(rows_c), len(rows_w))
        err = np.abs(rows_w[:n] - rows_c[:n]).max() / np.abs(rows_c).max()
        assert err <= tol, f"turn {k}: logits differ by {err:.3g} (relative) with the cache"
        if ids_w != ids_c:
            j = next((i for i, (a, b) in enumerate(zip(ids_w, ids_c)) if a != b), min(len(ids_w), len(ids_c)))
            top2 = np.sort(rows_c[j])[-2:]
            assert top2[1] - top2[0] < near_tie, (f"turn {k}, step {j}: {ids_w} with the cache, {ids_c} without "
                                                  f"(top-2 margin {top2[1] - top2[0]:.3g})")
            break
    return cached, cold


@pytest.mark.parametrize("arch", MODELS)
def test_cache_gives_the_same_tokens_and_logits_as_no_cache(arch, monkeypatch):
    m = ggfuse.load(fixture(arch), device="cpu", chunk=8)
    cache = PrefixCache(64 << 20)
    _, cold = check_parity(m, cache, monkeypatch)
    assert cache.stats.hits >= 4 and cache.nbytes <= cache.budget
    # a small budget: states evicted along the way, same answers
    small = PrefixCache(small_budget(cache))
    check_parity(m, small, monkeypatch, cold=cold)
    assert small.stats.evictions > 0 and small.nbytes <= small.budget


def test_cpu_snapshot_copies_only_the_rows_in_use():
    m = ggfuse.load(fixture("qwen35"), device="cpu", chunk=8)
    pos = positional_states(m.plan.graph)
    assert pos and all(m.plan.graph.states()[k].attrs.get("state") == "kv_cache" for k in pos)
    m.prefill(list(range(1, 12)))
    snap = m.backend.snapshot(start=5)
    assert {k: a.shape[0] for k, a in snap.rows.items()} == {k: 6 for k in pos}
    assert set(snap.whole) == set(m.plan.graph.states()) - pos
    before = {k: v.copy() for k, v in m.backend.state.items()}
    head = m.backend.snapshot(start=0)
    head.rows = {k: a[:5] for k, a in head.rows.items()}
    head.stop, head.whole = 5, None
    m.prefill([3, 3, 3])
    m.backend.restore([head, snap])
    assert m.n_past == 11
    for k, v in before.items():
        np.testing.assert_array_equal(m.backend.state[k], v)
    with pytest.raises(GGFuseError, match="do not chain"):
        m.backend.restore([snap])
    with pytest.raises(ValueError, match="host"):
        m.backend.snapshot(where="device")


def test_generation_with_a_cache_needs_the_whole_sequence():
    m = ggfuse.load(fixture("qwen35moe"), device="cpu")
    with pytest.raises(GGFuseError, match="whole sequence"):
        Generation(m, [1, 2, 3], 2, reset=False, cache=PrefixCache(1 << 20))


# ---- the CUDA backend's snapshots, on the CPU ---------------------------------------------------

@pytest.mark.parametrize("where", ["device", "host"])
@pytest.mark.parametrize("arch", ["qwen35", "qwen3moe"])
def test_cuda_snapshot_and_restore_with_fake_cupy(arch, where, monkeypatch):
    from fake_cupy import FakeArray, fake_device
    with fake_device(monkeypatch):
        from ggfuse.compiler.driver import compile_gguf
        from ggfuse.compiler.gguf_file import GGUFFile
        from ggfuse.runtime.cuda.backend import CUDABackend
        gf = GGUFFile(fixture(arch))
        plan = compile_gguf(gf.path, gf=gf, chunk=16, target="sm_90a", max_context=64)
        be = CUDABackend(plan, gf, progress=False)
        pos = positional_states(plan.graph)
        assert pos
        rng = np.random.default_rng(0)
        for a in be.states.values():    # kernels are stubs: give the states values to carry
            a[...] = rng.integers(0, 1000, a.shape).astype(a.dtype)
        be.run_chunk(np.arange(10, dtype=np.int32), "last")
        assert be.n_past == 10
        truth = {k: np.array(v) for k, v in be.states.items()}
        head, tail = be.snapshot(0, where), None
        head.rows = {k: a[:4].copy() for k, a in head.rows.items()}
        head.stop, head.whole = 4, None
        tail = be.snapshot(4, where)
        assert tail.where == where and (tail.start, tail.stop) == (4, 10)
        for k, a in tail.rows.items():              # KV caches: the rows in use only
            assert a.shape == (6,) + truth[k].shape[1:] and be.states[k].shape[0] == 64
            np.testing.assert_array_equal(a, truth[k][4:10])
            assert isinstance(a, FakeArray) == (where == "device")
        assert set(tail.whole) == set(be.states) - pos
        for k, a in tail.whole.items():
            assert a.shape == truth[k].shape and a.dtype == truth[k].dtype
        assert tail.nbytes == sum(truth[k][4:10].nbytes for k in pos) + sum(truth[k].nbytes for k in tail.whole)
        ptrs = {k: v.__array_interface__["data"][0] for k, v in be.states.items()}
        be.run_chunk(np.arange(5, dtype=np.int32), "none")
        for a in be.states.values():
            a[...] = 0
        be.restore([head, tail])
        assert be.n_past == 10
        for k, v in be.states.items():   # in place: the captured graphs read these buffers
            assert v.__array_interface__["data"][0] == ptrs[k]
            want = truth[k][:10] if k in pos else truth[k]
            np.testing.assert_array_equal(v[:10] if k in pos else v, want)
        # a cache on the fake device: the next chunk starts at the restored position
        cache = PrefixCache(1 << 24, where=where)

        class M:
            backend, chunk = be, 16
            n_past = property(lambda self: be.n_past)

            def reset(self):
                be.reset()

            def prefill(self, ids, logits="all", on_chunk=None):
                from ggfuse.runtime.api import Model
                return Model.prefill(self, ids, logits, on_chunk)
            n_vocab = plan.hparams["n_vocab"]
        m = M()
        cache.prefill(m, list(range(20)))
        _, start = cache.prefill(m, list(range(25)))
        assert start == 20 and be.n_past == 25
        with pytest.raises(ValueError, match="where"):
            be.snapshot(0, "disk")
