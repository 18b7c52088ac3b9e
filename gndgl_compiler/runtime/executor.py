"""Single-process executor: one training step and one evaluation pass over all partitions.

One step, for a batch (x, y):

    bodies  : h_p = body_p(detached upstream outputs)          (network order)
    heads   : out_p = aux_p(h_p, detached sibling slices)      (stop-gradient sharing)
    exchange: p̂_p = diversity_probs(out_p.logits, y).detach()  (diversity)
    losses  : L_p = loss_p(out_p, y, [image], p̂_siblings)
    update  : per partition: backward(L_p), optimizer step     (unfused)
              per device:    backward(Σ L_p), one foreach step (fused; same math)

Fused, a module whose G sibling partitions all sit on one device runs as one program
(``runtime/fused.py``: dense first conv + grouped convs, batched aux heads and losses);
modules that cannot be fused exactly run partition by partition (``Executor.fusion`` says
which and why). The parameters stay per partition either way.

No gradient crosses a partition: every input of a body and every sibling tensor
is detached inside the generated code.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..codegen.modules import PartitionModule
from ..graph import losses as L
from ..graph.ops import RANDOM_KINDS
from ..partition.plan import IMAGE, PartitionPlan
from .fused import FusedStage, NotFusable
from .optim import make_optimizer, set_lr, step_all
from .stage_outputs import StageOutputs

HEAD_KEYS = ("logits", "sim", "recon", "proj")
RANDOM_OPS = RANDOM_KINDS


def _partition_seed(seed: int, step: int, pid: int) -> int:
    """Seed of partition ``pid``'s random ops at global step ``step`` (independent of placement)."""
    return ((seed * 1_000_003 + step) * 65_537 + pid) % (2 ** 63)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Run the block with the global RNG (CPU, and ``device`` if CUDA) seeded to ``seed``; restore it after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class Executor:
    """Runs the partitions of a plan in one process.

    Args:
        plan: the partition plan.
        modules: ``{partition id: PartitionModule}`` (moved to their devices here).
        optimizer: the spec's ``train.optimizer`` section.
        devices: ``{partition id: device}``.
        fused: per-device fused step (one backward, multi-tensor optimizer).
        amp: bf16 autocast (CUDA only).
        channels_last: channels_last memory format for 4-d tensors.
        denorm: ``(mean, std)`` to turn the normalised image back into [0, 1] (InfoPro).
        siblings: with ``fused``, run each module whose sibling partitions share a device as
            one fused program (same losses and gradients; see ``runtime/fused.py``).
    """

    def __init__(self, plan: PartitionPlan, modules: dict[int, PartitionModule], optimizer: dict[str, Any],
                 devices: dict[int, torch.device], *, fused: bool = True, amp: bool = False,
                 channels_last: bool = False, denorm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 siblings: bool = True):
        self.plan, self.modules, self.devices = plan, modules, devices
        self.fused, self.amp, self.channels_last, self.denorm = fused, amp, channels_last, denorm
        self._denorm_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _image01
        self.comm: Any = None
        """Optional transport (distributed runs): recv_inputs / send_output / recv_shares / exchange_diversity."""
        self.parts = {p.id: p for p in plan.partitions}
        self.order = [p.id for p in plan.partitions if p.id in modules]
        self.stages: list[list[int]] = []
        """Owned partitions grouped by module, in network order (siblings run together)."""
        for pid in self.order:
            if not self.stages or self.parts[self.stages[-1][0]].module != self.parts[pid].module:
                self.stages.append([])
            self.stages[-1].append(pid)
        last: dict[int, int] = {}
        for i, stage in enumerate(self.stages):
            for pid in stage:
                last[pid] = max(last.get(pid, i), i)
                for src in [inp.source for inp in self.parts[pid].inputs] + [sh.source for sh in self.parts[pid].shares]:
                    last[src] = max(last.get(src, i), i)
        self.release: dict[int, list[int]] = {}
        """Stage index -> body outputs no later stage reads (dropped from memory after it)."""
        for src, i in last.items():
            self.release.setdefault(i, []).append(src)
        self.random = {p.id for p in plan.partitions if any(n.kind in RANDOM_OPS for n in p.body + p.head)}
        """Partitions with random ops: they draw from a generator seeded by (seed, step, partition)."""
        for pid in self.order:
            m = modules[pid].to(devices[pid])
            if channels_last:
                m.to(memory_format=torch.channels_last)
        self.fused_stages: dict[int, FusedStage] = {}
        """Stage index -> its fused program (modules whose siblings run as one)."""
        self.fusion: list[dict[str, Any]] = []
        """Per module: ``{"module", "partitions", "fused", "reason"}`` (why a module runs unfused)."""
        self._build_fused(fused and siblings)
        self.optimizers: dict[Any, torch.optim.Optimizer] = {}
        if fused:
            by_dev: dict[torch.device, list[dict]] = {}
            for pid in self.order:
                by_dev.setdefault(devices[pid], []).append({"params": list(modules[pid].parameters()), "pid": pid})
            for dev, groups in by_dev.items():
                self.optimizers[str(dev)] = make_optimizer(groups, optimizer, foreach=True)
        else:
            for pid in self.order:
                self.optimizers[pid] = make_optimizer(modules[pid].parameters(), optimizer, foreach=False)

    def _build_fused(self, enabled: bool) -> None:
        """Fuse the sibling partitions of every module that allows it (fills ``fused_stages``, ``fusion``)."""
        for i, stage in enumerate(self.stages):
            names = [self.parts[pid].name for pid in stage]
            rec = {"module": self.parts[stage[0]].module, "partitions": names, "fused": False, "reason": ""}
            if not enabled:
                rec["reason"] = "sibling fusion off"
            elif len({str(self.devices[pid]) for pid in stage}) > 1:
                rec["reason"] = "siblings on different devices"
            else:
                try:
                    self.fused_stages[i] = FusedStage([self.modules[pid] for pid in stage])
                    rec["fused"] = True
                except NotFusable as exc:
                    rec["reason"] = str(exc)
            self.fusion.append(rec)
        self._fused_grads = [g for fs in self.fused_stages.values() for g in fs.fused_grads()]

    def fusion_summary(self) -> str:
        """One line: which modules run fused, and why the others do not."""
        fused = [str(r["module"]) for r in self.fusion if r["fused"]]
        other: dict[str, list[str]] = {}
        for r in self.fusion:
            if not r["fused"] and len(r["partitions"]) > 1:
                other.setdefault(r["reason"], []).append(str(r["module"]))
        text = f"sibling-fused modules: {', '.join(fused) if fused else 'none'}"
        for reason, mods in other.items():
            text += f"; per partition ({reason}): {', '.join(mods)}"
        return text

    # ------------------------------------------------------------------ forward passes
    def _autocast(self, device: torch.device):
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _rng(self, pid: int, seed: tuple[int, int] | None):
        """Fork the RNG and seed it per (seed, step, partition), so dropout masks do not depend on
        which partitions share a process or in which order they run."""
        if seed is None or pid not in self.random:
            return contextlib.nullcontext()
        return _seeded(self.devices[pid], _partition_seed(seed[0], seed[1], pid))

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
        h: dict[int, torch.Tensor] = {IMAGE: x}
        outs: dict[int, dict] = {}
        losses: dict[int, torch.Tensor] = {}
        for stage in self.stages:
            losses.update(self._forward_stage(stage, x, y, h, outs, active, with_loss, seed))
        return outs, losses

    def _forward_stage(self, stage: list[int], x: torch.Tensor, y: torch.Tensor, h: dict[int, torch.Tensor],
                       outs: dict[int, dict], active: set[int] | None, with_loss: bool,
                       seed: tuple[int, int] | None) -> dict[int, torch.Tensor]:
        """One module's partitions (siblings): bodies, aux heads, diversity exchange, losses.

        Fills ``h`` (body outputs) and ``outs`` (head outputs); returns the losses of the stage.
        """
        comm = self.comm
        for pid in stage:
            p, dev = self.parts[pid], self.devices[pid]
            if comm is not None:
                comm.recv_inputs(pid, h)
            grad = active is None or pid in active
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self._autocast(dev), \
                    self._rng(pid, seed):
                args = [h[i.source].to(dev, non_blocking=True) for i in p.inputs]
                h[pid] = self.modules[pid].body(*args)
            if comm is not None:
                comm.send_output(pid, h[pid])
        live = [pid for pid in stage if active is None or pid in active]
        for pid in live:
            p, dev = self.parts[pid], self.devices[pid]
            if comm is not None:
                comm.recv_shares(pid, h)
            with torch.set_grad_enabled(torch.is_grad_enabled()), self._autocast(dev), \
                    self._rng(pid, None if seed is None else (seed[0], seed[1] + (1 << 40))):
                shares = [h[s.source][:, :s.channels].to(dev, non_blocking=True) for s in p.shares]
                outs[pid] = self.modules[pid].aux(h[pid], *shares)
        losses: dict[int, torch.Tensor] = {}
        if not with_loss:
            return losses
        p_hat: dict[int, torch.Tensor] = {}
        for pid in stage:
            lp = self.parts[pid].loss
            if lp.diversity_weight > 0 and pid in outs:
                p_hat[pid] = L.diversity_probs(outs[pid]["logits"].detach(), y.to(self.devices[pid]),
                                               lp.diversity_temperature)
        if comm is not None:
            comm.exchange_diversity(p_hat)
        for pid in live:
            p, dev = self.parts[pid], self.devices[pid]
            yd = y.to(dev, non_blocking=True)
            args = [outs[pid][k] for k in HEAD_KEYS if k in p.head_outputs] + [yd]
            if p.loss.kind == "infopro":
                args.append(self._image01(x).to(dev))
            if p.loss.diversity_weight > 0:
                args += [p_hat[s].to(dev) for s in p.siblings]
            losses[pid] = self.modules[pid].loss(*args)
        return losses

    def _image01(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised batch back in [0, 1] (InfoPro's reconstruction target); the mean/std
        tensors are made once per device, so a step copies nothing from the host."""
        cache = self._denorm_on
        if x.device not in cache:
            mean, std = self.denorm or ((0.0,), (1.0,))
            cache[x.device] = (torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1),
                               torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1))
        m, s = cache[x.device]
        return (x.float() * s + m).clamp(0, 1)

    # ------------------------------------------------------------------ training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, active: set[int] | None = None,
                   seed: tuple[int, int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """One optimisation step of every (active) partition.

        Module by module (sibling partitions together): forward, losses, backward — so only one
        module's activations are alive at a time, as in a hand-written local-learning loop. The
        optimizers step at the end (fused: one multi-tensor step per device), or right after each
        partition's backward (unfused); no partition reads another's parameters, so both orders
        give the same weights.

        Args:
            x, y: the batch.
            lr: learning rate of this step.
            active: partitions that train (sequential schedule); None = all.
            seed: ``(run seed, global step)``: seeds dropout per partition (see :meth:`_rng`).

        Returns:
            ``{pid: (detached loss, number of correct predictions or None)}``, on device (no host sync).
        """
        for pid in self.order:
            self.modules[pid].train(active is None or pid in active)
        h = StageOutputs({IMAGE: x})
        outs: dict[int, dict] = {}
        stats = {}
        pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (pid, loss, logits) for the stats
        for i, stage in enumerate(self.stages):
            fs = self.fused_stages.get(i)
            if fs is not None and self.comm is None and (active is None or all(p in active for p in stage)):
                stats.update(self._fused_stage_step(fs, stage, x, y, h))
                for src in self.release.get(i, ()):
                    h.pop(src, None)
                continue
            losses = self._forward_stage(stage, x, y, h, outs, active, True, seed)
            if self.fused:
                by_dev: dict[str, list[torch.Tensor]] = {}
                for pid, loss in losses.items():
                    by_dev.setdefault(str(self.devices[pid]), []).append(loss)
                for ls in by_dev.values():
                    total = ls[0]
                    for extra in ls[1:]:
                        total = total + extra
                    total.backward()
            else:
                for pid, loss in losses.items():
                    loss.backward()
                    opt = self.optimizers[pid]
                    set_lr(opt, lr)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for pid, loss in losses.items():
                pending.append((pid, loss, outs[pid].pop("logits", None)))
                outs[pid] = {}  # free the head outputs (and their graph) before the next module
            for src in self.release.get(i, ()):
                h.pop(src, None)  # no later module reads it
        if self.fused:
            for opt in self.optimizers.values():
                set_lr(opt, lr)
                step_all(opt)
                opt.zero_grad(set_to_none=True)
            if self._fused_grads:
                torch._foreach_zero_(self._fused_grads)
        stats.update(_stats(pending, y))
        return {pid: stats[pid] for pid in self.order if pid in stats}

    def _fused_stage_step(self, fs: FusedStage, stage: list[int], x: torch.Tensor, y: torch.Tensor,
                          h: StageOutputs) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Forward and backward of one sibling-fused module; its output goes into ``h`` whole."""
        if not fs.intact():
            raise RuntimeError(f"module {self.parts[stage[0]].module}: a partition's parameters were moved or "
                               "replaced after the Executor fused them; build the Executor after moving modules")
        p0, dev = self.parts[stage[0]], self.devices[stage[0]]
        fs.attach_grads()
        srcs = [i.source for i in p0.inputs]
        fused_in = h.get_fused(srcs) if fs.cat_input is not None else None
        inputs = [] if fused_in is not None else [h[s].to(dev, non_blocking=True) for s in srcs]
        yd = y.to(dev, non_blocking=True)
        with self._autocast(dev):
            out, logits, losses, total = fs.forward(inputs, fused_in, yd)
        h.put_fused(stage, out)
        total.backward()
        correct = (logits.detach().argmax(2) == yd.unsqueeze(1)).sum(0)
        return dict(zip(stage, zip(losses.detach().unbind(0), correct.unbind(0))))

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


@torch.no_grad()
def _stats(pending: list[tuple[int, torch.Tensor, torch.Tensor | None]], y: torch.Tensor
           ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{pid: (loss, correct predictions or None)}`` of per-partition modules, batched per device.

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
