"""Executor: one training step and one evaluation pass over the partitions this process owns.

It composes four seams, each replaceable on its own:

    StepPlan   (plan.py)            the static plan: stage order, releases, random partitions, fusion
    Transport  (dist/transport.py)  how tensors reach other processes (LocalTransport: nothing travels;
                                    PeerComm in dist/peer.py: point-to-point)
    runners    (runner.py)          bodies, heads and losses of a stage: PartitionRunner, or for a
                                    module whose siblings fuse, SiblingFusedRunner (fusion/runner.py)
    Updater    (updater.py)         the optimizers: backward, LR, step, and their checkpoint state

A step runs stage by stage (module by module, siblings together): forward, losses, backward —
so only one module's activations are alive at a time — then the updater's end-of-step. No
gradient crosses a partition: every input of a body and every sibling tensor is detached inside
the generated code. The parameters stay per partition whichever runner and updater run them.
"""

from __future__ import annotations

from typing import Any, Collection

import torch

from ...codegen.modules import PartitionModule
from ... import losses as L
from ...graph.ops import RANDOM_KINDS
from ...partition.plan import IMAGE, PartitionPlan
from ..fusion import FusedStage, NotFusable, SiblingFusedRunner
from .man_ema import EmaLinks
from .outputs import StageOutputs
from .runner import HEAD_KEYS, PartitionRunner, StageEnv, StageRunner, StepState, step_stats
from .plan import StepPlan
from .streams import Streams
from ..dist.transport import LocalTransport, Transport
from .updater import DeviceUpdater, PartitionUpdater

__all__ = ["Executor", "HEAD_KEYS"]


