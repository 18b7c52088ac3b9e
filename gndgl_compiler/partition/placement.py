"""Placement: partitions → devices and workers, balanced by training MACs.

Two candidate assignments, the one with the smaller busiest slot wins (ties: contiguous):

    contiguous  network order cut into runs (min-max)      m1.g0 m1.g1 m2.g0 | m2.g1 head
    group-wise  group g of every module on slot g·W/G,      m1.g0 m2.g0       | m1.g1 m2.g1 head
                G=1 partitions on the least-loaded slot

Contiguous runs keep communication to run boundaries; group-wise keeps every
slot busy on every module when the groups are wider than the slots (a module's
first layer still reads all groups of the previous module, so it sends more).
Either order is deadlock-free: a partition only waits for partitions with a
lower id, and every slot runs its partitions in network order.
"""

from __future__ import annotations

from .cuts import balanced_split
from .plan import IMAGE, PartitionPlan


def balanced_assignment(costs: list[int], slots: int) -> list[int]:
    """Slot index of each item after a contiguous min-max split into ``min(slots, n)`` runs."""
    n = len(costs)
    runs = min(slots, n)
    starts = balanced_split([max(1, c) for c in costs], runs) + [n]
    out = []
    for s, (a, b) in enumerate(zip(starts, starts[1:])):
        out += [s] * (b - a)
    return out


def groupwise_assignment(plan: PartitionPlan, slots: int) -> list[int] | None:
    """Group g of a G-group module on slot ``g * slots // G``; G=1 partitions on the least-loaded slot.

    Returns:
        The slot of every partition, or None when no module has at least ``slots`` groups.
    """
    if slots < 2 or not any(p.groups >= slots for p in plan.partitions):
        return None
    load = [0] * slots
    out = []
    for p in plan.partitions:
        if p.groups >= slots:
            s = p.group * slots // p.groups
        else:
            s = min(range(slots), key=lambda i: (load[i], i))
        load[s] += p.costs["train_macs"]
        out.append(s)
    return out if len(set(out)) == slots else None


def _busiest(plan: PartitionPlan, slots: list[int]) -> int:
    load: dict[int, int] = {}
    for p, s in zip(plan.partitions, slots):
        load[s] = load.get(s, 0) + p.costs["train_macs"]
    return max(load.values())


def assign(plan: PartitionPlan, slots: int) -> list[int]:
    """The better of the contiguous and the group-wise assignment onto ``slots`` slots."""
    costs = [p.costs["train_macs"] for p in plan.partitions]
    best = balanced_assignment(costs, slots)
    other = groupwise_assignment(plan, slots)
    if other is not None and _busiest(plan, other) < _busiest(plan, best):
        best = other
    return best


def place(plan: PartitionPlan, devices: list[str], workers: int) -> None:
    """Set ``device`` and ``worker`` of every partition in place.

    Args:
        plan: the plan (costs annotated).
        devices: devices of a single-process run.
        workers: number of distributed ranks (1 = single process).
    """
    for p, d in zip(plan.partitions, assign(plan, len(devices))):
        p.device = devices[d]
    for p, w in zip(plan.partitions, assign(plan, workers)):
        p.worker = w
    plan.devices, plan.workers = list(devices), workers


def cross_worker_bytes(plan: PartitionPlan) -> int:
    """Bytes per sample that cross a worker boundary in one training step, as the runtime sends them.

    A body output goes once to each other worker that reads it whole; a worker that only shares a
    slice of it gets the widest slice it needs; a diversity vector goes once to each sibling's worker.
    """
    owner = {p.id: p.worker for p in plan.partitions}
    full: dict[tuple[int, int], int] = {}
    share: dict[tuple[int, int], int] = {}
    div: dict[tuple[int, int], int] = {}
    for e in plan.edges:
        if e.src == IMAGE or owner[e.src] == owner[e.dst]:
            continue
        key = (e.src, owner[e.dst])
        if e.kind == "share":
            share[key] = max(share.get(key, 0), e.bytes_per_sample)
        elif e.kind == "diversity":
            div[key] = e.bytes_per_sample
        else:
            full[key] = e.bytes_per_sample
    return sum(full.values()) + sum(v for k, v in share.items() if k not in full) + sum(div.values())
