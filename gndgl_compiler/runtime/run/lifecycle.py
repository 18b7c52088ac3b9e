"""One run lifecycle for every entry point (``gndgl train``'s launcher, :func:`~..train.train_artifact`, the
distributed worker): settle a run's config (new or resumed), make or reopen its directory, and undo a start
that failed on bad input.

    new run:    new_run(art, opts) ─▶ make_run(...) ─▶ Started ──┐
    resume:     resume_run(dir, opts) ─▶ Resumed ─▶ .record()    ├─▶ Trainer(...).fit()
    launcher:   new_run(...) ─▶ reserve_run(...) (empty dir) ────┘   (the ranks fill it)
    failed start on bad input:  ``with undo_failed_start(started, errors): ...`` ─▶ discard_unstarted

Nothing here changes the :class:`~.options.TrainOptions` it is given.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ...api import Artifact
from .config import RunConfig, new_run_config
from .directory import create_run, discard_unstarted, new_run_dir, record_changes, reopen_run
from .options import TrainOptions
from .record import RunRecord


@dataclass(frozen=True)
class Resumed:
    """A run to continue: its artifact, its config with the resume options applied, and what changed."""

    run_dir: Path
    art: Artifact
    config: RunConfig
    saved: RunRecord = field(repr=False)
    """Its ``run.json`` record with the changes applied (written by :meth:`record`)."""
    notes: tuple[str, ...] = ()
    """One line per applied change (``--epochs``, ``--device``, another number of workers, ...)."""

    def record(self) -> str | None:
        """Write the changes to ``run.json`` (once per run: rank 0); the note to show, or None if nothing changed."""
        if not self.notes:
            return None
        record_changes(self.run_dir, self.saved)
        return "resume: " + "; ".join(self.notes)


@dataclass(frozen=True)
class Started:
    """A run directory this command made (or filled) for a new run."""

    run_dir: Path
    fresh: bool
    """It did not exist before this command (undoing removes it; else undoing empties it)."""


def new_run(art: Artifact, opts: TrainOptions) -> RunConfig:
    """The config of a new run of ``art`` with ``opts`` (checked; nothing written)."""
    return new_run_config(art.spec["train"], opts)


def resume_run(run_dir: str | Path, opts: TrainOptions, *, world: int = 1, verify: bool = True) -> Resumed:
    """The run in ``run_dir`` to continue on ``world`` processes with ``opts`` (checked; nothing written).

    Raises:
        RunError: not a run directory, a damaged one, or an option that cannot change on resume.
    """
    art, config, saved, notes = reopen_run(run_dir, opts, world=world, verify=verify)
    return Resumed(Path(run_dir), art, config, saved, tuple(notes))


def _fresh(requested: str | Path | None) -> bool:
    return not (requested and Path(requested).exists())


def make_run(art: Artifact, config: RunConfig, requested: str | Path | None, *, world: int = 1) -> Started:
    """Make the directory of a new run (artifact copy and ``run.json``): ``requested`` or ``runs/<name>-<time>``."""
    fresh = _fresh(requested)
    return Started(create_run(art, config, str(requested) if requested else None, world=world), fresh)


def reserve_run(name: str, requested: str | Path | None) -> Started:
    """An empty directory for a new run that other processes fill (``gndgl train --workers N``)."""
    fresh = _fresh(requested)
    return Started(new_run_dir(name, str(requested) if requested else None), fresh)


@contextlib.contextmanager
def undo_failed_start(started: Started | None, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Undo ``started`` (None: nothing to undo, e.g. a resumed run) if the block raises one of ``errors`` (a start
    that failed on bad input: nothing was trained), so the same command works once the input is fixed."""
    try:
        yield
    except errors:
        if started is not None:
            discard_unstarted(started.run_dir, started.fresh)
        raise


def with_run_dir(opts: Any, started: Started) -> Any:
    """``opts`` (a copy) naming ``started``'s directory as ``--run-dir``."""
    from dataclasses import replace

    return replace(opts, run_dir=str(started.run_dir))


__all__ = ["Resumed", "Started", "make_run", "new_run", "reserve_run", "resume_run", "undo_failed_start",
           "with_run_dir"]
