"""Run directories: create, find and validate them (both entry points use this).

    runs/<name>-<time>/
        artifact/            the compiled network (a copy; hashes checked on load)
        run.json             the training settings (checked field by field on every read)
        data.json            input normalisation and classes (load_run, gndgl export)
        checkpoints/         ckpt-<step>.{safetensors,json}, newest valid one used
        metrics.jsonl/.csv   summary.json   weights.safetensors
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ...api import Artifact, load_artifact
from ...errors import GndglError, RunError
from ... import fsio
from ..checkpoint.directory import latest_valid_checkpoint
from .config import RunConfig
from .record import RunRecord
from ..checkpoint.ranks import gather_tensors, latest_commit
from ..checkpoint.replace import checkpoint_source
from .options import TrainOptions

DATA_RECORD = "data.json"
"""Run-directory file with the input normalisation and class names the run trained with."""


def new_run_dir(name: str, requested: str | None) -> Path:
    """Make an empty directory for a new run: ``requested`` (which must be empty or absent) or
    ``runs/<name>-<time>`` (a unique one).

    Raises:
        RunError: ``requested`` is a file or not empty, or the directory cannot be created.
    """
    if requested:
        from .preflight import check_new_run_dir

        check_new_run_dir(requested)
        d = Path(requested)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        d = Path("runs") / f"{name}-{stamp}"
        i = 1
        while d.exists():
            d, i = Path("runs") / f"{name}-{stamp}-{i}", i + 1
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create run directory '{d}': {exc.strerror}; choose another with --run-dir") from None
    return d


def create_run(art: Artifact, config: RunConfig, requested: str | None, *, world: int = 1) -> Path:
    """Make the directory of a new run: a copy of the artifact and ``run.json``.

    Args:
        art: the compiled artifact (copied when it has a directory).
        config: the run's settings (recorded in ``run.json``).
        requested: ``--run-dir`` (default ``runs/<name>-<time>``).
        world: number of processes the run trains with.

    Raises:
        RunError: the requested directory is not empty or cannot be created.
    """
    run_dir = new_run_dir(art.plan.name, requested)
    if art.path is not None:
        shutil.copytree(art.path, run_dir / "artifact", dirs_exist_ok=True)
    write_run_record(run_dir, RunRecord.new(config, world=world, source=str(art.path)).to_json())
    return run_dir


def read_run_config(run_dir: str | Path, opts: TrainOptions | None = None) -> RunConfig:
    """The checked settings of a run directory, with ``opts``' settings of this attempt (``--max-steps``, ...)."""
    return load_run_record(run_dir).run_config(opts)


def reopen_run(run_dir: str | Path, opts: TrainOptions, *, world: int = 1, verify: bool = True
               ) -> tuple[Artifact, RunConfig, RunRecord, list[str]]:
    """The settings to resume a run with: ``run.json`` checked, the resume options applied.

    Args:
        run_dir: the run directory.
        opts: the options given (see ``runtime/run/resume.py`` for which may change).
        world: number of processes the run continues with (another than before: recorded, and the
            checkpoint re-placed when it loads).
        verify: check the hashes of the run's artifact (once per run, not once per rank).

    Returns:
        ``(artifact, config, record, notes)``: the run's copy of its artifact, the config, the
        updated ``run.json`` record (write it with :func:`record_changes` when there are notes)
        and one line per applied change.

    Raises:
        RunError: not a run directory, a damaged one, or an option that cannot change.
    """
    from .resume import resume_config

    run_dir = Path(run_dir)
    record = check_resume_world(run_dir, world)
    art = (load_run_artifact(run_dir, record.to_json()) if verify
           else load_artifact(run_dir / "artifact", verify=False))
    config, notes, record = resume_config(run_dir, record, opts, sequential=art.plan.schedule == "sequential")
    if record.world != world:  # the checkpoints are re-placed for the new number on load (checkpoint/replace.py)
        notes.append(f"workers: {record.world} → {world} (partitions re-placed from the per-partition checkpoints)")
        record = record.changed({"world": world}, world=world)
    return art, config, record, notes


def record_changes(run_dir: str | Path, record: RunRecord) -> None:
    """Write the ``run.json`` record that :func:`reopen_run` updated."""
    write_run_record(run_dir, record.to_json())


def latest_run(root: str | Path = "runs", need: str = "weights") -> Path:
    """The newest run under ``root`` that has what ``need`` asks for (see :func:`newest_run`)."""
    return newest_run(root, need)[0]


