"""What differs between one process and a rank of a distributed run, behind one object's methods.

:class:`LocalContext` is rank 0 of 1; :class:`DistContext` is one of ``world`` ranks, each
training the partitions placed on it and sending activations through its ``transport``. Both
hold a :class:`~gndgl_compiler.runtime.dist.transport.Transport` (one process: ``LocalTransport``,
whose hooks do nothing; a rank: its ``PeerComm``), so the executor and the trainer call its hooks
unconditionally. The trainer calls the same methods either way, so its loop has no
``if world > 1`` branches:

    is_main              this process writes the run directory's shared files, evaluates, reports
    checkpoint_dir       checkpoints/            | checkpoints/rank<r>/
    latest_checkpoint    newest usable one       | this rank's part of the newest committed step
                         (written by another number of processes: re-placed, ``runtime/checkpoint/replace.py``)
    commit               nothing                 | barrier, rank 0 writes commit-<step>.json, barrier
    evaluator            the training executor   | one over every rank's committed weights
    final_weights        this process's modules  | every rank's last checkpoint, on rank 0
    begin_step, drain    the transport's hooks: LocalTransport's do nothing | PeerComm's step window
    shard, grad_sync     the whole batch, none   | with replicas: rows r::R, the stage column's gradient mean
    writes_checkpoints   yes                     | replica 0 only (with replicas; ``runtime/dist/replicas.py``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ...artifact import state_tensors
from ...errors import RunError
from ..checkpoint.directory import LoadedCheckpoint
from ..checkpoint.ranks import (commit_checkpoint, committed_checkpoint, gather_modules, gather_tensors,
                              merge_rank_metrics, metrics_dir)
from ..checkpoint.replace import Source, checkpoint_source, fold_rank_metrics, replaced_checkpoint
from ..run.directory import usable_checkpoint
from ..run.signals import StopFlag
from .replicas import GradAverager, Layout, shard
from .transport import LocalTransport, Transport


class LocalContext:
    """One process training every partition (rank 0 of 1)."""

    rank = 0
    world = 1
    evaluates_checkpoints = False
    """Whether evaluation reads the checkpoint of this step (so it is written before evaluating)."""

    def __init__(self) -> None:
        self.transport: Transport = LocalTransport()
        """How tensors reach partitions in other processes (here: nowhere)."""

    @property
    def is_main(self) -> bool:
        """This process writes the shared files of the run directory, evaluates and reports."""
        return self.rank == 0

    def fuse_siblings(self, setting: bool) -> bool | frozenset[int]:
        """Whether sibling partitions run as one program (on a rank: the modules whose siblings all
        sit on it, ``step_plan.py``): the setting, or the module indices that may fuse (a context
        that reproduces a distributed run's fusion in one process returns those)."""
        return setting

    def setup_text(self, executor: Any) -> str:
        """What the run prints about how its modules execute."""
        return executor.fusion_summary()

    def checkpoint_dir(self, root: Path) -> Path:
        """Where this process writes its checkpoints."""
        return root

    @property
    def writes_checkpoints(self) -> bool:
        """This process writes its checkpoint files (a replica other than 0 only joins the commit)."""
        return True

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global batch (all of them)."""
        return x, y

    def grad_sync(self) -> GradAverager | None:
        """What averages a partition's gradients over its copies before its step (None: no copies)."""
        return None

    def bn_group(self) -> Any:
        """The process group BatchNorm synchronises its statistics over (``train.sync_bn``; None: not)."""
        return None

    def latest_checkpoint(self, root: Path, ex: Any) -> LoadedCheckpoint | None:
        """The checkpoint to resume from (None for a fresh run); one that ranks wrote is re-placed here.

        Args:
            root: ``checkpoints/``.
            ex: this process's executor (its plan, modules and updater say what to load and how).
        """
        src = checkpoint_source(root)
        if src is None and any(root.glob("commit-*.json")):
            raise RunError(f"'{root}' has committed steps of a distributed run but no step whose every rank file is "
                           "usable; restore the damaged files, or move the directory away to train again from step 0")
        if src is None or src.world is None:
            return usable_checkpoint(root)
        return self._replaced(root, src, ex)

    def _replaced(self, root: Path, src: Source, ex: Any) -> LoadedCheckpoint:
        """``src`` (written by another number of processes) re-placed for this process's partitions;
        the main process folds the old ranks' metric files into the run's."""
        loaded = replaced_checkpoint(root, src, ex.plan, set(ex.modules), ex.updater.state_dict())
        loaded.state["replaced_from"] = src.world or 1
        if self.is_main:
            fold_rank_metrics(root.parent, src)
        return loaded

    def metrics_dir(self, run_dir: Path) -> Path:
        """Where this process writes ``metrics.jsonl``."""
        return metrics_dir(run_dir, self.rank)

    def stop_flag(self) -> StopFlag:
        """SIGINT/SIGTERM handling: the first signal checkpoints and stops."""
        return StopFlag()

    def begin_step(self, step: int) -> None:
        """Before training step ``step``: the transport's step begins."""
        self.transport.begin_step(step)

    def drain(self) -> None:
        """Wait for the activations still in flight (before a checkpoint)."""
        self.transport.drain()

    def commit(self, root: Path, step: int) -> None:
        """Make the checkpoint of ``step`` the one to resume from."""

    def evaluator(self, executor: Any, root: Path, step: int, build: Callable[[dict], Any]) -> Any:
        """The executor that evaluates the network at ``step``."""
        return executor

    def final_weights(self, modules: dict, plan: Any, step: int, save: Callable[[], None], has_step: bool
                      ) -> dict[str, torch.Tensor] | None:
        """Every partition's final weights (None on a rank that does not write them).

        Args:
            modules: this process's partition modules.
            plan: the partition plan.
            step: the last step.
            save: writes this process's checkpoint of the last step.
            has_step: that checkpoint exists already.
        """
        return state_tensors(modules, plan)

    def rank_record(self, step: int) -> dict[str, Any]:
        """What a rank that does not write the summary returns."""
        return {"rank": self.rank, "steps": step, "bytes_sent": self.transport.bytes_sent}


class DistContext(LocalContext):
    """One rank of a distributed run: its partitions, its peer transport.

    Args:
        rank: this rank.
        world: the number of ranks.
        transport: this rank's transport (its ``PeerComm``, or a wrapper of it).
        run_dir: the run directory (rank 0 gathers the final weights and metrics there).
        grid: with data-parallel replicas, where this process sits (``rank``/``world`` are then its stage and
            the pipeline's ranks N); ``averager`` averages its stage column's gradients.
        bn_group: the stage column's group when BatchNorm is synchronised over the replicas (``train.sync_bn``).
    """

    evaluates_checkpoints = True

    def __init__(self, rank: int, world: int, transport: Transport, run_dir: Path, grid: Layout | None = None,
                 averager: GradAverager | None = None, bn_group: Any = None) -> None:
        self.rank, self.world, self.transport, self.run_dir = rank, world, transport, run_dir
        self.grid, self.averager, self._bn_group = grid, averager, bn_group

    @property
    def replica(self) -> int:
        """This process's replica (0 without replicas)."""
        return self.grid.replica if self.grid is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0 and self.replica == 0

    @property
    def writes_checkpoints(self) -> bool:
        return self.replica == 0

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replica r's rows ``r::R`` of the global batch."""
        return (x, y) if self.grid is None or self.grid.replicas == 1 else shard(x, y, self.grid)

    def grad_sync(self) -> GradAverager | None:
        return self.averager

    def bn_group(self) -> Any:
        return self._bn_group

    def metrics_dir(self, run_dir: Path) -> Path:
        """Replica 0's ranks: as without replicas; another replica's: ``ranks/replica<r>-<stage>/`` (not merged:
        its partitions' losses are replica 0's on other rows)."""
        if self.replica == 0:
            return metrics_dir(run_dir, self.rank)
        d = run_dir / "ranks" / f"replica{self.replica}-{self.rank}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def setup_text(self, executor: Any) -> str:
        """This rank's modules: which run sibling-fused, which per partition and why."""
        where = f"replica {self.replica} " if self.grid is not None and self.grid.replicas > 1 else ""
        return f"{where}rank {self.rank}: {executor.fusion_summary()}"

    def checkpoint_dir(self, root: Path) -> Path:
        return root / f"rank{self.rank}"

    def latest_checkpoint(self, root: Path, ex: Any) -> LoadedCheckpoint | None:
        src = checkpoint_source(root)
        if src is None or src.world == self.world:
            return committed_checkpoint(root, self.rank)
        from .peer import barrier

        loaded = self._replaced(root, src, ex)
        barrier()  # rank 0 has folded the old ranks' metrics before any rank truncates or opens its own
        return loaded

    def stop_flag(self) -> StopFlag:
        """The first signal interrupts at once: the launcher stops every rank together."""
        return StopFlag(immediate=True)

    def commit(self, root: Path, step: int) -> None:
        commit_checkpoint(root, step, self)

    def evaluator(self, executor: Any, root: Path, step: int, build: Callable[[dict], Any]) -> Any:
        """An executor over every partition, with the weights all ranks committed at ``step``."""
        return build(gather_modules(executor.plan, root, step, self.world))

    def final_weights(self, modules: dict, plan: Any, step: int, save: Callable[[], None], has_step: bool
                      ) -> dict[str, torch.Tensor] | None:
        """Checkpoint the last step on every rank; rank 0 gathers them (and merges the ranks' metrics)."""
        from .peer import barrier

        self.drain()
        if not has_step:
            save()
        barrier()
        if not self.is_main:
            return None
        final = gather_tensors(self.run_dir / "checkpoints", step, self.world)
        merge_rank_metrics(self.run_dir, self.world)
        return final
