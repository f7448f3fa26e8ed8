"""Snapshots of a backend's carried state, for the prefix cache (runtime/prefix_cache.py).

A plan's states (graph.states()) are of two shapes:
- positional: the leading dimension is the symbol P, one row per position fed (KV caches,
  [P, H, D]); a snapshot holds only the rows in use, and may hold only rows [start, stop) when
  the rows before `start` are kept elsewhere (the cache keeps a conversation's rows once, along
  the tree of its prefixes);
- whole: every other state (a DeltaNet conv window [3, C] and recurrent state [H, K, V], a
  sliding-window ring of fixed size): its value at `stop` depends on every token before it, so
  a snapshot holds it whole.
Rules by shape, not by name or kind, so that a state kind a new architecture brings (Gemma's
sliding ring) is handled without a list to extend.

Both backends implement
    snapshot(start: int = 0, where: str = "host") -> StateSnapshot     # rows [start, n_past) + whole
    restore(pieces: list[StateSnapshot]) -> None                       # pieces cover [0, n) in order
where is "host" (numpy arrays) or "device" (the backend's own arrays, e.g. CuPy: device-to-device
copies); the cpu backend has host memory only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ggfuse.errors import GGFuseError

WHERE = ("host", "device")


def positional_states(graph) -> frozenset:
    """Names of the states with one row per position (leading dimension P)."""
    return frozenset(k for k, n in graph.states().items()
                     if n.outputs[0].shape and n.outputs[0].shape[0] == "P")


@dataclass
class StateSnapshot:
    """A backend's state at position `stop`: the positional rows [start, stop) and, unless
    dropped (None), every other state whole. Arrays live on the host (numpy) or the device."""
    start: int
    stop: int
    rows: dict
    whole: dict | None
    where: str = "host"

    @property
    def row_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.rows.values())

    @property
    def whole_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.whole.values()) if self.whole is not None else 0

    @property
    def nbytes(self) -> int:
        return self.row_bytes + self.whole_bytes

    def split_rows(self, at: int) -> "StateSnapshot":
        """Cut the rows at position `at`: returns the rows [start, at) as a rows-only snapshot and
        keeps [at, stop) (copies, so that the halves do not pin each other's memory)."""
        if not self.start < at < self.stop:
            raise GGFuseError(None, f"cannot split state rows [{self.start}, {self.stop}) at {at}")
        start, k = self.start, at - self.start
        head = {name: a[:k].copy() for name, a in self.rows.items()}
        self.rows = {name: a[k:].copy() for name, a in self.rows.items()}
        self.start = at
        return StateSnapshot(start, at, head, None, self.where)


def check_chain(pieces, what: str = "restore") -> None:
    """pieces must cover positions [0, n) in order, the last one with its whole state."""
    if not pieces:
        raise GGFuseError(None, f"{what}: no snapshot given")
    at = 0
    for p in pieces:
        if p.start != at or p.stop < p.start:
            raise GGFuseError(None, f"{what}: snapshots do not chain: rows [{p.start}, {p.stop}) after position {at}")
        at = p.stop
    if pieces[-1].whole is None:
        raise GGFuseError(None, f"{what}: the last snapshot (position {pieces[-1].stop}) has no state to restore")
