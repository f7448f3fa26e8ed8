"""The prompt-prefix cache: a request resumes from the state after the longest prefix of its
tokens that an earlier request left behind, and prefills only the rest.

A recurrent or sliding-window state cannot be rolled back to an earlier position, so the cache
keeps snapshots of the whole state at boundaries: after every prefill chunk and after a
generation's last fed token (runtime/snapshot.py). They form a tree of token prefixes: each
node holds the KV rows of its own segment only (the tokens since its parent) and the other
states whole, so a conversation's KV rows are kept once however many boundaries it has, and
conversations that share a system prompt share its nodes. Restoring node N copies the rows of
every node from the root to N and N's other states into the backend.

Budget: the bytes of every snapshot (device or host memory, as chosen), least recently used
evicted first. A node with children keeps its rows (its children need them) and gives up only
its other states; a leaf goes whole. The next token needs the logits of the prompt's last
token: a node at the end of a prompt or of an answer keeps that row (host memory), so a prompt
that is all cached there (the same question again) is answered without a prefill; elsewhere a
restore leaves at least one token to feed.

The cache never changes an answer beyond floating-point rounding: the restored state is the
state an earlier run computed for the same tokens, and the rest of the prompt is prefilled
from there; only where chunks begin differs from a cold prefill (tests/test_prefix_cache.py
checks tokens and logits on every architecture).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ggfuse.errors import GGFuseError
from ggfuse.runtime.snapshot import StateSnapshot


def _nbytes(a) -> int:
    return 0 if a is None else int(a.nbytes)


@dataclass(eq=False)
class _Node:
    n: int                               # position: the tokens from the root to here
    tokens: list                         # this node's segment: tokens [parent.n, n)
    parent: "_Node | None"
    snap: StateSnapshot | None           # rows [parent.n, n) and (unless dropped) the whole state
    logits: object = None                # the logits after token n-1 [n_vocab] (host), where known
    children: list = field(default_factory=list)
    used: int = 0                        # the cache's clock at the last insert or restore

    @property
    def nbytes(self) -> int:
        return self.snap.nbytes + _nbytes(self.logits)


@dataclass
class CacheStats:
    hits: int = 0            # restores from a cached boundary
    misses: int = 0          # prompts that started cold
    cached_tokens: int = 0   # prompt tokens restored instead of prefilled, over all requests
    inserts: int = 0
    evictions: int = 0       # leaves removed, and inner nodes' states and logits given up


class PrefixCache:
    """Snapshots of a model's state at token-prefix boundaries, under an LRU byte budget.

        cache = PrefixCache(budget=4 << 30, where="device")
        m.generate(prompt_ids, 64, cache=cache)      # or Generation(..., cache=cache)

    where: "host" or "device" (the backend's memory; the cpu backend has host memory only)."""

    def __init__(self, budget: int, where: str = "host"):
        from ggfuse.runtime.snapshot import WHERE
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"cache budget must be a byte count >= 0, got {budget!r}")
        if where not in WHERE:
            raise ValueError(f"cache memory must be one of {WHERE}, got {where!r}")
        self.budget = budget
        self.where = where
        self.root = _Node(0, [], None, None)
        self.nbytes = 0
        self.stats = CacheStats()
        self._clock = 0

    # ---- the walk ------------------------------------------------------------------------------
    def _child_through(self, node: _Node, ids, limit: int):
        """The child of `node` whose whole segment matches ids and ends at or before `limit`."""
        for c in node.children:
            if c.n <= limit and ids[node.n:c.n] == c.tokens:
                return c
        return None

    def _path(self, ids, limit: int) -> list[_Node]:
        """Nodes from the root along ids, each ending at or before limit."""
        path = [self.root]
        while (c := self._child_through(path[-1], ids, limit)) is not None:
            path.append(c)
        return path

    def nodes(self) -> list[_Node]:
        out, todo = [], list(self.root.children)
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children)
        return out

    def _tick(self, node: _Node) -> None:
        self._clock += 1
        node.used = self._clock

    # ---- restore -------------------------------------------------------------------------------
    def restore(self, model, ids):
        """Put the model in the state after the longest cached prefix of ids: all of ids where
        the logits after them are kept, else one that leaves at least one token to feed.
        Returns (its length, those logits or None); (0, None): nothing cached, the model reset."""
        ids = list(ids)
        path = self._path(ids, len(ids))
        while len(path) > 1 and (path[-1].snap.whole is None or (path[-1].n == len(ids) and path[-1].logits is None)):
            path.pop()
        if len(path) == 1:
            model.reset()
            self.stats.misses += 1
            return 0, None
        target = path[-1]
        model.backend.restore([n.snap for n in path[1:]])
        self._tick(target)
        self.stats.hits += 1
        self.stats.cached_tokens += target.n
        return target.n, (target.logits.copy() if target.n == len(ids) else None)

    # ---- insert --------------------------------------------------------------------------------
    def insert(self, model, ids, logits=None) -> None:
        """Keep the model's state now; ids are the tokens it holds (len(ids) == n_past). logits:
        the row after the last of them [n_vocab], kept with it."""
        ids = list(ids)
        n = len(ids)
        if self.budget == 0 or n == 0:
            return
        if n != model.n_past:
            raise ValueError(f"insert: {n} tokens given for a state of {model.n_past} positions")
        path = self._path(ids, n)
        node = path[-1]
        try:
            if node.n == n:                      # this prefix is cached already
                if node.snap.whole is None:      # an inner node that gave its state up: take it again
                    node.snap.whole = model.backend.snapshot(n, self.where).whole
                    self.nbytes += node.snap.whole_bytes
                if logits is not None and node.logits is None:
                    node.logits = np.array(logits, dtype=np.float32).reshape(-1)
                    self.nbytes += node.logits.nbytes
                self._tick(node)
                self._evict()
                return
            inner = next((c for c in node.children if ids[node.n:n] == c.tokens[:n - node.n]), None)
            if inner is not None:
                # n falls inside a child's segment: cut it there, the new node between them
                snap = model.backend.snapshot(n, self.where)
                head = inner.snap.split_rows(n)
                snap.start, snap.rows = head.start, head.rows
                new = _Node(n, ids[node.n:n], node, snap, children=[inner])
                inner.tokens = inner.tokens[n - node.n:]
                inner.parent = new
                node.children[node.children.index(inner)] = new
            else:
                new = _Node(n, ids[node.n:n], node, model.backend.snapshot(node.n, self.where))
                node.children.append(new)
        except MemoryError:
            # no memory for the copy (a device cache on a full GPU): go on without this boundary
            return
        if logits is not None:
            new.logits = np.array(logits, dtype=np.float32).reshape(-1)
        self.nbytes += new.snap.whole_bytes + (new.snap.row_bytes if inner is None else 0) + _nbytes(new.logits)
        self.stats.inserts += 1
        self._tick(new)
        self._evict()

    # ---- budget --------------------------------------------------------------------------------
    def _evict(self) -> None:
        while self.nbytes > self.budget:
            # an inner node gives up its state and logits (its rows serve its children); a state
            # of no bytes (a model with KV caches only) stays: it costs nothing to keep
            candidates = [n for n in self.nodes()
                          if not n.children or n.snap.whole_bytes > 0 or n.logits is not None]
            if not candidates:
                return
            victim = min(candidates, key=lambda n: n.used)
            self.stats.evictions += 1
            if victim.children:
                self.nbytes -= victim.snap.whole_bytes + _nbytes(victim.logits)
                victim.logits = None
                if victim.snap.whole_bytes > 0:
                    victim.snap.whole = None
                continue
            self._remove(victim)

    def _remove(self, node: _Node) -> None:
        """Remove a leaf, and the stateless leaves that leaves above it."""
        while node is not self.root and not node.children:
            node.parent.children.remove(node)
            self.nbytes -= node.nbytes
            parent = node.parent
            node.parent = node.snap = None
            if parent.snap is not None and parent.snap.whole is not None:
                break
            node = parent

    def clear(self) -> None:
        self.root = _Node(0, [], None, None)
        self.nbytes = 0

    def summary(self) -> dict:
        nodes = self.nodes()
        return {"budget_bytes": self.budget, "bytes": self.nbytes, "memory": self.where, "nodes": len(nodes),
                "states": sum(n.snap.whole is not None for n in nodes), "hits": self.stats.hits,
                "misses": self.stats.misses, "cached_tokens": self.stats.cached_tokens,
                "inserts": self.stats.inserts, "evictions": self.stats.evictions}

    # ---- the prefill that uses it --------------------------------------------------------------
    def prefill(self, model, ids, on_chunk=None, marks=()):
        """Restore the longest cached prefix of ids, prefill the rest chunk by chunk (keeping a
        snapshot after each chunk, and at each position in `marks`: where a chat's messages end,
        before the prompt for the answer, which the next turn renders differently), and return
        (logits of the last position [n_vocab], the number of tokens restored). on_chunk(n_past)
        is called after each chunk's snapshot."""
        ids = list(ids)
        start, logits = self.restore(model, ids)
        if logits is not None:
            return logits, start

        def at_boundary(n_past):
            self.insert(model, ids[:n_past])
            if on_chunk is not None:
                on_chunk(n_past)

        def run(start):
            cuts = sorted({int(m) for m in marks if start < m < len(ids)}) + [len(ids)]
            at = start
            for cut in cuts:
                out = model.prefill(ids[at:cut], logits="last", on_chunk=at_boundary)
                at = cut
            return out[-1]

        try:
            logits = run(start)
        except GGFuseError:
            if start == 0:
                raise
            # a device pads a prompt's last chunk to a size it captured: resumed near the end of
            # the context, that chunk can overrun the KV cache where a prefill from 0 does not
            self.stats.hits -= 1
            self.stats.misses += 1
            self.stats.cached_tokens -= start
            model.reset()
            start = 0
            logits = run(0)
        self.insert(model, ids, logits=logits)     # the prompt's end node: its logits join it
        return logits, start
