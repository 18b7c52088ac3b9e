"""MAN's EMA update (DESIGN §2.3): the weight edge at run time.

After partition k's backward and before any optimizer step of the step touches U (module k+1's first
unit), ``θ_EMA ← m·θ_EMA + (1 − m)·θ_U`` — parameters only, under no gradient. The executor calls
:meth:`EmaLinks.update` right after each stage's backward: module k+1's stage (and with it U's
optimizer step, or the end-of-step step of the per-device updater) comes later in the step, so U's
parameters are exactly this step's pre-update ones. The EMA parameters are ordinary (frozen)
parameters of the aux net, so checkpoints, resume and ``load_state_dict`` carry them.

In a distributed run where U lives on another rank, that rank sends U's parameters (one flat copy, in
their own dtype) at the start of the step, before anything of the step runs (:meth:`EmaLinks.send`), and
the MAN partition's rank receives them after its backward: the same values, so the same EMA bit for bit.
The transport must then offer :class:`WeightTransport` (``PeerComm`` does).

Sibling fusion (``runtime/fusion/``) makes the EMA and U parameters views of fused storage, so the update
above moves the fused storage too. Where a fused module's G EMA layers are exactly one fused tensor and
the U layers they follow are one fused tensor of the next module's storage, in the same layout (G_k =
G_{k+1}: partition (k, g) follows (k+1, g)), :meth:`EmaLinks.fuse_storage` makes the step one update per
layer over the whole storages: the same element-wise arithmetic on the same values.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ...codegen.modules import PartitionModule
from ...partition.plan import Partition
from ..fusion.storage import FusedTensor


@runtime_checkable
class WeightTransport(Protocol):
    """The two hooks MAN's weight edge needs of a transport between processes."""

    def send_weights(self, src: int, flat: torch.Tensor) -> None:
        """Send U's flat parameters of partition ``src`` to the ranks that follow it."""

    def recv_weights(self, src: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This step's flat U parameters of partition ``src``."""


def u_parameters(link_ema: dict[str, str], body: torch.nn.Module) -> list[torch.Tensor]:
    """U's parameters in the order of a MAN link (its EMA nodes, then each module's parameters)."""
    return [p for u in link_ema.values() for p in body.get_submodule(u).parameters()]


def ema_parameters(link_ema: dict[str, str], aux: torch.nn.Module) -> list[torch.Tensor]:
    """The EMA unit's parameters, in the same order as :func:`u_parameters`."""
    return [p for e in link_ema for p in aux.get_submodule(e).parameters()]


class EmaLinks:
    """The MAN links of the partitions this process owns, and the U partitions it must send.

    Args:
        parts: ``{pid: Partition}`` of the plan.
        modules: ``{pid: PartitionModule}`` this process owns.
        transport: the executor's transport, checked here (a :class:`WeightTransport` when some U lives
            elsewhere); the executor passes it again to :meth:`send` and :meth:`update` (it holds it, not this).

    Raises:
        ValueError: U lives in another process and the transport cannot carry weights.
    """

    def __init__(self, parts: dict[int, Partition], modules: dict[int, PartitionModule], transport: object = None):
        self.links: dict[int, tuple[float, int, list[torch.Tensor]]] = {}
        self.local: dict[int, list[torch.Tensor]] = {}
        self.sends: dict[int, list[torch.Tensor]] = {}
        """U partitions here that MAN partitions elsewhere follow → U's parameters, in link order."""
        for pid, pm in modules.items():
            man = parts[pid].man
            if man is None:
                continue
            self.links[pid] = (man.momentum, man.source, ema_parameters(man.ema, pm.aux))
            if man.source in modules:
                self.local[pid] = u_parameters(man.ema, modules[man.source].body)
            elif not isinstance(transport, WeightTransport):
                raise ValueError(f"partition {parts[pid].name}: its MAN unit follows partition "
                                 f"{parts[man.source].name} in another process, and the transport cannot send weights")
        for p in parts.values():
            if p.man is not None and p.id not in modules and p.man.source in modules:
                self.sends.setdefault(p.man.source, u_parameters(p.man.ema, modules[p.man.source].body))
        self.merged: dict[tuple[int, ...], tuple[float, list[torch.Tensor], list[torch.Tensor]]] = {}
        """Sibling-fused stages (pids) → (m, EMA tensors, U tensors): the stage's EMA step over fused storage."""
        self.followers = {src: [p.id for p in parts.values() if p.man is not None and p.man.source == src
                                and p.id not in modules] for src in self.sends}

    def fuse_storage(self, stages: list[list[int]], tensors: list[FusedTensor]) -> None:
        """Run the EMA step of each sibling-fused stage in ``stages`` over fused storage (``tensors``: every
        fused stage's): layer by layer, one fused EMA tensor and the fused U tensor it follows where both are
        whole storages of the same layout, else that layer's per-partition tensors."""
        owner = {id(t): ft for ft in tensors for t in ft.parts}
        for stage in stages:
            links = [self.links.get(pid) for pid in stage]
            if any(link is None or pid not in self.local for pid, link in zip(stage, links)) \
                    or len({link[0] for link in links}) != 1:
                continue
            emas, us = [], []
            for j in range(len(links[0][2])):
                es, ys = [link[2][j] for link in links], [self.local[pid][j] for pid in stage]
                fe, fu = owner.get(id(es[0])), owner.get(id(ys[0]))
                if _whole(fe, es) and _whole(fu, ys) and fe.fused.shape == fu.fused.shape \
                        and fe.linear == fu.linear and fe.fused.dtype == fu.fused.dtype:
                    emas.append(fe.fused)
                    us.append(fu.fused.detach().to(fe.fused.device))
                else:
                    emas += es
                    us += ys
            self.merged[tuple(stage)] = (links[0][0], emas, us)

    def __bool__(self) -> bool:
        return bool(self.links or self.sends)

    @torch.no_grad()
    def send(self, active: set[int] | None, transport: Any) -> None:
        """At the start of a step: U's pre-update parameters to the ranks whose (active) MAN partitions follow it."""
        for src, params in self.sends.items():
            if active is None or any(pid in active for pid in self.followers[src]):
                transport.send_weights(src, torch.cat([p.detach().reshape(-1) for p in params]))

    @torch.no_grad()
    def update(self, stage: list[int], active: set[int] | None, transport: Any) -> None:
        """The EMA step of the (active) MAN partitions of ``stage``, from U's pre-update parameters."""
        merged = self.merged.get(tuple(stage))
        if merged is not None and (active is None or all(pid in active for pid in stage)):
            m, emas, us = merged
            torch._foreach_mul_(emas, m)
            torch._foreach_add_(emas, us, alpha=1.0 - m)
            return
        for pid in stage:
            link = self.links.get(pid)
            if link is None or (active is not None and pid not in active):
                continue
            m, src, emas = link
            us = self.local.get(pid)
            if us is None:
                us = _remote(transport, src, emas)
            us = [u.to(e.device, non_blocking=True) for e, u in zip(emas, us)]
            torch._foreach_mul_(emas, m)
            torch._foreach_add_(emas, us, alpha=1.0 - m)


def _remote(transport: Any, src: int, emas: list[torch.Tensor]) -> list[torch.Tensor]:
    """U's pre-update parameters received from the rank of partition ``src``, viewed like ``emas``."""
    flat = transport.recv_weights(src, sum(e.numel() for e in emas), emas[0].dtype, emas[0].device)
    return [t.view_as(e) for t, e in zip(flat.split([e.numel() for e in emas]), emas)]


def _whole(ft: FusedTensor | None, parts: list[torch.Tensor]) -> bool:
    """``parts`` are exactly the tensors of fused storage ``ft``, in order, in the equal-width layout."""
    return ft is not None and ft.index is None and len(ft.parts) == len(parts) \
        and all(a is b for a, b in zip(ft.parts, parts))
