"""Placement: partitions → devices and workers, balanced by training MACs.

Partitions are kept in network order and split into contiguous runs (one per
device or worker) that minimise the largest training cost, so siblings and
neighbouring modules tend to share a slot and only run boundaries communicate.
"""

from __future__ import annotations

from .cuts import balanced_split
from .plan import PartitionPlan


def balanced_assignment(costs: list[int], slots: int) -> list[int]:
    """Slot index of each item after a contiguous min-max split into ``min(slots, n)`` runs."""
    n = len(costs)
    runs = min(slots, n)
    starts = balanced_split([max(1, c) for c in costs], runs) + [n]
    out = []
    for s, (a, b) in enumerate(zip(starts, starts[1:])):
        out += [s] * (b - a)
    return out


def place(plan: PartitionPlan, devices: list[str], workers: int) -> None:
    """Set ``device`` and ``worker`` of every partition in place.

    Args:
        plan: the plan (costs annotated).
        devices: devices of a single-process run.
        workers: number of distributed ranks (1 = single process).
    """
    costs = [p.costs["train_macs"] for p in plan.partitions]
    for p, d in zip(plan.partitions, balanced_assignment(costs, len(devices))):
        p.device = devices[d]
    for p, w in zip(plan.partitions, balanced_assignment(costs, workers)):
        p.worker = w
    plan.devices, plan.workers = list(devices), workers
