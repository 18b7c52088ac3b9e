"""Stage runners: the bodies, aux heads and local losses of one module's partitions, behind one interface.

A *stage* is one module's partitions this process owns (siblings together). Its runner does,
for a batch:

    bodies  : h_p = body_p(detached upstream outputs)          (network order)
    heads   : out_p = aux_p(h_p, detached sibling slices)      (stop-gradient sharing)
    exchange: p̂_p = diversity_probs(out_p.logits, y).detach()  (diversity)
    losses  : L_p = loss_p(out_p, y, [image], p̂_siblings)
    backward: through the Updater (which also steps, or defers to the end of the step)

:class:`PartitionRunner` runs every partition as its own program and calls the transport's
hooks; the sibling-fused runner (``runtime/fusion/``) runs a whole module as one program and
can replace it for a stage (:meth:`StageRunner.takes` says when).
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ...codegen.modules import PartitionModule
from ... import losses as L
from ...partition.plan import Partition
from .streams import Streams
from ..dist.transport import Transport

HEAD_KEYS = ("logits", "sim", "recon", "proj")


@dataclass
class StageEnv:
    """What every runner of an Executor shares: partitions, modules, devices, transport, options."""

    parts: dict[int, Partition]
    modules: dict[int, PartitionModule]
    devices: dict[int, torch.device]
    transport: Transport
    random: set[int]
    amp: bool = False
    denorm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    streams: Streams | None = None
    autocast_cache: bool = True
    """Autocast's weight-cast cache (off for a CUDA-graph captured step, as torch requires)."""
    """The random partitions' generators (``runtime/step/streams.py``), seeded by the executor per step."""
    _denorm_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def autocast(self, device: torch.device):
        """bf16 autocast on ``device`` (CUDA or CPU) when ``amp``; else nothing."""
        if self.amp and device.type in ("cuda", "cpu"):
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=self.autocast_cache)
        return contextlib.nullcontext()

    def rng(self, pid: int, seed: tuple[int, int] | None, head: bool = False):
        """Nothing for a partition whose random ops draw from their own generator (all built-in ones);
        the forked, re-seeded global RNG for one whose op takes no generator (:class:`Streams`)."""
        if self.streams is None:
            return contextlib.nullcontext()
        return self.streams.legacy_rng(pid, seed, head)

    def image01(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised batch back in [0, 1] (InfoPro's reconstruction target); the mean/std
        tensors are made once per device, so a step copies nothing from the host."""
        cache = self._denorm_on
        if x.device not in cache:
            mean, std = self.denorm or ((0.0,), (1.0,))
            cache[x.device] = (torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1),
                               torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1))
        m, s = cache[x.device]
        return (x.float() * s + m).clamp(0, 1)


@dataclass
class StepState:
    """One training step in progress: the batch, the body outputs so far, and what the runners report."""

    x: torch.Tensor
    y: torch.Tensor
    lr: float
    h: MutableMapping[int, torch.Tensor]
    """Body outputs so far, by partition id (a :class:`~.outputs.StageOutputs` in a training step)."""
    active: set[int] | None = None
    seed: tuple[int, int] | None = None
    outs: dict[int, dict] = field(default_factory=dict)
    stats: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    """``{pid: (detached loss, correct or None)}`` of runners that report them directly."""
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    """``(pid, loss, logits)`` whose stats are batched at the end of the step (:func:`step_stats`)."""


class StageRunner(Protocol):
    """Runs one stage of a training step."""

    stage: list[int]

    def takes(self, active: set[int] | None) -> bool:
        """Whether this runner can train the stage when only ``active`` partitions train."""

    def train(self, st: StepState, updater: Any) -> None:
        """Forward and backward of the stage (body outputs into ``st.h``, stats into ``st``)."""


class PartitionRunner:
    """Runs a stage partition by partition (each its own body, head and loss programs).

    Args:
        env: the executor's shared state.
        stage: the stage's partition ids, in network order.
    """

    def __init__(self, env: StageEnv, stage: list[int]):
        self.env, self.stage = env, stage

    def takes(self, active: set[int] | None) -> bool:
        return True

    def forward(self, x: torch.Tensor, y: torch.Tensor, h: MutableMapping[int, torch.Tensor], outs: dict[int, dict],
                active: set[int] | None, with_loss: bool, seed: tuple[int, int] | None) -> dict[int, torch.Tensor]:
        """Bodies, aux heads, diversity exchange and losses of the stage (no backward).

        Fills ``h`` (body outputs) and ``outs`` (head outputs); returns the losses of the stage.
        """
        env, comm = self.env, self.env.transport
        for pid in self.stage:
            p, dev = env.parts[pid], env.devices[pid]
            comm.recv_inputs(pid, h)
            grad = active is None or pid in active
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()), env.autocast(dev), env.rng(pid, seed):
                args = [h[i.source].to(dev, non_blocking=True) for i in p.inputs]
                h[pid] = env.modules[pid].body(*args)
            comm.send_output(pid, h[pid])
        live = [pid for pid in self.stage if active is None or pid in active]
        for pid in live:
            p, dev = env.parts[pid], env.devices[pid]
            comm.recv_shares(pid, h)
            with torch.set_grad_enabled(torch.is_grad_enabled()), env.autocast(dev), env.rng(pid, seed, head=True):
                shares = [h[s.source][:, :s.channels].to(dev, non_blocking=True) for s in p.shares]
                outs[pid] = env.modules[pid].aux(h[pid], *shares)
        losses: dict[int, torch.Tensor] = {}
        if not with_loss:
            return losses
        p_hat: dict[int, torch.Tensor] = {}
        for pid in self.stage:
            lp = env.parts[pid].loss
            if lp.diversity_weight > 0 and pid in outs:
                p_hat[pid] = L.diversity_probs(outs[pid]["logits"].detach(), y.to(env.devices[pid]),
                                               lp.diversity_temperature)
        comm.exchange_diversity(p_hat)
        for pid in live:
            p, dev = env.parts[pid], env.devices[pid]
            yd = y.to(dev, non_blocking=True)
            args = [outs[pid][k] for k in HEAD_KEYS if k in p.head_outputs] + [yd]
            if p.loss.kind == "infopro":
                args.append(env.image01(x).to(dev))
            if p.loss.diversity_weight > 0:
                args += [p_hat[s].to(dev) for s in p.siblings]
            losses[pid] = env.modules[pid].loss(*args)
        return losses

    def train(self, st: StepState, updater: Any) -> None:
        losses = self.forward(st.x, st.y, st.h, st.outs, st.active, True, st.seed)
        updater.backward(losses, st.lr)
        for pid, loss in losses.items():
            st.pending.append((pid, loss, st.outs[pid].pop("logits", None)))
            st.outs[pid] = {}  # free the head outputs (and their graph) before the next module


@torch.no_grad()
def step_stats(pending: list[tuple[int, torch.Tensor, torch.Tensor | None]], y: torch.Tensor
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{pid: (loss, correct predictions or None)}`` of per-partition stages, batched per device.

    Args:
        pending: ``(pid, loss, logits or None)`` of the partitions that trained this step.
        y: the labels.
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    batchable: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for pid, loss, logits in pending:
        if logits is None or len(pending) == 1:
            correct = None if logits is None else (logits.argmax(1) == y.to(logits.device)).sum()
            out[pid] = (loss.detach(), correct)
        else:
            key = (str(logits.device), tuple(logits.shape), logits.dtype, loss.dtype)
            batchable.setdefault(key, []).append((pid, loss, logits))
    for group in batchable.values():
        pids = [pid for pid, _, _ in group]
        losses = torch.stack([loss for _, loss, _ in group])
        logits = torch.stack([lg for _, _, lg in group])
        correct = (logits.argmax(2) == y.to(logits.device)).sum(1)
        out.update(zip(pids, zip(losses.unbind(0), correct.unbind(0))))
    return out
