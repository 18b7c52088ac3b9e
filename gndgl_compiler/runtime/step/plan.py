"""The static step plan: what one training step runs, in which order, computed once per Executor.

Plain data, derived from the PartitionPlan and the placement before any tensor moves:

    order     the partitions this process owns, in network order
    stages    those partitions grouped by module (siblings run together), in network order
    release   stage index -> body outputs no later stage reads (dropped from memory after it)
    random    partitions with random ops (seeded per (seed, step, partition))
    fusion    per module: ``{"module", "partitions", "fused", "reason"}`` — which modules run
              sibling-fused and why the others do not

The static reasons (fusion off, siblings on other ranks, siblings on different devices) are
decided here; the executor then asks the sibling-fused runner whether each remaining candidate
fuses exactly and records the answer with :meth:`StepPlan.decide`. The transport does not
matter: a distributed rank fuses a module whose G siblings it owns, and the fused runner still
calls the transport's hooks for the module's inputs and its per-partition outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable

import torch

from ...partition.plan import PartitionPlan

SPLIT = "siblings on other ranks"
"""The fusion reason of a module whose siblings this process does not all own (a distributed rank)."""


@dataclass
class StepPlan:
    """The order of a step's stages, when activations are released, what is random, what fuses."""

    order: list[int]
    stages: list[list[int]]
    release: dict[int, list[int]]
    random: set[int]
    fusion: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    """Stage indices that may run sibling-fused (the sibling-fused runner decides; see :meth:`decide`)."""

    @classmethod
    def build(cls, plan: PartitionPlan, owned: Iterable[int], devices: dict[int, torch.device], *,
              random_ops: tuple[str, ...], fuse: bool | Collection[int]) -> "StepPlan":
        """The step plan of the partitions ``owned`` (ids) placed on ``devices``.

        Args:
            plan: the partition plan.
            owned: ids of the partitions this process runs.
            devices: ``{partition id: device}``.
            random_ops: IR op kinds that draw random numbers (dropout).
            fuse: sibling fusion requested: True (every module), False, or the module indices that may
                fuse (the others run per partition: e.g. to run in one process as a distributed run's
                ranks do, where a module split over ranks cannot fuse).
        """
        owned = set(owned)
        parts = {p.id: p for p in plan.partitions}
        order = [p.id for p in plan.partitions if p.id in owned]
        stages: list[list[int]] = []
        for pid in order:
            if not stages or parts[stages[-1][0]].module != parts[pid].module:
                stages.append([])
            stages[-1].append(pid)
        last: dict[int, int] = {}
        for i, stage in enumerate(stages):
            for pid in stage:
                last[pid] = max(last.get(pid, i), i)
                for src in [inp.source for inp in parts[pid].inputs] + [sh.source for sh in parts[pid].shares]:
                    last[src] = max(last.get(src, i), i)
        release: dict[int, list[int]] = {}
        for src, i in last.items():
            release.setdefault(i, []).append(src)
        random = {p.id for p in plan.partitions if any(n.kind in random_ops for n in p.body + p.head)}
        sp = cls(order, stages, release, random)
        siblings: dict[int, set[int]] = {}
        for p in plan.partitions:
            siblings.setdefault(p.module, set()).add(p.id)
        for i, stage in enumerate(stages):
            rec = {"module": parts[stage[0]].module, "partitions": [parts[pid].name for pid in stage],
                   "fused": False, "reason": ""}
            if not fuse:
                rec["reason"] = "sibling fusion off"
            elif fuse is not True and rec["module"] not in fuse:
                rec["reason"] = "sibling fusion off for this module"
            elif set(stage) != siblings[parts[stage[0]].module]:
                rec["reason"] = SPLIT
            elif len({str(devices[pid]) for pid in stage}) > 1:
                rec["reason"] = "siblings on different devices"
            else:
                sp.candidates.append(i)
            sp.fusion.append(rec)
        return sp

    def decide(self, stage: int, fused: bool, reason: str = "") -> None:
        """Record whether candidate ``stage`` runs sibling-fused (and if not, why)."""
        self.fusion[stage]["fused"], self.fusion[stage]["reason"] = fused, reason

    def summary(self) -> str:
        """One line: which modules run fused, and why the others do not."""
        fused = [str(r["module"]) for r in self.fusion if r["fused"]]
        other: dict[str, list[str]] = {}
        for r in self.fusion:
            if not r["fused"] and (len(r["partitions"]) > 1 or r["reason"] == SPLIT):
                other.setdefault(r["reason"], []).append(str(r["module"]))
        text = f"sibling-fused modules: {', '.join(fused) if fused else 'none'}"
        for reason, mods in other.items():
            text += f"; per partition ({reason}): {', '.join(mods)}"
        return text
