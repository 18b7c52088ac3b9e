"""A checkpoint directory: list, find the newest valid, and prune checkpoints.

The checkpoint format itself (two files, JSON last) is :mod:`.checkpoint`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from gndgl_compiler import fsio
from gndgl_compiler.errors import ArtifactError, TrainingError
from gndgl_compiler.runtime.checkpoint.store import checkpoint_paths, load_checkpoint, read_record, verify_tensor_file


def list_checkpoints(directory: str | os.PathLike, problems: list[str] | None = None, *,
                     quiet: bool = False) -> list[str]:
    """Names of the checkpoints in ``directory``, oldest → newest by recorded step.

    Only JSON files that declare the gndgl checkpoint format count (ties and
    checkpoints without a step are ordered by modification time, then name). An
    unreadable JSON next to a ``.safetensors`` file of the same name is reported with
    :func:`warnings.warn` and left out.

    Args:
        directory: the checkpoint directory; a missing directory has none.
        problems: if given, the message of every reported checkpoint is appended to it.
        quiet: do not warn (the caller reports unreadable checkpoints itself, or already did).

    Returns:
        List of checkpoint names.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for json_path in d.glob("*.json"):
        name = json_path.name[: -len(".json")]
        try:
            record = read_record(json_path)
        except ArtifactError as exc:
            if (d / f"{name}.safetensors").exists():
                if not quiet:
                    warnings.warn(f"skipping checkpoint '{name}': {exc}", stacklevel=2)
                if problems is not None:
                    problems.append(str(exc))
            continue
        step = record.get("step")
        try:
            mtime = json_path.stat().st_mtime_ns
        except OSError:
            mtime = 0
        found.append((step if isinstance(step, int) else -1, mtime, name))
    return [name for _, _, name in sorted(found)]


class LoadedCheckpoint(NamedTuple):
    """A checkpoint found by :func:`latest_valid_checkpoint`."""

    name: str
    tensors: dict[str, Tensor]
    state: Any


def latest_valid_checkpoint(directory: str | os.PathLike, problems: list[str] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint of ``directory`` that loads and verifies.

    Walks from newest to oldest; each corrupt checkpoint is reported with
    :func:`warnings.warn` (naming it and the reason) and skipped.

    Args:
        directory: the checkpoint directory.
        problems: if given, the message of every skipped checkpoint is appended to it
            (unreadable records first, then failed loads newest first), e.g. to explain
            why none was found.

    Returns:
        ``LoadedCheckpoint(name, tensors, state)``, or ``None`` if none is valid.
    """
    for name in reversed(list_checkpoints(directory, problems)):
        try:
            tensors, state = load_checkpoint(directory, name)
        except ArtifactError as exc:
            warnings.warn(f"skipping corrupt checkpoint '{name}': {exc}", stacklevel=2)
            if problems is not None:
                problems.append(str(exc))
            continue
        return LoadedCheckpoint(name, tensors, state)
    return None


def _is_valid(directory: Path, name: str) -> bool:
    st_path, json_path = checkpoint_paths(directory, name)
    try:
        verify_tensor_file(st_path, read_record(json_path))
    except ArtifactError:
        return False
    return True


def prune_checkpoints(directory: str | os.PathLike, keep: int = 2) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints, never the newest valid one.

    A checkpoint is deleted JSON first (un-commit), then its tensor file. Temp files
    that a killed writer left are deleted too (:func:`gndgl_compiler.fsio.remove_temp_files`).

    Args:
        directory: the checkpoint directory.
        keep: how many of the newest checkpoints to keep, ≥ 1.

    Returns:
        Names of the deleted checkpoints.

    Raises:
        ValueError: if ``keep`` < 1.
        TrainingError: if a file cannot be deleted (path and OS reason given).
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints needs keep >= 1, got {keep}")
    d = Path(directory)
    names = list_checkpoints(d, quiet=True)  # resuming already warned about unreadable ones
    kept = set(names[-keep:])
    newest_valid = next((n for n in reversed(names) if _is_valid(d, n)), None)
    if newest_valid is not None:
        kept.add(newest_valid)
    deleted, fs = [], fsio.current()
    for name in names:
        if name in kept:
            continue
        st_path, json_path = checkpoint_paths(d, name)
        try:
            fs.unlink(json_path)
            fs.unlink(st_path)
        except OSError as exc:
            raise TrainingError(f"could not delete old checkpoint {json_path}: {exc.strerror or exc}; "
                                "check the directory is writable") from exc
        deleted.append(name)
    fsio.remove_temp_files(d)
    return deleted
