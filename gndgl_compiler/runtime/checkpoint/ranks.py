"""Checkpoints of a distributed run: one file per rank, committed together.

    checkpoints/rank0/ckpt-000000120.{safetensors,json}   each rank writes its partitions
    checkpoints/rank1/ckpt-000000120.{safetensors,json}
    checkpoints/commit-000000120.json                      rank 0, after a barrier

A step is resumable only once its commit marker exists, so a rank killed while
writing never leaves a half checkpoint behind: resume falls back to the last
committed step, whose files every rank still keeps (pruning keeps two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ... import fsio
from ...artifact import load_state_tensors
from ...codegen.modules import PartitionModule, build_partitions
from ...errors import ArtifactError
from ...partition.plan import PartitionPlan
from .store import load_checkpoint
from .directory import LoadedCheckpoint
from ..metrics import read_metrics


def metrics_dir(run_dir: Path, rank: int) -> Path:
    """Where a rank writes ``metrics.jsonl``: the run directory for rank 0, ``ranks/<r>/`` otherwise."""
    d = run_dir if rank == 0 else run_dir / "ranks" / str(rank)
    d.mkdir(parents=True, exist_ok=True)
    return d


def commit_checkpoint(root: Path, step: int, ctx: Any) -> None:
    """Barrier, then rank 0 writes the commit marker of ``step`` (and prunes old markers)."""
    from ..dist.peer import barrier

    barrier()
    if ctx.rank == 0:
        fsio.atomic_write_text(root / f"commit-{step:09d}.json", json.dumps({"step": step, "world": ctx.world}))
        markers = sorted(root.glob("commit-*.json"))
        for old in markers[:-2]:
            fsio.current().unlink(old)
    barrier()


def _commits(root: Path) -> list[int]:
    return sorted((int(p.stem.split("-")[1]) for p in root.glob("commit-*.json")), reverse=True)


def latest_commit(root: Path) -> int | None:
    """The newest committed step under ``root`` (``checkpoints/``), or None."""
    steps = _commits(root) if root.exists() else []
    return steps[0] if steps else None


def committed_checkpoint(root: Path, rank: int) -> LoadedCheckpoint | None:
    """This rank's part of the newest committed checkpoint, or None for a fresh run."""
    if not root.exists():
        return None
    for step in _commits(root):
        name = f"ckpt-{step:09d}"
        try:
            tensors, state = load_checkpoint(root / f"rank{rank}", name)
        except ArtifactError:
            continue
        return LoadedCheckpoint(name, tensors, state)
    return None


def gather_tensors(root: Path, step: int, world: int) -> dict[str, torch.Tensor]:
    """All ranks' weights at ``step`` merged into one ``'<partition>.<name>'`` map."""
    out: dict[str, torch.Tensor] = {}
    for r in range(world):
        tensors, _ = load_checkpoint(root / f"rank{r}", f"ckpt-{step:09d}")
        out.update({k: v for k, v in tensors.items() if not k.startswith("__state__/")})
    return out


def gather_modules(plan: PartitionPlan, root: Path, step: int, world: int) -> dict[int, PartitionModule]:
    """Every partition module, with the weights all ranks checkpointed at ``step``."""
    modules = build_partitions(plan)
    load_state_tensors(modules, plan, gather_tensors(root, step, world), str(root))
    return modules


def merge_rank_metrics(run_dir: Path, world: int) -> None:
    """Append the other ranks' metric records to ``run_dir/metrics.jsonl`` (ordered by step)."""
    records = []
    for r in range(1, world):
        d = run_dir / "ranks" / str(r)
        if (d / "metrics.jsonl").exists():
            records += read_metrics(d)
    if not records:
        return
    seen: set[tuple] = set()
    merged = []
    for rec in read_metrics(run_dir) + records:  # a resumed run already holds the records merged before
        key = (rec.get("kind"), rec.get("step"), rec.get("partition"), rec.get("epoch"))
        if key not in seen:
            seen.add(key)
            merged.append(rec)
    merged.sort(key=lambda rec: (rec.get("step", 0), rec.get("kind") != "train"))
    fsio.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in merged))
