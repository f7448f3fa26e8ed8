"""What every pass returns: a new graph and whether it changed anything (torch.fx PassResult)."""
from dataclasses import dataclass

from ggfuse.ir.graph import Graph


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    changed: bool
