"""Optimizers and per-step learning-rate schedules (one per partition).

The schedule is a pure function of the global step, so resuming needs no
scheduler state: ``lr_at(step)`` is simply evaluated again.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from ...spec.models import Optimizer, Schedule


def make_optimizer(params: Iterable, opt: Optimizer | Mapping[str, Any],
                   foreach: bool | None = None, capturable: bool = False) -> torch.optim.Optimizer:
    """Build the optimizer of ``train.optimizer`` over ``params`` (parameters or param groups).

    Args:
        params: parameters, or a list of param-group dicts (one per partition).
        opt: the spec's optimizer section (kind, lr, momentum, nesterov, weight_decay, betas); plain
            data is checked as the spec checks it.
        foreach: use the multi-tensor kernels (None = PyTorch's default).
        capturable: Adam / AdamW keep their step count on the device and accept a tensor LR (CUDA
            graphs; ``runtime/step/lr.py``). SGD needs nothing: its tensor-LR step is ``device_lr.sgd_step``.
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


def run_lr(recipe: Any, step: int, spe: int, epochs: int) -> float:
    """Learning rate at ``step`` of a phase of ``epochs`` epochs, following any extension of the run.

    Args:
        recipe: the run's :class:`~gndgl_compiler.runtime.run.config.Recipe` (``optimizer.lr``, ``schedule``,
            ``extensions``).
        step: 0-based step within the phase.
        spe: steps per epoch.
        epochs: epochs of the phase.

    Returns:
        The learning rate (a pure function of its arguments).
    """
    for ext in reversed(recipe.extensions):
        start = ext.from_epoch * spe
        if step >= start:
            return lr_at(step - start, spe, ext.lr, ext.schedule, ext.epochs - ext.from_epoch)
    return lr_at(step, spe, recipe.optimizer.lr, recipe.schedule, epochs)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group."""
    for g in opt.param_groups:
        g["lr"] = lr


def step_all(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``, with the param groups that share hyper-parameters stepped by one multi-tensor call.

    The param groups (one per partition) and the per-parameter state stay as ``opt.step()`` keeps
    them, so ``state_dict`` is unchanged; the update is the same element-wise math, so the weights
    are bit-for-bit those of ``opt.step()`` (``tests/runtime/step/test_optim_merge.py``). Multi-tensor SGD and
    Adam / AdamW are merged; any other optimizer or setting just steps.

    Args:
        opt: the optimizer.
    """
    # ``fused`` here is torch's fused-kernel flag (never set by make_optimizer), not sibling fusion nor
    # one optimizer per device (docs/architecture.md "Three things once called fused")
    if any(not g.get("foreach") or g.get("fused") or g.get("differentiable") for g in opt.param_groups):
        opt.step()
    elif type(opt) is torch.optim.SGD:
        _sgd_step_all(opt)
    elif type(opt) in (torch.optim.Adam, torch.optim.AdamW) and _adam_mergeable(opt):
        _adam_step_all(opt)
    else:
        opt.step()


def _sgd_step_all(opt: torch.optim.SGD) -> None:
    """SGD's step with the groups of equal hyper-parameters in one foreach call (see :func:`step_all`)."""
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


_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "decoupled_weight_decay")


def _adam_mergeable(opt: torch.optim.Optimizer) -> bool:
    """Whether this torch's Adam exposes what :func:`_adam_step_all` calls (else ``opt.step()``)."""
    return hasattr(opt, "_init_group") and all(k in g for g in opt.param_groups for k in _ADAM_KEYS) \
        and not any(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)


def _adam_step_all(opt: torch.optim.Optimizer) -> None:
    """Adam / AdamW's step with the groups of equal hyper-parameters in one foreach call.

    Each group is prepared by the optimizer itself (``_init_group``: lazy state, step counts), then
    the lists of all groups with the same hyper-parameters go through ``torch.optim.adam.adam`` at
    once: per tensor the same element-wise math with its own step count, so bit for bit ``opt.step()``.
    """
    from torch.optim.adam import adam

    buckets: dict[tuple, tuple[list, ...]] = {}
    complex_: dict[tuple, bool] = {}
    for g in opt.param_groups:
        key = tuple(tuple(g[k]) if k == "betas" else g[k] for k in _ADAM_KEYS)
        lists = buckets.setdefault(key, ([], [], [], [], [], []))
        with torch.no_grad():
            complex_[key] = bool(opt._init_group(g, *lists)) or complex_.get(key, False)
    with torch.no_grad():
        for key, (params, grads, avgs, sqs, max_sqs, steps) in buckets.items():
            if not params:
                continue
            conf = dict(zip(_ADAM_KEYS, key))
            adam(params, grads, avgs, sqs, max_sqs, steps, foreach=True, capturable=conf["capturable"],
                 has_complex=complex_[key], decoupled_weight_decay=conf["decoupled_weight_decay"],
                 amsgrad=conf["amsgrad"], beta1=conf["betas"][0], beta2=conf["betas"][1], lr=conf["lr"],
                 weight_decay=conf["weight_decay"], eps=conf["eps"], maximize=conf["maximize"])
