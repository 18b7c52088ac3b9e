"""Cost model (DESIGN §4): MACs, parameters and bytes per partition, and speed-ups.

    training speed-up  = end-to-end forward MACs / max_p (body_p + aux head_p)
    inference speed-up = end-to-end forward MACs / (Σ bodies + final head)

Backward MACs are 2× forward, less the input-gradient half of the layers that
read the partition's detached input (nothing upstream needs that gradient).
"""

from __future__ import annotations

from ..graph.build import OpGraph
from .plan import IMAGE, PartitionPlan

FLOAT_BYTES = 4
"""Bytes of one float32 gradient element."""


def annotate_costs(plan: PartitionPlan, og: OpGraph) -> None:
    """Fill ``partition.costs`` and ``plan.summary`` in place.

    Args:
        plan: the partition plan (edges already built).
        og: the op graph it was cut from (for end-to-end MACs).
    """
    bytes_in = {p.id: 0 for p in plan.partitions}
    bytes_out = {p.id: 0 for p in plan.partitions}
    for e in plan.edges:
        bytes_in[e.dst] += e.bytes_per_sample
        if e.src != IMAGE:
            bytes_out[e.src] += e.bytes_per_sample
    for p in plan.partitions:
        body = sum(n.macs for n in p.body)
        head = sum(n.macs for n in p.head)
        no_input_grad = sum(n.macs for n in p.body if n.dense_in)
        # MAN's EMA unit: its input gradient is computed, its weight gradient is not
        no_input_grad += sum(n.macs for n in p.head if p.man is not None and n.name in p.man.ema)
        fwd = body + head
        p.costs = {
            "body_macs": body,
            "head_macs": head,
            "fwd_macs": fwd,
            "bwd_macs": 2 * fwd - no_input_grad,
            "train_macs": 3 * fwd - no_input_grad,
            "params": sum(n.params for n in p.body) + sum(n.params for n in p.head),
            "body_params": sum(n.params for n in p.body),
            "bytes_in": bytes_in[p.id],
            "bytes_out": bytes_out[p.id],
        }
    _weight_bytes(plan)
    e2e = og.total_macs()
    final = plan.final
    inference = sum(p.costs["body_macs"] for p in plan.partitions) + final.costs["head_macs"]
    max_fwd = max(p.costs["fwd_macs"] for p in plan.partitions)
    plan.summary = {
        "partitions": len(plan.partitions),
        "e2e_macs": e2e,
        "max_partition_macs": max_fwd,
        "inference_macs": inference,
        "total_train_macs": sum(p.costs["train_macs"] for p in plan.partitions),
        "params": sum(p.costs["params"] for p in plan.partitions),
        "inference_params": sum(p.costs["body_params"] for p in plan.partitions)
        + sum(n.params for n in final.head),
        "training_speedup": e2e / max_fwd,
        "inference_speedup": e2e / inference,
        "bytes_per_sample": sum(e.bytes_per_sample for e in plan.edges if e.src != IMAGE),
    }
    per_step = sum(e.bytes_per_step for e in plan.edges)
    if per_step:
        plan.summary["weight_bytes_per_step"] = per_step


def _weight_bytes(plan: PartitionPlan) -> None:
    """MAN's weight edges: bytes a partition receives / sends once per step (keys only where there are some)."""
    for e in plan.edges:
        if e.bytes_per_step:
            dst, src = plan.partitions[e.dst].costs, plan.partitions[e.src].costs
            dst["weight_bytes_in_per_step"] = dst.get("weight_bytes_in_per_step", 0) + e.bytes_per_step
            src["weight_bytes_out_per_step"] = src.get("weight_bytes_out_per_step", 0) + e.bytes_per_step


def annotate_allreduce(plan: PartitionPlan, replicas: int) -> None:
    """Data-parallel replicas: the gradient bytes each replica all-reduces per step, per partition and in all
    (every parameter's float32 gradient, averaged over its ``replicas`` copies once per step), and what a
    ring all-reduce sends per rank (``2·(R-1)/R`` of it)."""
    for p in plan.partitions:
        p.costs["allreduce_bytes_per_step"] = p.costs["params"] * FLOAT_BYTES
    total = sum(p.costs["allreduce_bytes_per_step"] for p in plan.partitions)
    plan.summary["replicas"] = replicas
    plan.summary["allreduce_bytes_per_step"] = total
    plan.summary["allreduce_ring_bytes_per_rank"] = 2 * (replicas - 1) * total // replicas