class Executor:
    """Runs the partitions of a plan in one process.

    Args:
        plan: the partition plan.
        modules: ``{partition id: PartitionModule}`` (moved to their devices here).
        optimizer: the spec's ``train.optimizer`` section; None for an executor that only evaluates
            (no optimizer state is made; :meth:`train_step` refuses).
        devices: ``{partition id: device}``.
        per_device_optim: one optimizer per device (one backward of the summed losses per stage, one
            multi-tensor step per device at the end of the step: :class:`DeviceUpdater`); False: one
            optimizer per partition, stepped right after its backward (:class:`PartitionUpdater`). The
            option ``train.fused`` / ``--fused`` sets it (docs/architecture.md "Three things once called fused").
        amp: bf16 autocast (on CUDA and on the CPU).
        channels_last: channels_last memory format for 4-d tensors.
        denorm: ``(mean, std)`` to turn the normalised image back into [0, 1] (InfoPro).
        siblings: with ``per_device_optim``, run each module whose sibling partitions are all here, on one
            device, as one fused program (same losses and gradients; see ``runtime/fusion/``);
            or the module indices that may fuse (the others run per partition).
        transport: how tensors reach partitions in other processes (default :class:`LocalTransport`).
        capturable: build a step that reads nothing on the host, for CUDA-graph capture
            (``runtime/step/cuda_graphs.py``): the LR lives in a tensor per device (``runtime/step/lr.py``;
            needs ``per_device_optim``). Off: the Python-float LR, today's results bit for bit.
    """

    def __init__(self, plan: PartitionPlan, modules: dict[int, PartitionModule], optimizer: Any | None,
                 devices: dict[int, torch.device], *, per_device_optim: bool = True, amp: bool = False,
                 channels_last: bool = False, denorm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 siblings: bool | Collection[int] = True, transport: Transport | None = None,
                 capturable: bool = False):
        self.plan, self.modules, self.devices = plan, modules, devices
        self.per_device_optim, self.amp, self.channels_last = per_device_optim, amp, channels_last
        self.denorm = denorm
        self.parts = {p.id: p for p in plan.partitions}
        self.step_plan = StepPlan.build(plan, modules, devices, random_ops=RANDOM_KINDS,
                                        fuse=siblings if per_device_optim else False)
        self.streams = Streams(self.parts, modules, devices, self.step_plan.random)
        """The random partitions' generators, seeded per (seed, step, partition) (``runtime/step/streams.py``)."""
        self.env = StageEnv(self.parts, modules, devices, transport or LocalTransport(), self.step_plan.random, amp,
                            denorm, streams=self.streams, autocast_cache=not capturable)
        """What every runner shares; the one holder of the transport."""
        for pid in self.order:
            m = modules[pid].to(devices[pid])
            if channels_last:
                m.to(memory_format=torch.channels_last)
        self.ema = EmaLinks(self.parts, {pid: modules[pid] for pid in self.order}, self.env.transport)
        """MAN's weight edges: the EMA step after each stage's backward (``runtime/step/man_ema.py``)."""
        self.partition_runners = [PartitionRunner(self.env, stage) for stage in self.stages]
        self.runners: list[StageRunner] = list(self.partition_runners)
        """Stage index -> its runner (sibling-fused where the module fuses, else per partition)."""
        self.fused_stages: dict[int, FusedStage] = {}
        """Stage index -> its fused program (modules whose siblings run as one)."""
        for i in self.step_plan.candidates:
            stage = self.stages[i]
            if self.streams.legacy & set(stage):
                self.step_plan.decide(i, False, "a random op that takes no generator")
                continue
            try:
                fs = FusedStage([modules[pid] for pid in stage])
            except NotFusable as exc:
                self.step_plan.decide(i, False, str(exc))
                continue
            self.step_plan.decide(i, True)
            self.fused_stages[i] = fs
            self.runners[i] = SiblingFusedRunner(fs, stage, self.parts[stage[0]].module, self.env)
        fused_grads = [g for fs in self.fused_stages.values() for g in fs.fused_grads()]
        self.ema.fuse_storage([self.stages[i] for i in self.fused_stages],
                              [t for fs in self.fused_stages.values() for t in fs.tensors])
        if capturable and not per_device_optim:
            raise ValueError("a capturable step needs one optimizer per device (per_device_optim=True)")
        self.updater: PartitionUpdater | DeviceUpdater | None = None
        """Owns the optimizers (None: this executor only evaluates)."""
        if optimizer is not None:
            self.updater = DeviceUpdater(self.order, modules, optimizer, devices, fused_grads, lr_tensor=capturable) \
                if per_device_optim else PartitionUpdater(self.order, modules, optimizer)

    # ------------------------------------------------------------------ the plan, read-only views
    @property
    def order(self) -> list[int]:
        """Owned partitions, in network order."""
        return self.step_plan.order

    @property
    def stages(self) -> list[list[int]]:
        """Owned partitions grouped by module, in network order (siblings run together)."""
        return self.step_plan.stages

    @property
    def release(self) -> dict[int, list[int]]:
        """Stage index -> body outputs no later stage reads (dropped from memory after it)."""
        return self.step_plan.release

    @property
    def random(self) -> set[int]:
        """Partitions with random ops: they draw from a generator seeded by (seed, step, partition)."""
        return self.step_plan.random

    @property
    def fusion(self) -> list[dict[str, Any]]:
        """Per module: ``{"module", "partitions", "fused", "reason"}`` (why a module runs unfused)."""
        return self.step_plan.fusion

    @property
    def transport(self) -> Transport:
        """The transport, held once by :attr:`env` (read-only: pass ``transport=`` to the constructor)."""
        return self.env.transport

    @property
    def optimizers(self) -> dict[Any, torch.optim.Optimizer]:
        """The updater's optimizers (by device string with ``per_device_optim``, else by partition id; none to
        evaluate)."""
        return self.updater.optimizers if self.updater is not None else {}

    def fusion_summary(self) -> str:
        """One line: which modules run fused, and why the others do not."""
        return self.step_plan.summary()

    # ------------------------------------------------------------------ forward passes
    def forward(self, x: torch.Tensor, y: torch.Tensor, active: set[int] | None = None,
                with_loss: bool = True, seed: tuple[int, int] | None = None
                ) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
        """Bodies, heads, diversity exchange and losses for one batch (all modules, no backward).

        Args:
            x: normalised images (on the first partition's device).
            y: labels.
            active: partitions that train (others run without grad; sequential schedule).
            with_loss: also compute the local losses.
            seed: ``(run seed, global step)`` for the random ops of the partitions (training).

        Returns:
            ``(head outputs by partition, losses by partition)``.
        """
        self.streams.seed(seed)
        h: dict[int, torch.Tensor] = {IMAGE: x}
        outs: dict[int, dict] = {}
        losses: dict[int, torch.Tensor] = {}
        for runner in self.partition_runners:
            losses.update(runner.forward(x, y, h, outs, active, with_loss, seed))
        return outs, losses

    # ------------------------------------------------------------------ training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, active: set[int] | None = None,
                   seed: tuple[int, int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """One optimisation step of every (active) partition.

        Module by module (sibling partitions together): forward, losses, backward — so only one
        module's activations are alive at a time, as in a hand-written local-learning loop. The
        updater steps at the end (per_device_optim: one multi-tensor step per device), or right after each
        partition's backward (unfused); no partition reads another's parameters, so both orders
        give the same weights.

        Args:
            x, y: the batch.
            lr: learning rate of this step.
            active: partitions that train (sequential schedule); None = all.
            seed: ``(run seed, global step)``: seeds dropout per partition (``runtime/step/streams.py``).

        Returns:
            ``{pid: (detached loss, number of correct predictions or None)}``, on device (no host sync).
        """
        if self.updater is None:
            raise RuntimeError("this Executor was built to evaluate (optimizer=None); it cannot train")
        self.begin_step(lr, active, seed)
        return self.run_step(x, y, lr, active, seed)

    def begin_step(self, lr: float, active: set[int] | None = None, seed: tuple[int, int] | None = None) -> None:
        """The host side of a step, before anything of it runs on a device: train/eval modes, the
        random streams' seeds (``runtime/step/streams.py``) and the LR (tensor LR: written on the device).
        A CUDA graph replays :meth:`run_step` only; this runs before every replay."""
        for pid in self.order:
            self.modules[pid].train(active is None or pid in active)
        self.streams.seed(seed)
        self.updater.set_lr(lr)

    def run_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, active: set[int] | None = None,
                 seed: tuple[int, int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """The device side of a step (after :meth:`begin_step`): forward, backward, optimizer, stats.
        With ``capturable`` it reads no tensor on the host (``tests/runtime/step/test_cuda_graphs.py``)."""
        st = StepState(x, y, lr, StageOutputs({IMAGE: x}), active, seed)
        self.ema.send(active, self.transport)  # MAN: U's pre-update parameters to the ranks that follow it
        for i, runner in enumerate(self.runners):
            if not runner.takes(active):
                runner = self.partition_runners[i]
            runner.train(st, self.updater)
            self.ema.update(runner.stage, active, self.transport)  # before any optimizer step touches U (module i+1)
            for src in self.release.get(i, ()):
                st.h.pop(src, None)  # no later module reads it
        self.updater.finish(lr)
        st.stats.update(step_stats(st.pending, y))
        return {pid: st.stats[pid] for pid in self.order if pid in st.stats}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, Any]:
        """Test accuracy of the assembled network, the layerwise ensemble and every partition.

        Args:
            batches: iterable of ``(step, x, y)`` test batches.

        Returns:
            ``{"test_acc", "ensemble_acc", "partition_acc": {name: acc}, "n"}``.
        """
        for m in self.modules.values():
            m.eval()
        final = self.plan.final.id
        correct = {pid: 0 for pid in self.order}
        ens_correct, n = 0, 0
        modules: dict[int, list[int]] = {}
        for pid in self.order:
            modules.setdefault(self.parts[pid].module, []).append(pid)
        for _, x, y in batches:
            outs, _ = self.forward(x, y, with_loss=False)
            probs_by_module = []
            for mod in sorted(modules):
                probs = [outs[pid]["logits"].float().softmax(1).to(x.device) for pid in modules[mod]
                         if "logits" in outs[pid]]
                if probs:
                    probs_by_module.append(probs)
            for pid in self.order:
                if "logits" in outs[pid]:
                    correct[pid] += int((outs[pid]["logits"].argmax(1).to(y.device) == y).sum())
            ens = L.layerwise_ensemble(probs_by_module)
            ens_correct += int((ens.argmax(1).to(y.device) == y).sum())
            n += y.numel()
        n = max(n, 1)
        names = {pid: self.parts[pid].name for pid in self.order}
        return {
            "test_acc": correct[final] / n,
            "ensemble_acc": ens_correct / n,
            "partition_acc": {names[pid]: correct[pid] / n for pid in self.order
                              if "logits" in self.parts[pid].head_outputs},
            "n": n,
        }