def newest_run(root: str | Path = "runs", need: str = "weights") -> tuple[Path, list[str]]:
    """The most recently started run under ``root`` with something to show (``gndgl eval`` / ``plot`` /
    ``export`` and ``load_run`` without a run).

    Args:
        root: the folder of runs.
        need: ``"weights"`` (final weights or a checkpoint: eval, export, load_run) or ``"metrics"``
            (a ``train`` or ``eval`` record in ``metrics.jsonl``: plot).

    Returns:
        ``(run, skipped)``: the run, and one line per newer run passed over, saying why (e.g. a start that
        failed on bad input, or a run stopped before its first checkpoint).

    Raises:
        RunError: ``root`` holds no run directory, or none has what ``need`` asks for.
    """
    root = Path(root)
    runs = [d for d in root.iterdir() if (d / "run.json").is_file()] if root.is_dir() else []
    if not runs:
        raise RunError(f"no run directory in '{root}/'; pass one (gndgl train writes runs/NAME-TIME/)")
    skipped = []
    for d in sorted(runs, key=lambda d: (d / "run.json").stat().st_mtime, reverse=True):
        missing = _missing(d, need)
        if missing is None:
            return d, skipped
        skipped.append(f"{d} ({missing})")
    what = "weights or checkpoints" if need == "weights" else "metrics records"
    raise RunError(f"no run in '{root}/' has {what} yet: {'; '.join(skipped[:3])}"
                   f"{f'; and {len(skipped) - 3} more' if len(skipped) > 3 else ''}. Train one first "
                   "(gndgl train), or pass a run directory")


def _missing(run_dir: Path, need: str) -> str | None:
    """Why ``run_dir`` has nothing to show for ``need`` (None: it has)."""
    ckpt = run_dir / "checkpoints"
    if need == "weights":
        has = (run_dir / "weights.safetensors").is_file() or (ckpt.is_dir() and (
            any(ckpt.glob("ckpt-*.json")) or any(ckpt.glob("commit-*.json"))))  # one process | committed ranks
        return None if has else "no weights or checkpoints yet"
    from ..metrics import read_metrics

    try:
        records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    except GndglError as exc:
        return f"metrics.jsonl unreadable: {exc}"
    return None if any(r.get("kind") in ("train", "eval") for r in records) else "no metrics records yet"


def write_run_record(run_dir: str | Path, record: dict) -> Path:
    """Write ``run.json`` (the run's settings) atomically and durably.

    Raises:
        TrainingError: it cannot be written (path and OS reason given).
    """
    return fsio.atomic_write_json(Path(run_dir) / "run.json", record)


def load_run_record(run_dir: str | Path) -> RunRecord:
    """The checked ``run.json`` of a run directory (its training settings).

    Returns:
        The record; ``config`` holds every field of the spec's ``train`` section.

    Raises:
        RunError: not a run directory; ``run.json`` or ``artifact/`` missing; ``run.json``
            unreadable or with a missing or ill-typed setting (naming the file and field).
    """
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    has_artifact, has_record = (run_dir / "artifact").is_dir(), path.is_file()
    if not has_artifact and not has_record:
        raise RunError(f"'{run_dir}' is not a gndgl run directory (expected artifact/ and run.json inside); "
                       "give the directory 'gndgl train' created")
    if not has_record:
        raise RunError(f"'{path}' is missing; it holds the settings of the run in '{run_dir}', which cannot be "
                       "resumed or evaluated without it. Restore it, or start a new run")
    if not has_artifact:
        raise RunError(f"'{run_dir / 'artifact'}' is missing; it holds the compiled network of the run. Restore it "
                       "(a copy of the artifact the run was started from), or start a new run")
    try:
        return RunRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"'{path}' is unreadable or damaged ({exc}); restore it, or start a new run") from None


def read_run_record(run_dir: str | Path) -> dict:
    """The checked ``run.json`` of a run directory as plain data (:func:`load_run_record`'s ``to_json()``).

    Raises:
        RunError: see :func:`load_run_record`.
    """
    return load_run_record(run_dir).to_json()


def load_run_artifact(run_dir: Path, saved: dict) -> Artifact:
    """The run's own copy of its artifact; a damaged file is named with the fix for a run directory."""
    source = saved.get("source")
    origin = f" (e.g. from '{source}', if it was not recompiled since)" if source and source != "None" else ""
    return load_artifact(run_dir / "artifact", remedy=f"the run directory was modified: restore the file{origin}, "
                                                      "or start a new run")


