"""Resuming a run on another number of processes: its checkpoint re-placed from the per-partition state.

Checkpoints hold every partition's weights, optimizer state and metrics window under the
partition's name or id, whichever process wrote them; placement is computed, not stored. So a
run checkpointed by N ranks (``checkpoints/rank<r>/ckpt-<step>`` + ``commit-<step>.json``, which
records N) or by one process (``checkpoints/ckpt-<step>``) resumes on M processes:

    newest source (a committed step of N ranks, or a one-process checkpoint: the later step)
      └─ every file of that step read ─▶ this process's partitions picked out:
           weights           '<partition>.<name>' tensors of the partitions placed here
           optimizer state   split per partition (a param group each), laid out as this
                             process's updater holds it (per partition, or per device)
           metrics window    the partitions placed here; step, epoch, RNG, history: old rank 0's

The arithmetic of a partition does not depend on where it runs, and the data order and the dropout
streams are functions of (seed, epoch, step, partition): a re-placed run continues bit for bit as
the uninterrupted one wherever the same modules run sibling-fused (always with
``--no-fuse-siblings``), at equal intra-op threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ArtifactError
from .store import load_checkpoint, read_record, verify_tensor_file
from .directory import LoadedCheckpoint, list_checkpoints
from .ranks import merge_rank_metrics


@dataclass(frozen=True)
class Source:
    """The checkpoint a run resumes from, and the layout it was written in."""

    step: int
    """Its global step."""
    world: int | None
    """Ranks that wrote it (``rank<r>/`` files and a commit marker); None: one process (``checkpoints/``)."""

    @property
    def name(self) -> str:
        """The checkpoint name of its files."""
        return f"ckpt-{self.step:09d}"

    def files(self, root: Path) -> list[Path]:
        """The directories of its files, old rank 0's first."""
        return [root] if self.world is None else [root / f"rank{r}" for r in range(self.world)]


def _valid(directory: Path, name: str) -> bool:
    try:
        verify_tensor_file(directory / f"{name}.safetensors", read_record(directory / f"{name}.json"))
    except ArtifactError:
        return False
    return True


def _newest_commit(root: Path) -> Source | None:
    """The newest committed step whose every rank file verifies."""
    for marker in sorted(root.glob("commit-*.json"), reverse=True):
        try:
            rec = json.loads(marker.read_text(encoding="utf-8"))
            src = Source(int(rec["step"]), int(rec["world"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(_valid(d, src.name) for d in src.files(root)):
            return src
    return None


def _newest_local(root: Path) -> Source | None:
    """The newest verified one-process checkpoint directly in ``root``."""
    for name in reversed(list_checkpoints(root, quiet=True)):
        if _valid(root, name) and name.startswith("ckpt-") and name[5:].isdigit():
            return Source(int(name[5:]), None)
    return None


def checkpoint_source(root: Path) -> Source | None:
    """The newest resumable checkpoint under ``root`` (``checkpoints/``), in either layout; None if none.

    A run resumed on another number of processes keeps the older layout's files, so both may be
    present: the later step wins.
    """
    if not root.is_dir():
        return None
    found = [s for s in (_newest_commit(root), _newest_local(root)) if s is not None]
    return max(found, key=lambda s: (s.step, s.world is not None)) if found else None


def partition_optim(optim: dict[str, dict]) -> dict[int, dict]:
    """An updater's ``"optim"`` checkpoint entry split per partition: ``{pid: {"group", "state"}}``
    (the group's hyper-parameters, and the state of each of its parameters in order, or None)."""
    out: dict[int, dict] = {}
    for key, sd in optim.items():
        for g in sd["param_groups"]:
            pid = g["pid"] if "pid" in g else int(key)  # per-device layout tags its groups; per partition: the key
            out[pid] = {"group": {k: v for k, v in g.items() if k not in ("params", "pid")},
                        "state": [sd["state"].get(i) for i in g["params"]]}
    return out


def layout_optim(parts: dict[int, dict], template: dict[str, dict], source: str) -> dict[str, dict]:
    """Per-partition optimizer state laid out as ``template`` (a fresh updater's ``state_dict()``) holds it.

    Raises:
        ArtifactError: a partition's state is missing or has another number of parameters.
    """
    out: dict[str, dict] = {}
    for key, sd in template.items():
        groups, state = [], {}
        for g in sd["param_groups"]:
            pid = g["pid"] if "pid" in g else int(key)
            part = parts.get(pid)
            if part is None or len(part["state"]) != len(g["params"]):
                raise ArtifactError(f"{source}: no optimizer state for partition {pid} with {len(g['params'])} "
                                    "parameters; the run's checkpoints do not match its artifact")
            groups.append({**g, **part["group"]})
            state.update({i: s for i, s in zip(g["params"], part["state"]) if s is not None})
        out[key] = {"state": state, "param_groups": groups}
    return out


def replaced_checkpoint(root: Path, src: Source, plan: Any, owned: set[int], template: dict[str, dict]
                        ) -> LoadedCheckpoint:
    """The checkpoint ``src`` re-placed for a process that trains the partitions ``owned``.

    Args:
        root: ``checkpoints/``.
        src: the checkpoint (:func:`checkpoint_source`).
        plan: the partition plan (names of the partitions).
        owned: ids of this process's partitions.
        template: this process's updater's ``state_dict()`` (the optimizer layout to fill).

    Raises:
        ArtifactError: a file is missing or damaged, or lacks a partition's state.
    """
    prefixes = tuple(f"{p.name}." for p in plan.partitions if p.id in owned)
    tensors: dict[str, Any] = {}
    optim: dict[int, dict] = {}
    loss: dict[str, float] = {}
    correct: dict[str, int] = {}
    main: dict | None = None
    for d in src.files(root):
        t, state = load_checkpoint(d, src.name)
        main = main if main is not None else state
        tensors.update({k: v for k, v in t.items() if k.startswith(prefixes)})
        optim.update(partition_optim(state["optim"]))
        window = state.get("window") or {}
        loss.update({k: v for k, v in window.get("loss", {}).items() if int(k) in owned})
        correct.update({k: v for k, v in window.get("correct", {}).items() if int(k) in owned})
    where = f"{root} (step {src.step}, {src.world or 1} process(es))"
    window = {"n": (main.get("window") or {}).get("n", 0), "loss": loss, "correct": correct}
    state = {**main, "optim": layout_optim(optim, template, where), "window": window}
    return LoadedCheckpoint(src.name, tensors, state)


def fold_rank_metrics(run_dir: Path, src: Source) -> None:
    """Before a run continues on another number of ranks: the metric records the old ranks 1..N-1
    wrote go into ``run_dir/metrics.jsonl`` (the resumed run then truncates it at the step), and
    their files are removed, so a rank of the new layout starts its own."""
    if src.world is None or src.world < 2:
        return
    if (run_dir / "metrics.jsonl").exists():
        merge_rank_metrics(run_dir, src.world)
    for r in range(1, src.world):
        (run_dir / "ranks" / str(r) / "metrics.jsonl").unlink(missing_ok=True)
