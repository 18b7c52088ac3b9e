"""MAN's EMA update (DESIGN §2.3): the weight edge at run time.

After partition k's backward and before any optimizer step of the step touches U (module k+1's first
unit), ``θ_EMA ← m·θ_EMA + (1 − m)·θ_U`` — parameters only, under no gradient. The executor calls
:meth:`EmaLinks.update` right after each stage's backward: module k+1's stage (and with it U's
optimizer step, or the end-of-step step of the per-device updater) comes later in the step, so U's
parameters are exactly this step's pre-update ones. The EMA parameters are ordinary (frozen)
parameters of the aux net, so checkpoints, resume and ``load_state_dict`` carry them.
"""

from __future__ import annotations

import torch

from ..codegen.modules import PartitionModule, ema_pairs
from ..partition.plan import Partition


class EmaLinks:
    """The MAN links among the partitions this process owns.

    Args:
        parts: ``{pid: Partition}`` of the plan.
        modules: ``{pid: PartitionModule}`` this process owns.

    Raises:
        ValueError: a MAN partition whose U partition is not in this process (distributed: refused earlier).
    """

    def __init__(self, parts: dict[int, Partition], modules: dict[int, PartitionModule]):
        self.links: dict[int, tuple[float, list[torch.Tensor], list[torch.Tensor]]] = {}
        for pid, pm in modules.items():
            man = parts[pid].man
            if man is None:
                continue
            if man.source not in modules:
                raise ValueError(f"partition {parts[pid].name}: its MAN unit follows partition "
                                 f"{parts[man.source].name}, which this process does not run")
            pairs = ema_pairs(pm, modules[man.source])
            self.links[pid] = (man.momentum, [e for e, _ in pairs], [u for _, u in pairs])

    def __bool__(self) -> bool:
        return bool(self.links)

    @torch.no_grad()
    def update(self, stage: list[int], active: set[int] | None) -> None:
        """The EMA step of the (active) MAN partitions of ``stage``, from U's current parameters."""
        for pid in stage:
            link = self.links.get(pid)
            if link is None or (active is not None and pid not in active):
                continue
            m, emas, us = link
            us = [u.to(e.device, non_blocking=True) for e, u in zip(emas, us)]
            torch._foreach_mul_(emas, m)
            torch._foreach_add_(emas, us, alpha=1.0 - m)
