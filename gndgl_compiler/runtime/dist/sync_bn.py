"""Synchronised BatchNorm over the data-parallel replicas of a partition (``train.sync_bn``), on any backend.

``torch.nn.SyncBatchNorm`` runs on CUDA only; this one is its arithmetic over ``torch.distributed`` collectives,
so replicas on gloo/CPU synchronise too. In training, each BatchNorm normalises with the statistics of the
*global* batch (all R replicas' rows of its stage column), and its running statistics follow them, so R replicas
compute what one process with the global batch computes, up to float rounding (``tests/distributed/test_sync_bn.py``):

    forward    per replica (n_r, mean_r, M2_r) per channel ─all_gather─▶ global (n, mean, var) (Chan's
               combination: no E[x²] − E[x]² cancellation) ─▶ y = γ·(x − mean)/√(var + ε) + β
    backward   per replica (Σ dy, Σ dy·x̂) ─all_reduce─▶ dx = γ/σ·(dy − Σdy/n − x̂·Σ(dy·x̂)/n); dγ, dβ
               stay local sums (the replicas' gradient mean, ``replicas.GradAverager``, completes them)

A replica's loss is the mean over its B/R rows, so its dy is R times the global batch's; every term above is
linear in dy, so the replicas' mean of the parameter gradients is the global batch's gradient exactly.
Outside training (evaluation), or without a group, it is plain ``F.batch_norm``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def synced_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                      eps: float, group: Any = None) -> torch.Tensor:
    """``F.batch_norm`` with the batch statistics of the whole ``group`` in training (plain without a group)."""
    if group is None or not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return _SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, group)


def _global_stats(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's (count, mean, biased variance) per channel (dim 1) of ``x``, combined from every replica's."""
    dims = [0, *range(2, x.dim())]
    n_r = x.numel() // x.shape[1]
    mean_r = x.mean(dims)
    m2_r = ((x - mean_r.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
    mine = torch.stack([torch.full_like(mean_r, n_r), mean_r, m2_r])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    counts, means, m2s = torch.stack(parts).unbind(1)  # each (R, C), in rank order on every replica
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return n, mean, m2 / n


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm in training with the group's statistics (module docstring); running statistics updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):  # noqa: ANN001
        n, mean, var = _global_stats(x, group)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        ctx.group, ctx.has_bias = group, bias is not None
        y = xhat if weight is None else xhat * weight.view(shape)
        return y if bias is None else y + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        xhat, invstd, weight, n = ctx.saved_tensors
        dims = [0, *range(2, dy.dim())]
        shape = (1, -1, *[1] * (dy.dim() - 2))
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            both = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            scale = invstd if weight is None else invstd * weight
            dx = scale.view(shape) * (dy - (both[0] / n).view(shape) - xhat * (both[1] / n).view(shape))
        dw = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


class SyncedBatchNorm(nn.Module):
    """A BatchNorm module synchronised over ``group``, holding the very parameters and buffers of the BatchNorm it
    replaces (same names: state dicts, optimizers and checkpoints do not change)."""

    def __init__(self, bn: nn.Module, group: Any) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats, self.group = bn.affine, bn.track_running_stats, group
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return synced_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                 self.momentum, self.eps, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, synchronised over the replicas"


def sync_batch_norms(modules: Mapping[Any, nn.Module], group: Any) -> int:
    """Replace every BatchNorm1d/2d inside ``modules`` (this process's partitions) by a :class:`SyncedBatchNorm`
    over ``group``, in place; returns how many. Call before the executor fuses siblings or builds optimizers."""
    swapped = 0
    for root in modules.values():
        for name, bn in list(root.named_modules()):
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.momentum is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, leaf, SyncedBatchNorm(bn, group))
                swapped += 1
    return swapped


__all__ = ["SyncedBatchNorm", "sync_batch_norms", "synced_batch_norm"]