def check_resume_world(run_dir: str | Path, world: int) -> RunRecord:
    """Check that ``run_dir`` is a run directory that ``world`` processes can continue.

    Any number can: partitions are re-placed for it from the per-partition checkpoints
    (``runtime/checkpoint/replace.py``); whether ``world`` ranks fit the plan is checked where they start.

    Returns:
        The run's ``run.json`` record (see :func:`read_run_record`).

    Raises:
        RunError: not a run directory, or a damaged ``run.json``.
    """
    if world < 1:
        raise RunError(f"cannot resume '{run_dir}' on {world} processes; give --workers 1 or more")
    return load_run_record(Path(run_dir))


def discard_unstarted(run_dir: Path, fresh: bool) -> None:
    """Undo a run directory whose start failed on bad input (nothing was trained in it), so the
    same command works once the input is fixed and ``gndgl eval`` / ``plot`` do not pick it.

    Args:
        run_dir: the run directory.
        fresh: it did not exist before this command (removed; else only emptied). A directory with
            checkpoints is left as it is.
    """
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        return
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for child in run_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def usable_checkpoint(ckpt_dir: Path):
    """The newest valid checkpoint in ``ckpt_dir`` (None if there are none).

    Raises:
        RunError: there are checkpoints but none is usable (a checkpointed run is never
            silently started again from step 0).
    """
    problems: list[str] = []
    loaded = latest_valid_checkpoint(ckpt_dir, problems) if ckpt_dir.exists() else None
    if loaded is None and problems:
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise RunError(f"'{ckpt_dir}' has checkpoints but none is usable ({problems[0]}{more}). There is no earlier "
                       f"checkpoint to fall back to: restore the damaged files, or move '{ckpt_dir}' away and run "
                       f"'gndgl train --resume {ckpt_dir.parent}' to train the run again from step 0")
    return loaded


def run_weights(run_dir: str | Path, saved: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The newest weights of a run: ``weights.safetensors``, else its latest usable checkpoint.

    Reads only safetensors and JSON (never unpickles).

    Args:
        run_dir: the run directory.
        saved: its ``run.json`` record (:func:`read_run_record`).

    Returns:
        ``(tensors named '<partition>.<name>', where they came from)``: ``"final weights"`` only for a
        run whose ``summary.json`` says it is complete; a run stopped before the end of its schedule
        says the step (``"weights of step 490, not final: ..."``).

    Raises:
        RunError: damaged final weights, or no weights or checkpoints yet.
    """
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    world = int(saved.get("world", 1))
    label = _weights_label(run_dir, world)
    if label is not None:
        try:
            return load_file(str(run_dir / "weights.safetensors")), label
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on damaged files
            raise RunError(f"'{run_dir / 'weights.safetensors'}' is damaged ({exc}); delete it to use the "
                           "last checkpoint instead") from None
    src = checkpoint_source(ckpts)
    if src is not None and src.world is not None:  # the newest checkpoint is ranks' (whatever run.json says now)
        return gather_tensors(ckpts, src.step, src.world), f"committed checkpoint {src.name}"
    if world > 1 and src is None:
        step = latest_commit(ckpts)
        if step is None:
            raise RunError(f"'{run_dir}' has no weights or committed checkpoints yet; train it first "
                           f"(gndgl train --resume {run_dir})")
        return gather_tensors(ckpts, step, world), f"committed checkpoint ckpt-{step:09d}"
    loaded = usable_checkpoint(ckpts)
    if loaded is None:
        raise RunError(f"'{run_dir}' has no weights or checkpoints yet; "
                       f"train it first (gndgl train --resume {run_dir})")
    return loaded.tensors, f"checkpoint {loaded.name}"


def _weights_label(run_dir: Path, world: int) -> str | None:
    """What ``weights.safetensors`` holds, from ``summary.json`` (None: no such file, or a checkpoint
    newer than it, e.g. of an extension that was killed, which is then the newest weights)."""
    if not (run_dir / "weights.safetensors").exists():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        steps = summary["steps"] if isinstance(summary.get("steps"), int) else None
    except (OSError, ValueError, TypeError, KeyError):
        return "weights.safetensors, final or not unknown: summary.json is missing or unreadable"
    ckpts = run_dir / "checkpoints"
    local = (int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.json") if p.stem.split("-")[1].isdigit())
    newest = max((s for s in (latest_commit(ckpts), *local) if s is not None), default=None)
    if steps is not None and newest is not None and newest > steps:
        return None
    if summary.get("complete") is True:
        return "final weights"
    return (f"weights of step {steps}, not final: the run stopped at {summary.get('epochs_done')}/"
            f"{summary.get('epochs_total')} epochs, summary.json says complete: false")
