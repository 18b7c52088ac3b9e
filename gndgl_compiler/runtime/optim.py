"""Optimizers and per-step learning-rate schedules (one per partition).

The schedule is a pure function of the global step, so resuming needs no
scheduler state: ``lr_at(step)`` is simply evaluated again.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from ..spec.models import Optimizer, Schedule


def make_optimizer(params: Iterable, opt: Optimizer | Mapping[str, Any],
                   foreach: bool | None = None, capturable: bool = False) -> torch.optim.Optimizer:
    """Build the optimizer of ``train.optimizer`` over ``params`` (parameters or param groups).

    Args:
        params: parameters, or a list of param-group dicts (one per partition).
        opt: the spec's optimizer section (kind, lr, momentum, nesterov, weight_decay, betas); plain
            data is checked as the spec checks it.
        foreach: use the multi-tensor kernels (None = PyTorch's default).
        capturable: Adam / AdamW keep their step count on the device and accept a tensor LR (CUDA
            graphs; ``runtime/device_lr.py``). SGD needs nothing: its tensor-LR step is ``device_lr.sgd_step``.
    """
    if not isinstance(opt, Optimizer):
        opt = Optimizer.model_validate(dict(opt))
    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay, foreach=foreach)
    cls = torch.optim.Adam if opt.kind == "adam" else torch.optim.AdamW
    extra = {"capturable": True} if capturable else {}
    return cls(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, foreach=foreach, **extra)


def lr_at(step: int, steps_per_epoch: int, base_lr: float, sched: Schedule, total_epochs: int) -> float:
    """Learning rate at global ``step`` (0-based) of a run of ``total_epochs`` epochs.

    cosine: linear warm-up from ``warmup_start_lr`` to ``base_lr`` over ``warmup_epochs``, then
    cosine decay to ``min_lr`` at the last step. multistep: ``base_lr`` then ``values[i]`` (or
    ``base_lr · gamma^(i+1)``) from epoch ``milestones[i]`` on (after the same warm-up). constant.
    """
    spe = max(1, steps_per_epoch)
    warm = int(round(sched.warmup_epochs * spe))
    if step < warm:
        start = sched.warmup_start_lr
        return start + (base_lr - start) * step / warm
    if sched.kind == "constant":
        return base_lr
    if sched.kind == "multistep":
        lr = base_lr
        for i, m in enumerate(sched.milestones):
            if step >= int(round(m * spe)):
                lr = sched.values[i] if sched.values else base_lr * sched.gamma ** (i + 1)
        return lr
    total = max(1, total_epochs * spe - warm)
    t = min(1.0, (step - warm) / total)
    lo = sched.min_lr
    return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group."""
    for g in opt.param_groups:
        g["lr"] = lr


def step_all(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``, with SGD's param groups that share hyper-parameters stepped by one multi-tensor call.

    The param groups (one per partition) and the per-parameter state stay as ``opt.step()`` keeps
    them, so ``state_dict`` is unchanged; the update is the same element-wise math, so the weights
    are bit-for-bit those of ``opt.step()``. Optimizers other than multi-tensor SGD just step.

    Args:
        opt: the optimizer.
    """
    if type(opt) is not torch.optim.SGD or any(not g["foreach"] or g["fused"] or g["differentiable"]
                                                for g in opt.param_groups):
        opt.step()
        return
    from torch.optim.sgd import sgd

    buckets: dict[tuple, tuple[list, list, list]] = {}
    for g in opt.param_groups:
        key = (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["maximize"])
        params, grads, bufs = buckets.setdefault(key, ([], [], []))
        for p in g["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    opt.step()
                    return
                params.append(p)
                grads.append(p.grad)
                bufs.append(opt.state[p].get("momentum_buffer") if g["momentum"] != 0 else None)
    with torch.no_grad():
        for (lr, momentum, dampening, wd, nesterov, maximize), (params, grads, bufs) in buckets.items():
            if not params:
                continue
            sgd(params, grads, bufs, foreach=True, weight_decay=wd, momentum=momentum, lr=lr,
                dampening=dampening, nesterov=nesterov, maximize=maximize)
            if momentum != 0:
                for p, buf in zip(params, bufs):
                    opt.state[p]["momentum_buffer"] = buf
