"""Graph stage: spec units → annotated op DAG (networkx), through the op registry."""

from .build import INPUT, OpGraph, Segment, build_graph
from .ops import OPS, OpDef, get_op, infer

__all__ = ["INPUT", "OPS", "OpDef", "OpGraph", "Segment", "build_graph", "get_op", "infer"]
