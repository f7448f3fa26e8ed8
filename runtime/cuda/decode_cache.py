"""The decode expert cache: a budgeted plan's one-token step without streaming every expert.

The plan (passes/plan_decode_cache.py) gives the cache slots (one expert of one layer each,
carved from memory idle while decoding), the policy and the split points: after each streamed
layer's router the step stops for a host step that
1. reads the token's k routed experts (a sync on the compute stream: every earlier launch, and so
   every earlier reader of any slot, has finished),
2. looks the streamed ones up (ExpertCachePolicy: a hit stays, a miss gets a slot, evicting the
   least recently used expert that this token does not need),
3. issues the misses as one batch of async copies on the copy stream (GGUF bytes straight from
   the page-locked mapping, or through a pinned staging buffer), then the layer's patched expert
   tables (expert -> device address: resident experts where they were uploaded, cached ones in
   their slot; one copy), and records one event that the compute stream waits for before the layer's
   grouped GEMM, which reads its experts through those tables.
A prefill chunk overwrites the prefill slots and the arena the cache lives in, so running one
empties the cache (the tables need no change: an expert is looked up before it is read).

ExpertCachePolicy is plain Python (tests drive it directly); DecodeExpertCache binds it to a
backend (tests/fake_cupy.py runs it on the CPU).
"""
from __future__ import annotations

import collections
import time

import numpy as np

from ggfuse.errors import GGFuseError, PlanError

H2D, D2H = 1, 2


class ExpertCachePolicy:
    """Which (layer, expert) sits in which of `n_slots` slots. "lru": one recency list.
    "slru" (segmented LRU): a new expert enters the probation segment; a hit there moves it to
    the protected segment (at most `protected` slots; its least recent entry drops back to
    probation), so experts hit more than once are not pushed out by a run of one-off misses.
    Eviction takes probation's least recent entry, else protected's, never one the current
    request needs. Frequencies of every expert looked up are counted (hottest())."""

    def __init__(self, n_slots: int, policy: str = "slru", protected: int = 0):
        if policy not in ("lru", "slru"):
            raise ValueError(f"expert cache policy must be lru or slru, not {policy!r}")
        if n_slots <= 0:
            raise ValueError("an expert cache needs at least one slot")
        self.n_slots, self.policy = int(n_slots), policy
        self.protected_cap = min(int(protected), self.n_slots - 1) if policy == "slru" else 0
        self.freq = collections.Counter()
        self.hits = self.misses = self.evictions = 0
        self.clear()

    def clear(self) -> None:
        """Empty every slot (the counts of hits, misses and frequencies stay)."""
        self.probation = collections.OrderedDict()    # key -> slot, least recent first
        self.protected = collections.OrderedDict()
        self.free = list(range(self.n_slots - 1, -1, -1))   # pop() gives slot 0 first

    def __contains__(self, key) -> bool:
        return key in self.probation or key in self.protected

    def slot_of(self, key):
        return self.probation.get(key, self.protected.get(key))

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def lookup(self, layer: int, experts) -> tuple[list, list]:
        """A token's streamed experts of one layer: (hits [(expert, slot)], misses [(expert,
        slot, evicted key or None)]); after it every expert has its slot. More distinct experts
        than slots is an error (the plan gives at least k slots)."""
        want = list(dict.fromkeys(int(e) for e in experts))
        if len(want) > self.n_slots:
            raise GGFuseError(None, f"decode cache: {len(want)} experts of layer {layer} at once, but only "
                                    f"{self.n_slots} slots")
        keys = {(layer, e) for e in want}
        hits, missing = [], []
        for e in want:
            key = (layer, e)
            self.freq[key] += 1
            if key in self.protected:
                self.protected.move_to_end(key)
                hits.append((e, self.protected[key]))
            elif key in self.probation:
                slot = self.probation.pop(key) if self.policy == "slru" else self.probation[key]
                if self.policy == "slru":
                    self._protect(key, slot, keep=keys)
                else:
                    self.probation.move_to_end(key)
                hits.append((e, slot))
            else:
                missing.append(e)
        misses = []
        for e in missing:
            slot, victim = self._take(keys)
            self.probation[(layer, e)] = slot
            misses.append((e, slot, victim))
        self.hits += len(hits)
        self.misses += len(misses)
        return hits, misses

    def _protect(self, key, slot, keep) -> None:
        if self.protected_cap <= 0:
            self.probation[key] = slot
            return
        self.protected[key] = slot
        while len(self.protected) > self.protected_cap:
            old, s = self.protected.popitem(last=False)
            self.probation[old] = s            # back to probation, most recent there

    def _take(self, keep) -> tuple[int, tuple | None]:
        if self.free:
            return self.free.pop(), None
        for seg in (self.probation, self.protected):
            for key in seg:
                if key not in keep:
                    slot = seg.pop(key)
                    self.evictions += 1
                    return slot, key
        raise GGFuseError(None, "decode cache: every slot holds an expert this token needs")

    def hottest(self, n: int = 8) -> list:
        return self.freq.most_common(n)


