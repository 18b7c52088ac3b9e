"""Graph stage: spec units → annotated op DAG (networkx), through the op registry."""

from .build import INPUT, OpGraph, Segment, build_graph
from .ops import OPS, OpDef, extra_ops, get_op, infer, registry

__all__ = ["INPUT", "OPS", "OpDef", "OpGraph", "Segment", "build_graph", "extra_ops", "get_op", "infer", "registry"]
