"""The cpu device: executes a plan's graph chunk by chunk with the numpy reference ops.

It is the correctness baseline for all GPU work and runs in CI.
"""
from __future__ import annotations

import numpy as np

from ggfuse.ir.interpret import interpret
from ggfuse.ir.types import shape_eval
from ggfuse.runtime.snapshot import StateSnapshot, check_chain, positional_states
from ggfuse.runtime.weights import WeightStore


class CPUBackend:
    name = "cpu"

    def __init__(self, plan, gf):
        self.plan = plan
        self.graph = plan.graph
        self.weights = WeightStore(gf)
        self.state_inputs = self.graph.states()
        self.input_names = set(self.graph.inputs())
        self.positional = positional_states(self.graph)
        self.order = self.graph.topo()      # the plan's graph is final: one order for every chunk
        self.reset()

    def reset(self) -> None:
        env = {"P": 0, "T": 0}
        self.state = {k: np.zeros(shape_eval(n.outputs[0].shape, env), dtype=np.float32)
                      for k, n in self.state_inputs.items()}
        self.n_past = 0

    def run_chunk(self, tokens: np.ndarray, want: str = "all") -> np.ndarray:
        T = int(tokens.shape[0])
        env = {"T": T, "P": self.n_past}
        feeds = dict(self.state)
        feeds["tokens"] = tokens.astype(np.int32)
        feeds["positions"] = (self.n_past + np.arange(T)).astype(np.int32)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        out = interpret(self.graph, feeds, self.weights, env, order=self.order)
        for k in self.state_inputs:
            self.state[k] = out[k]
        self.n_past += T
        if want == "none":
            return None
        return out["logits"][-1:] if want == "last" else out["logits"]

    # ---- snapshots (runtime/snapshot.py): the prefix cache's side of the state -------------------
    def snapshot(self, start: int = 0, where: str = "host") -> StateSnapshot:
        """The state now: positional rows [start, n_past) and every other state whole (copies)."""
        if where != "host":
            raise ValueError(f"the cpu backend keeps snapshots in host memory, not {where!r}")
        if not 0 <= start <= self.n_past:
            raise ValueError(f"snapshot start {start} is outside 0..{self.n_past}")
        rows = {k: self.state[k][start:self.n_past].copy() for k in self.positional}
        whole = {k: v.copy() for k, v in self.state.items() if k not in self.positional}
        return StateSnapshot(start, self.n_past, rows, whole, "host")

    def restore(self, pieces) -> None:
        """Put back the state of a chain of snapshots covering positions [0, n) (the rows of
        each, the whole state of the last)."""
        check_chain(pieces)
        for k in self.positional:
            self.state[k] = np.concatenate([p.rows[k] for p in pieces], axis=0)
        for k, v in pieces[-1].whole.items():
            self.state[k] = v.copy()
        self.n_past = pieces[-1].stop
