"""Updaters: own the optimizers of an Executor — backward, learning rate, step — and their checkpoint state.

Every partition keeps its own optimizer state and its own param group (tagged ``"pid"``), so
its hyper-parameters and state never mix with another partition's. Two layouts, same math:

    PartitionUpdater  one optimizer per partition; backward and step right after each partition
    DeviceUpdater     one multi-tensor optimizer per device (a param group per partition);
                      backward of Σ losses per device, one foreach step at the end of the step

The checkpoint code sees only :meth:`state_dict` / :meth:`load_state_dict` (the on-disk
``"optim"`` entry: ``{optimizer key: optimizer state_dict}``, keys ``str(pid)`` or the device).

Every step starts with :meth:`set_lr` (host side, before anything runs on the device). With
``lr_tensor`` (a CUDA-graph captured step) the DeviceUpdater keeps the LR in a 0-dim tensor per
device that ``set_lr`` fills in place and the optimizers read on the device (``runtime/step/lr.py``);
otherwise the LR is the Python float in each param group, as it always was (bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch

from ...codegen.modules import PartitionModule
from .lr import DeviceLR, plain_groups, sgd_step
from .optim import make_optimizer, set_lr, step_all


class _Updater:
    optimizers: dict[Any, torch.optim.Optimizer]
    device_lr: DeviceLR | None = None
    grad_sync: Any = None
    """Data-parallel replicas: a ``GradAverager`` (``runtime/dist/replicas.py``) that averages the gradients of the
    parameters it is given over the partition's copies: after a partition's backward, before its step (or, with
    one optimizer per device, launched after each stage's backward and awaited before the device's step)."""

    def _sync(self, opt: torch.optim.Optimizer) -> None:
        """Average the gradients of ``opt``'s parameters over the replicas (nothing without replicas)."""
        if self.grad_sync is not None:
            self.grad_sync([p for g in opt.param_groups for p in g["params"]])

    def set_lr(self, lr: float) -> None:
        """The step's LR, before the step runs (tensor LR: written on the device; else kept for the step)."""
        if self.device_lr is not None:
            self.device_lr.set(lr)

    def state_dict(self) -> dict[str, dict]:
        """The optimizers' state, by optimizer key (what a checkpoint stores as ``"optim"``; LRs as floats)."""
        return {str(k): plain_groups(o.state_dict()) for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state[str(key)])
        if self.device_lr is not None:
            self.device_lr.install()

    def partition_groups(self) -> dict[int, dict]:
        """``{pid: its param group}`` (per-partition hyper-parameters; the state is ``opt.state[param]``)."""
        out = {}
        for key, opt in self.optimizers.items():
            for g in opt.param_groups:
                out[g.get("pid", key)] = g
        return out


class PartitionUpdater(_Updater):
    """One optimizer per partition, stepped right after that partition's backward.

    Args:
        order: partition ids, in network order.
        modules: ``{pid: PartitionModule}``.
        optimizer: the spec's ``train.optimizer`` section.
    """

    def __init__(self, order: list[int], modules: dict[int, PartitionModule], optimizer: dict[str, Any]):
        self.optimizers = {pid: make_optimizer(modules[pid].parameters(), optimizer, foreach=False) for pid in order}

    def backward(self, losses: dict[int, torch.Tensor], lr: float) -> None:
        """Backward of each partition's loss, then its optimizer step at ``lr``."""
        for pid, loss in losses.items():
            loss.backward()
            opt = self.optimizers[pid]
            self._sync(opt)
            set_lr(opt, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def finish(self, lr: float) -> None:
        """End of the step (every partition has stepped already)."""


class DeviceUpdater(_Updater):
    """One multi-tensor optimizer per device, one param group per partition, stepped at the end of the step.

    Args:
        order: partition ids, in network order.
        modules: ``{pid: PartitionModule}``.
        optimizer: the spec's ``train.optimizer`` section.
        devices: ``{pid: device}``.
        fused_grads: gradient tensors of fused parameter storage (zeroed after each step).
        lr_tensor: keep the LR in a 0-dim tensor per device (a step that reads nothing on the host:
            CUDA graphs); equal to the float path to float rounding (``runtime/step/lr.py``).
    """

    def __init__(self, order: list[int], modules: dict[int, PartitionModule], optimizer: dict[str, Any],
                 devices: dict[int, torch.device], fused_grads: list[torch.Tensor] | None = None,
                 lr_tensor: bool = False):
        self.devices = devices
        self.fused_grads = fused_grads or []
        self.params = {pid: list(modules[pid].parameters()) for pid in order}
        """Each partition's parameters (a replica's gradient bucket is the partitions of one backward)."""
        self._pending: list[Any] = []
        """This step's gradient all_reduces in flight (``PendingMean``), awaited in :meth:`finish`."""
        by_dev: dict[torch.device, list[dict]] = {}
        for pid in order:
            by_dev.setdefault(devices[pid], []).append({"params": list(modules[pid].parameters()), "pid": pid})
        self.optimizers = {str(dev): make_optimizer(groups, optimizer, foreach=True,
                                                    capturable=lr_tensor and dev.type == "cuda")
                           for dev, groups in by_dev.items()}
        if lr_tensor:
            kinds = {type(o) for o in self.optimizers.values()}
            if kinds - {torch.optim.SGD} and any(dev.type != "cuda" for dev in by_dev):
                raise ValueError("a tensor learning rate with Adam/AdamW needs CUDA (capturable=True)")
            self.device_lr = DeviceLR(self.optimizers)

    def backward(self, losses: dict[int, torch.Tensor], lr: float) -> None:
        """Backward of the sum of the losses on each device (the step comes in :meth:`finish`); with replicas,
        the all_reduce of those partitions' gradients starts (it runs while the next stage computes)."""
        by_dev: dict[str, list[int]] = {}
        for pid in losses:
            by_dev.setdefault(str(self.devices[pid]), []).append(pid)
        for pids in by_dev.values():
            total = losses[pids[0]]
            for pid in pids[1:]:
                total = total + losses[pid]
            total.backward()
            if self.grad_sync is not None:  # no gradient crosses a partition: these are final for this step
                self._pending.append(self.grad_sync.start([p for pid in pids for p in self.params[pid]]))

    def finish(self, lr: float) -> None:
        """One foreach optimizer step per device at ``lr`` (after the replicas' gradient means); zero the
        gradients."""
        for pending in self._pending:
            if pending is not None:
                pending.wait()
        self._pending.clear()
        for opt in self.optimizers.values():
            if self.device_lr is None:
                set_lr(opt, lr)
                step_all(opt)
            elif type(opt) is torch.optim.SGD:
                sgd_step(opt)
            else:
                opt.step()  # Adam / AdamW, capturable: the tensor LR is read on the device
            opt.zero_grad(set_to_none=True)
        if self.fused_grads:
            torch._foreach_zero_(self.fused_grads)
