"""Partition stage: depth cuts, width groups, heads, losses, placement, costs."""

from .partitioner import build_plan
from .placement import place
from .plan import IMAGE, Edge, Input, IRNode, Loss, Partition, PartitionPlan, Share
from .validate import validate_plan

__all__ = ["IMAGE", "Edge", "IRNode", "Input", "Loss", "Partition", "PartitionPlan", "Share", "build_plan", "place",
           "validate_plan"]
