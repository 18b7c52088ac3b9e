"""Progress events: what the training loop tells a display, step by step.

The loop calls ``on_progress(event)`` once per training step, per evaluation batch and
per decoded image chunk. An event is plain host data (no tensors), so reporting never
synchronises with the device; a display decides how often it redraws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """Where a phase of the run stands."""

    phase: str
    """``"data"`` (decoding images), ``"train"`` or ``"eval"``."""
    done: int
    """Units done in this phase: images decoded, steps of this epoch, test batches."""
    total: int | None
    """Units in this phase (None when unknown)."""
    epoch: int = 0
    """0-based epoch (train/eval)."""
    epochs: int = 0
    """Epochs of the run (train/eval)."""
    step: int = 0
    """Global step after this one (train)."""
    steps: int = 0
    """Global step the run stops at (train): the end of its schedule, or ``max_steps`` when that comes first."""
    images: int = 0
    """Images in this step (train) or batch (eval)."""


ProgressFn = Callable[[ProgressEvent], None]


def counted(items: Iterable[T], total: int | None, report: ProgressFn | None, phase: str, **fields) -> Iterator[T]:
    """Yield ``items`` and report a :class:`ProgressEvent` after each one.

    Args:
        items: the iterable (e.g. test batches).
        total: how many there are (None if unknown).
        report: the callback; None yields the items unchanged.
        phase: the event's phase.
        **fields: further :class:`ProgressEvent` fields (epoch, epochs).

    Returns:
        An iterator over ``items``.
    """
    if report is None:
        yield from items
        return
    report(ProgressEvent(phase, 0, total, **fields))
    for i, item in enumerate(items, 1):
        yield item
        report(ProgressEvent(phase, i, total, **fields))
