"""What the training loop carries from step to step: where it stands (:class:`TrainState`) and
the metrics since the last log record (:class:`MetricsWindow`); both go into every checkpoint.
:class:`Reporter` sends the loop's records where they are read (metrics files, the caller)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .metrics import MetricsLogger, check_finite, log_records
from .run.progress import ProgressEvent, ProgressFn


@dataclass
class TrainState:
    """Where the run stands (its checkpointed fields: ``epoch``, ``step_in_epoch``, ``step``, ``history``)."""

    epoch: int = 0
    """0-based epoch being trained (== the run's epochs once it is done)."""
    step_in_epoch: int = 0
    """Steps of ``epoch`` done."""
    step: int = 0
    """Global steps done."""
    history: list[dict] = field(default_factory=list)
    """One ``{"epoch", "test_acc", "ensemble_acc"}`` per evaluated epoch."""
    images: int = 0
    """Images trained on in this attempt (for images/s)."""
    lr: float = 0.0
    """The learning rate of the last step."""
    done: bool = False
    """Stopped by ``--max-steps`` or a signal before the end of the run."""
    interrupted: bool = False
    """Stopped by a signal (SIGINT/SIGTERM)."""
    wall_before: float = 0.0
    """Seconds the run trained before this attempt (up to the checkpoint it resumed from)."""
    t_start: float = field(default_factory=time.time)
    """When this attempt started training."""

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint's state."""
        self.epoch, self.step_in_epoch = saved["epoch"], saved["step_in_epoch"]
        self.step, self.history = saved["step"], saved["history"]
        self.wall_before = float(saved.get("wall_s", 0.0))  # checkpoints written before it was recorded: 0

    def wall_s(self) -> float:
        """Seconds the run has trained, over every attempt (resumes and extensions add up)."""
        return self.wall_before + time.time() - self.t_start

    def advance(self, step_in_epoch: int, images: int, lr: float) -> None:
        """Count one trained step (``step_in_epoch``: its 0-based index in the epoch)."""
        self.step_in_epoch, self.step, self.images, self.lr = step_in_epoch + 1, self.step + 1, self.images + images, lr

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


class MetricsWindow:
    """Per-partition loss and correct-prediction sums since the last log record.

    The sums stay on the device (no sync per step); a checkpoint stores them, so a resumed run
    logs the same averages as an uninterrupted one.
    """

    def __init__(self, names: dict[int, str], batch_size: int) -> None:
        self.names, self.batch_size = names, batch_size
        self.loss: dict[int, torch.Tensor] = {}
        self.correct: dict[int, torch.Tensor] = {}
        self.n = 0
        self.t0 = time.time()

    def add(self, stats: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Add one step's ``{partition: (loss, correct or None)}``."""
        for pid, (loss, correct) in stats.items():
            self.loss[pid] = self.loss.get(pid, 0) + loss.float()
            if correct is not None:
                self.correct[pid] = self.correct.get(pid, 0) + correct
        self.n += 1

    def restart_clock(self) -> None:
        """Measure images/s from now (start of an epoch)."""
        self.t0 = time.time()

    def records(self, epoch: int, step: int, lr: float) -> list[dict]:
        """One ``train`` record per partition: mean loss, local accuracy, images/s since the last record."""
        ips = self.n * self.batch_size / max(time.time() - self.t0, 1e-9)
        return log_records(self.loss, self.correct, self.n, self.batch_size, self.names, epoch, step, lr, ips)

    def clear(self) -> None:
        """Start the next window."""
        self.loss, self.correct, self.n, self.t0 = {}, {}, 0, time.time()

    def check_finite(self, step: int) -> None:
        """Raise before a checkpoint could store weights trained on a non-finite loss."""
        check_finite(self.loss, self.names, step)

    def state(self) -> dict[str, Any]:
        """As stored in a checkpoint."""
        return {"n": self.n, "loss": {str(k): float(v) for k, v in self.loss.items()},
                "correct": {str(k): int(v) for k, v in self.correct.items()}}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue the window a checkpoint stored (None: an empty one)."""
        if saved:
            self.loss = {int(k): torch.tensor(v, dtype=torch.float32) for k, v in saved["loss"].items()}
            self.correct = {int(k): torch.tensor(v) for k, v in saved["correct"].items()}
            self.n = saved["n"]


class Reporter:
    """Where the loop's records go: ``metrics.jsonl`` (and TensorBoard) and the caller's callbacks."""

    def __init__(self, logger: MetricsLogger, on_log: Callable[[dict], None] | None,
                 on_progress: ProgressFn | None) -> None:
        self.logger, self.on_log, self.on_progress = logger, on_log, on_progress

    def record(self, rec: dict) -> None:
        """A metrics record: written, and shown."""
        self.logger.log(rec)
        self.show(rec)

    def show(self, rec: dict) -> None:
        """A record for the caller only (notes, the unlogged last window before a stop)."""
        if self.on_log:
            self.on_log(rec)

    def note(self, text: str) -> None:
        """A line of text for the caller."""
        self.show({"kind": "note", "text": text})

    def progress(self, event: ProgressEvent) -> None:
        """A progress event (host data only)."""
        if self.on_progress:
            self.on_progress(event)