class _Layer:
    """One streamed layer's side of the cache: its record in the plan, the routing value, the
    expert addresses per tensor and the device tables with their pinned host mirrors."""

    def __init__(self, rec: dict):
        self.rec = rec
        self.layer = int(rec["layer"])
        self.E = int(rec["n_experts"])
        self.first = int(rec["first_streamed"])
        self.tensors = rec["tensors"]
        self.roles = {t["role"]: t for t in self.tensors}
        self.ptrs = {}            # role -> numpy uint64 [E]
        self.tab = self.tab_gu = self.tab_d = None     # device [3E]: gate_up [2E] then down [E]
        self.up_offset = 0
        self.src = None           # registered host mode: per tensor (offset in a slot, file address, bytes)
        self.done = None          # the event the layer's copies record


class DecodeExpertCache:
    """The plan's decode cache bound to a backend (one per backend; the one-token executor uses
    it). Counts per token: routed experts, hits (resident or cached), misses, bytes copied."""

    def __init__(self, be, info: dict):
        self.be, self.cp, self.info = be, be.cp, info
        self.slot_bytes = int(info["slot_bytes"])
        self.chunk = int(info.get("decode_chunk", 1))
        self.policy = ExpertCachePolicy(int(info["slots"]), info["policy"], int(info.get("protected_slots", 0)))
        self.layers = {r["experts"]: _Layer(r) for r in info["layers"]}
        self.by_layer = {l.layer: l for l in self.layers.values()}
        self.order = [r["layer"] for r in info["layers"]]
        self.stats = collections.Counter()
        self._staging = None
        self._staged_done = None
        self._ids_host = None        # pinned: the router's ids read back without a pageable copy
        self._entries = None         # the plan's weight entries by name (built once: the host step is per layer)

    # ---- memory -------------------------------------------------------------------------------
    def spare_bytes(self) -> int:
        """The device bytes this cache allocates itself (its slots in the unused budget)."""
        return sum(r["slots"] for r in self.info["regions"] if r["kind"] == "spare_budget") * self.slot_bytes

    def allocate(self) -> None:
        """Carve the slots from their regions (the prefill slots, the arena above the one-token
        layout, a new buffer for the spare budget), exactly as the plan did, and set every
        layer's resident expert addresses."""
        from ggfuse.kernels.moe.table import ExpertTable, strided
        from ggfuse.passes.plan_decode_cache import carve
        cp, be = self.cp, self.be
        st = be.streamer
        regions = self.info["regions"]
        offsets = carve([r["bytes"] for r in regions], self.slot_bytes, self.policy.n_slots)
        peak = int(be.graph.meta["memory"]["by_chunk"][str(self.chunk)]["peak_bytes"])
        from ggfuse.passes.schedule_expert_prefetch import align_up
        bases, prefill_slot, self._keep = [], 0, []
        for r, offs in zip(regions, offsets):
            if r["kind"] == "prefill_slot":      # the plan lists one region per prefill slot
                buf = st.slot_buffers[prefill_slot] if offs else None
                prefill_slot += 1
            elif not offs:
                continue
            elif r["kind"] == "arena_tail":
                buf = be.arena[align_up(peak):]
            elif r["kind"] == "spare_budget":
                buf = cp.empty(len(offs) * self.slot_bytes, dtype=cp.uint8)
            else:
                raise PlanError(None, f"decode cache: unknown memory region {r['kind']!r}; recompile the plan")
            if not offs:
                continue
            if len(offs) * self.slot_bytes > buf.nbytes:
                raise PlanError(None, f"decode cache: region {r['kind']} has {buf.nbytes} bytes, the plan carves "
                                      f"{len(offs) * self.slot_bytes}; recompile the plan")
            self._keep.append(buf)
            bases += [buf.data.ptr + o for o in offs]
        self.slot_addr = np.array(bases, dtype=np.uint64)
        if self.slot_addr.size != self.policy.n_slots:
            raise PlanError(None, f"decode cache: {self.slot_addr.size} slots carved, the plan says "
                                  f"{self.policy.n_slots}; recompile the plan")
        for lay in self.layers.values():
            for t in lay.tensors:
                p = np.full(lay.E, self.slot_addr[0] + np.uint64(t["offset"]), dtype=np.uint64)
                if lay.first:
                    w = be.buf.weights.get((t["name"], "raw")) or be.buf.weights.get((t["name"], "bf16"))
                    arr = w[0] if w is not None else None
                    if isinstance(arr, ExpertTable):
                        p[:lay.first] = arr.ptrs[:lay.first]
                    else:
                        part = be.buf.parts[t["name"]]
                        p[:lay.first] = strided(part.data.ptr, lay.first, t["expert_bytes"])
                lay.ptrs[t["role"]] = p

    # ---- the tables the grouped GEMM reads at the decode chunk ----------------------------------
    def tables(self, gemm_name: str, up_offset: int):
        """(gate_up [2E], down [E]) device tables of a streamed layer's grouped GEMM. Built
        before any capture; the host steps rewrite their contents, never their address."""
        lay = self.layers.get(gemm_name)
        if lay is None:
            raise PlanError(None, f"decode cache: {gemm_name} reads decode tables but the plan's cache has no "
                                  f"such layer; recompile the plan")
        if lay.tab_gu is None:
            cp = self.cp
            E = lay.E
            lay.up_offset = int(up_offset)
            # both tables in one array (and one pinned mirror): a patch is one copy
            lay.host = self._pinned(3 * E)
            lay.host_gu, lay.host_d = lay.host[:2 * E], lay.host[2 * E:]
            self._fill_host(lay, range(E))
            lay.tab = cp.empty(3 * E, dtype=np.uint64)
            lay.tab.set(lay.host)
            lay.tab_gu, lay.tab_d = lay.tab[:2 * E], lay.tab[2 * E:]
        return lay.tab_gu, lay.tab_d

    def _pinned(self, n: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(n * 8)
        self._keep.append(mem)
        return np.frombuffer(mem, dtype=np.uint64, count=n)

    def _fill_host(self, lay: _Layer, experts) -> None:
        E = lay.E
        for e in experts:
            if "gate_up" in lay.ptrs:
                g = lay.ptrs["gate_up"][e]
                lay.host_gu[e], lay.host_gu[E + e] = g, g + np.uint64(lay.up_offset)
            else:
                lay.host_gu[e], lay.host_gu[E + e] = lay.ptrs["gate"][e], lay.ptrs["up"][e]
            lay.host_d[e] = lay.ptrs["down"][e]

    # ---- the host step after a streamed layer's router ------------------------------------------
    def step(self, ctx, layer: int):
        """The host step of `layer` in the one-token executor `ctx.be` (a HostStep)."""
        from ggfuse.runtime.cuda.streaming import HostStep
        lay = self.by_layer[layer]
        route = next(n for n in ctx.g.topo() if n.name == lay.rec["route"])
        ids = lay.ids = ctx.v(route.value(0))      # the router's [1, k] expert ids on the device
        first_layer = layer == self.order[0]
        return HostStep(lambda: self._run(lay, ids, first_layer), f"decode cache lookup of layer {layer}")

    def _run(self, lay: _Layer, ids_dev, first_layer: bool) -> None:
        cp, be = self.cp, self.be
        s, c = be.stream, be.copy_stream
        rt = cp.cuda.runtime
        if self._ids_host is None or self._ids_host.size < ids_dev.size:
            self._ids_host = self._pinned(ids_dev.size).view(np.int32)[:ids_dev.size]
        host = self._ids_host[:ids_dev.size]
        t0 = time.perf_counter()
        rt.memcpyAsync(host.ctypes.data, ids_dev.data.ptr, host.nbytes, D2H, s.ptr)
        s.synchronize()          # the routing is known, and every earlier slot reader has run
        t1 = time.perf_counter()
        try:
            self._lookup_and_copy(lay, host, first_layer)
        finally:
            t2 = time.perf_counter()
            self.stats["wait_s"] += t1 - t0       # the device finishing the layer's router
            self.stats["host_s"] += t2 - t1       # lookup and issuing the copies: the host's own time

    def _lookup_and_copy(self, lay: _Layer, host: np.ndarray, first_layer: bool) -> None:
        cp, be = self.cp, self.be
        s, c = be.stream, be.copy_stream
        rt = cp.cuda.runtime
        experts = sorted({int(e) for e in host})
        streamed = [e for e in experts if e >= lay.first]
        st = self.stats
        st["tokens"] += int(first_layer)
        st["routed"] += len(experts)
        st["resident"] += len(experts) - len(streamed)
        if not streamed:
            return
        hits, misses = self.policy.lookup(lay.layer, streamed)
        st["cache_hits"] += len(hits)
        st["misses"] += len(misses)
        if not misses:
            return
        copies = self._copies(lay, misses)
        for e, slot, _ in misses:
            for t in lay.tensors:
                lay.ptrs[t["role"]][e] = self.slot_addr[slot] + np.uint64(t["offset"])
        self._fill_host(lay, [e for e, _, _ in misses])
        for dst, src, n in copies:
            rt.memcpyAsync(dst, src, n, H2D, c.ptr)
        rt.memcpyAsync(lay.tab.data.ptr, lay.host.ctypes.data, lay.host.nbytes, H2D, c.ptr)
        done = lay.done
        if done is None:            # one event per layer, re-recorded each token (a wait takes the record before it)
            done = lay.done = cp.cuda.Event(disable_timing=True)
        done.record(c)
        s.wait_event(done)
        self._staged_done = done
        st["bytes"] += sum(n for _, _, n in copies)
        st["table_bytes"] += lay.host.nbytes
        st["copies"] += len(copies)

    def _copies(self, lay: _Layer, misses) -> list:
        """(device address, host address, bytes) of each missed expert's tensors: from the
        page-locked GGUF mapping, or through a pinned staging buffer (bf16 converted there)."""
        st = self.be.streamer
        gf = self.be.gf
        if self._entries is None:
            self._entries = {w.name: w for w in self.be.plan.weights}
        entries = self._entries
        if st.host_mode == "registered":
            if lay.src is None:
                lay.src = [(int(t["offset"]), st.file_base + int(entries[t["name"]].offset), int(t["src_expert_bytes"]))
                           for t in lay.tensors]
            return [(int(self.slot_addr[slot]) + off, base + e * n, n)
                    for e, slot, _ in misses for off, base, n in lay.src]
        need = len(misses) * self.slot_bytes
        if self._staged_done is not None:
            self._staged_done.synchronize()      # the buffer's previous batch has landed
        if self._staging is None or self._staging[1].size < need:
            # a layer misses at most k experts: one buffer of k slots serves every batch
            mem = self.cp.cuda.alloc_pinned_memory(max(need, self.slot_bytes * max(r["k"] for r in self.info["layers"])))
            self._staging = (mem, np.frombuffer(mem, dtype=np.uint8))
        buf = self._staging[1]
        out = []
        for i, (e, slot, _) in enumerate(misses):
            for t in lay.tensors:
                at = i * self.slot_bytes + t["offset"]
                dst = buf[at:at + t["expert_bytes"]]
                raw = gf.raw(t["name"])
                src = raw[e * t["src_expert_bytes"]:(e + 1) * t["src_expert_bytes"]]
                w = entries[t["name"]]
                if t["expert_bytes"] != t["src_expert_bytes"]:     # F32 / F16 experts read as bf16
                    from ggfuse.kernels.dequant.ref import f32_to_bf16_bits
                    dt = np.float32 if w.ggml_type == "F32" else np.float16
                    dst.view(np.uint16)[:] = f32_to_bf16_bits(src.view(dt).astype(np.float32))
                else:
                    dst[:] = src
                out.append((int(self.slot_addr[slot]) + t["offset"], buf.ctypes.data + at, t["expert_bytes"]))
        return out

    def invalidate(self) -> None:
        """A chunk of more than one token is about to overwrite the slots' memory."""
        if len(self.policy):
            self.stats["invalidations"] += 1
        self.policy.clear()

    def report(self) -> dict:
        """Hit rate and bytes moved per decoded token since the counts were last reset. hit_rate:
        the share of the experts the streamed layers' routers chose that were on the device
        (resident, or cached); cache_hit_rate: of the streamed ones, those cached; the layers
        whose experts are all resident never miss and are not counted."""
        st = self.stats
        tokens = max(st["tokens"], 1)
        routed = st["routed"]
        look = st["cache_hits"] + st["misses"]
        return {"policy": self.policy.policy, "slots": self.policy.n_slots, "slot_bytes": self.slot_bytes,
                "tokens": st["tokens"], "routed_experts_per_token": routed / tokens,
                "hit_rate": (routed - st["misses"]) / routed if routed else 1.0,
                "cache_hit_rate": st["cache_hits"] / look if look else 1.0,
                "misses_per_token": st["misses"] / tokens, "bytes_per_token": st["bytes"] / tokens,
                "table_bytes_per_token": st["table_bytes"] / tokens,
                "streaming_bytes_per_token": int(self.info.get("bytes_per_token_all", 0)),
                "host_ms_per_token": st["host_s"] * 1e3 / tokens, "sync_wait_ms_per_token": st["wait_s"] * 1e3 / tokens,
                "invalidations": st["invalidations"], "layers": len(self.layers),
                "hottest": [[layer, e, n] for (layer, e), n in self.policy.hottest(8)]}

    def reset_stats(self) -> None:
        self.stats = collections.Counter()
