"""ggfuse's intermediate representation: typed tensors, ops, graphs."""
from ggfuse.ir.graph import Attrs, Graph, Node, Value
from ggfuse.ir.ops import OPS, Op
from ggfuse.ir.types import DType, TensorType

__all__ = ["Attrs", "Graph", "Node", "Value", "Op", "OPS", "DType", "TensorType"]
