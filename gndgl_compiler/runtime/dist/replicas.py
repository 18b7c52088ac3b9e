"""Data-parallel replicas of the partition pipeline: R copies of the N-rank pipeline on R·N processes.

    global rank g = r·N + s          replica r = g // N, stage s = g % N (the s-th rank of the pipeline)

            stage 0      stage 1   ...  stage N-1
    r = 0   rank 0   ──▶ rank 1    ...  rank N-1       activations flow within a replica (PeerComm, offset r·N)
    r = 1   rank N   ──▶ rank N+1  ...  rank 2N-1
             │            │
             └ stage column: the R ranks holding the same partitions, the "replica" dimension of a
               torch.distributed DeviceMesh of shape (R, N), dimensions ("replica", "stage")

Every rank draws the same global batch (a function of seed, epoch and step); replica r trains its rows
``r::R`` (strided, so every replica sees every part of the batch order). After a partition's backward its
gradients are averaged over its stage column (one flattened all_reduce per partition; with the fused step one
per stage's backward, launched asynchronously so it overlaps the next stage's backward, and awaited before the
device's optimizer step), so the R copies stay equal and the step equals one process with the global batch up to
float rounding, when the loss is a batch mean and nothing couples the rows of a replica to the others (BatchNorm
keeps per-replica statistics, as DDP does, unless ``train.sync_bn``: ``sync_bn.py``; dropout draws per replica).
Replica 0 writes the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ...errors import DistributedSetupError


@dataclass(frozen=True)
class Layout:
    """Where one process sits in the (replica, stage) grid."""

    replicas: int
    """R: copies of the pipeline."""
    stages: int
    """N: ranks of one pipeline."""
    rank: int
    """This process's global rank."""

    @property
    def replica(self) -> int:
        """This process's replica r."""
        return self.rank // self.stages

    @property
    def stage(self) -> int:
        """This process's rank within its pipeline."""
        return self.rank % self.stages

    @property
    def offset(self) -> int:
        """Global rank of this replica's stage 0 (added to the pipeline's ranks for point-to-point messages)."""
        return self.replica * self.stages

    def column(self, stage: int) -> list[int]:
        """The global ranks holding ``stage``'s partitions, one per replica."""
        return [r * self.stages + stage for r in range(self.replicas)]


def layout(world: int, replicas: int, rank: int, batch_size: int) -> Layout:
    """The grid of ``world`` processes as ``replicas`` pipelines.

    Raises:
        DistributedSetupError: the processes are not R·N for a whole N ≥ 1, or R does not divide the batch.
    """
    if replicas < 1:
        raise DistributedSetupError(f"--replicas must be at least 1, got {replicas}")
    if world < replicas or world % replicas:
        raise DistributedSetupError(f"{replicas} replicas need R·N processes (N workers each), but {world} were "
                                    f"started; start a multiple of {replicas} (torchrun --nproc-per-node) or use "
                                    f"--replicas {_divisor(world, replicas)}")
    if batch_size % replicas:
        raise DistributedSetupError(f"{replicas} replicas do not divide the batch size {batch_size}: each replica "
                                    f"takes batch_size / replicas rows; use a multiple of {replicas} (--batch-size)")
    return Layout(replicas, world // replicas, rank)


def _divisor(world: int, replicas: int) -> int:
    """The largest replica count ≤ ``replicas`` that divides ``world`` (at least 1)."""
    return max(d for d in range(1, min(world, replicas) + 1) if world % d == 0)


def stage_groups(grid: Layout, device_type: str = "cpu") -> Any:
    """This process's stage-column group: the ``"replica"`` dimension of a ``DeviceMesh`` of shape (R, N) with
    dimensions ("replica", "stage") (global rank r·N + s at [r, s]; every process builds the whole mesh); None
    with one replica."""
    if grid.replicas == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (grid.replicas, grid.stages), mesh_dim_names=("replica", "stage"))
    assert list(mesh.get_coordinate() or []) == [grid.replica, grid.stage], f"mesh at {mesh.get_coordinate()}"
    return mesh.get_group("replica")


class GradAverager:
    """Averages gradients over a stage column: one all_reduce of the flattened gradients per call (a bucket).

    :meth:`start` launches it asynchronously (the updater overlaps it with the next stage's backward and waits
    before the optimizer step); calling the averager launches and waits at once.

    Args:
        group: the stage-column process group.
        replicas: its size R.
    """

    def __init__(self, group: Any, replicas: int) -> None:
        self.group, self.replicas = group, replicas
        self.bytes_reduced = 0
        """Gradient bytes this process all-reduced so far."""

    def start(self, params: list[torch.Tensor]) -> PendingMean | None:
        """Launch the all_reduce of the gradients of ``params`` (params without one are skipped; they are the same
        on every replica: the copies run the same program); None when there is nothing to reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        flat = _flatten_dense_tensors(grads)
        self.bytes_reduced += flat.numel() * flat.element_size()
        return PendingMean(dist.all_reduce(flat, group=self.group, async_op=True), flat, grads, self.replicas)

    def __call__(self, params: list[torch.Tensor]) -> None:
        """Replace every ``p.grad`` of ``params`` by its mean over the R replicas, now."""
        pending = self.start(params)
        if pending is not None:
            pending.wait()


@dataclass
class PendingMean:
    """An all_reduce in flight over a bucket of gradients; :meth:`wait` writes their means back."""

    work: Any
    """The collective's handle."""
    flat: torch.Tensor
    """The bucket: the gradients flattened into one tensor (summed over the replicas once done)."""
    grads: list[torch.Tensor]
    """The gradients the bucket holds, in order."""
    replicas: int
    """R: the sum becomes a mean."""

    def wait(self) -> None:
        """Wait for the sum, then write each gradient's mean over the replicas back in place."""
        self.work.wait()
        self.flat /= self.replicas
        for g, avg in zip(self.grads, _unflatten_dense_tensors(self.flat, self.grads)):
            g.copy_(avg)


def shard(x: torch.Tensor, y: torch.Tensor, grid: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica r's rows ``r::R`` of the global batch ``(x, y)``."""
    r, n = grid.replica, grid.replicas
    return x[r::n].contiguous(), y[r::n].contiguous()


__all__ = ["GradAverager", "Layout", "PendingMean", "layout", "shard", "stage_groups"]
