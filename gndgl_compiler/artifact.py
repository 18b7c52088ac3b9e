"""The compiled artifact on disk: write, find, read and verify it (codegen makes its contents).

    compiled/
      manifest.json        versions + sha256 of every other file
      spec.json            the normalised spec (defaults filled in)
      graph.json           the annotated op graph (networkx node-link JSON)
      plan.json            partitions, placement, edges, optimizer settings, costs
      code/<partition>.py  generated fx code (for reading and diffing; never executed)
      code/inference.py    the assembled inference network
      weights.safetensors  initial weights, '<partition>.<param>'

Writing builds a temporary sibling directory and renames it into place (an existing
artifact is swapped with it in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux;
:func:`gndgl_compiler.fsio.replacing_dir`), so an interrupted compile never leaves a
half-written artifact. Loading verifies every
hash, then rebuilds the modules from ``plan.json`` with the same codegen: no stored
code is executed and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from safetensors.torch import load_file, save

from . import __version__, fsio
from .codegen.modules import PartitionModule, build_assembled
from .errors import ArtifactError
from .partition.plan import PartitionPlan

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REQUIRED = ("spec.json", "plan.json", WEIGHTS)
"""Files every manifest must list (so that dropping an entry cannot hide an edit)."""
RECOMPILE = "recompile the spec"
PLAN = "plan.json"


def state_tensors(parts: dict[int, PartitionModule], plan: PartitionPlan) -> dict[str, torch.Tensor]:
    """All parameters and buffers as ``'<partition>.<name>' -> CPU tensor``.

    CPU tensors are returned without a copy (they alias the live parameters): write them out
    before the next optimizer step, or ``.clone()`` them to keep a snapshot. A tensor that is a
    slice of a larger storage (sibling-fused parameters, ``runtime/fusion/storage.py``) is copied,
    since safetensors stores whole storages and refuses shared ones.
    """
    out = {}
    for p in plan.partitions:
        if p.id not in parts:
            continue
        for key, t in parts[p.id].state_dict().items():
            t = t.detach().to("cpu").contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            out[f"{p.name}.{key}"] = t
    return out


def load_state_tensors(parts: dict[int, PartitionModule], plan: PartitionPlan, tensors: dict[str, torch.Tensor],
                       source: str) -> None:
    """Load ``'<partition>.<name>'`` tensors into the modules present in ``parts``.

    Raises:
        ArtifactError: a missing or unexpected key, or a shape mismatch.
    """
    for p in plan.partitions:
        if p.id not in parts:
            continue
        prefix = p.name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            parts[p.id].load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise ArtifactError(f"{source}: weights of partition {p.name} do not match its plan "
                                f"({' '.join(first)}); recompile the spec") from None


def artifacts_in(folder: str | os.PathLike) -> list[Path]:
    """The artifact directories directly inside ``folder`` (``compiled/<name>/``), newest first.

    Args:
        folder: a directory such as ``compiled/``.

    Returns:
        Sub-directories holding a manifest, ordered by the manifest's modification time
        (newest first); empty when ``folder`` is not a directory.
    """
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".") and (c / MANIFEST).is_file()]
    return sorted(found, key=lambda c: ((c / MANIFEST).stat().st_mtime, c.name), reverse=True)


def find_artifact(path: str | os.PathLike) -> Path:
    """Resolve what a user typed to one artifact directory.

    ``gndgl compile`` writes ``compiled/<name>/``, so a folder of artifacts stands for its
    only or newest one (``gndgl train compiled/``); an artifact directory stands for itself.

    Args:
        path: an artifact directory or a folder of them.

    Returns:
        The artifact directory; ``path`` unchanged when it holds neither (the loader then
        says what is wrong with it).
    """
    d = Path(path)
    if (d / MANIFEST).is_file():
        return d
    found = artifacts_in(d)
    return found[0] if found else d


def _write_json(path: Path, obj: Any, compact: bool = False) -> None:
    """Write ``obj`` as JSON; ``compact`` (no indentation) for the big machine-read files: the C
    encoder is several times faster (``python -m json.tool FILE`` pretty-prints them)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    fsio.write_file(path, text + "\n")


def write_artifact(out_dir: str | os.PathLike, *, spec_json: dict, graph: nx.DiGraph, segments: list[dict],
                   plan: PartitionPlan, train: dict, parts: dict[int, PartitionModule]) -> Path:
    """Write a complete artifact atomically.

    Args:
        out_dir: target directory (replaced if it already holds a gndgl artifact).
        spec_json: the normalised spec.
        graph: the op graph.
        segments: its segments (as dicts).
        plan: the partition plan.
        train: optimizer / schedule settings to record per partition.
        parts: built partition modules (their weights are written).

    Returns:
        The artifact directory.

    Raises:
        ArtifactError: the target exists and is not an artifact, or cannot be written.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise ArtifactError(f"'{out}' exists and is not a gndgl artifact; choose another output with -o "
                            "or remove it first")
    parent = out.parent if str(out.parent) else Path(".")
    if (parent / MANIFEST).is_file():
        raise ArtifactError(f"'{parent}' is itself an artifact (an older `gndgl compile` wrote it there), so "
                            f"'{out}' cannot go inside it; move it away (mv {parent} {parent}-old) or choose "
                            "another output with -o")
    with fsio.replacing_dir(out, error=ArtifactError, what="artifact", remedy="choose a writable -o") as tmp:
        fsio.current().mkdir(tmp / "code")
        _write_json(tmp / "spec.json", spec_json)
        g = nx.node_link_data(graph, edges="edges")
        _write_json(tmp / "graph.json", {"graph": g, "segments": segments}, compact=True)
        plan_d = plan.to_dict()
        plan_d["train"] = train
        _write_json(tmp / PLAN, plan_d, compact=True)
        _write_json(tmp / "costs.json", {"summary": plan.summary,
                                         "partitions": {p.name: p.costs for p in plan.partitions}})
        for p in plan.partitions:
            fsio.write_file(tmp / "code" / f"{p.name}.py", parts[p.id].code())
        fsio.write_file(tmp / "code" / "inference.py", build_assembled(plan, parts).code.strip() + "\n")
        fsio.write_file(tmp / WEIGHTS, save(state_tensors(parts, plan), metadata={"format": "gndgl-weights"}))
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        manifest = {
            "format": FORMAT_VERSION, "gndgl": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "name": plan.name,
            "files": {f: fsio.sha256_file(tmp / f) for f in files},
        }
        _write_json(tmp / MANIFEST, manifest)
    return out


def _compile_hint(d: Path) -> str:
    """How to make an artifact where ``d`` was expected (never into a run directory)."""
    if d.name == "compiled" or not d.name:
        return "compile a spec first: gndgl compile SPEC (it writes compiled/<name>/)"
    return f"compile a spec first: gndgl compile SPEC -o {d}"


def read_manifest(art_dir: str | os.PathLike, verify: bool = True, remedy: str = RECOMPILE) -> dict:
    """Read and check ``manifest.json``.

    Args:
        art_dir: the artifact directory.
        verify: check every listed file's sha256.
        remedy: what the error messages tell the user to do about a damaged artifact.

    Raises:
        ArtifactError: missing directory or manifest, another format version, a
            missing file or a sha256 mismatch (naming the file).
    """
    d = Path(art_dir)
    if not d.is_dir():
        moved = fsio.interrupted_replacement(d, MANIFEST)
        if moved is not None:
            raise ArtifactError(f"'{d}' is missing: a compile that replaced it was interrupted and left the previous "
                                f"artifact in '{moved}'; move it back (mv '{moved}' '{d}') or compile again")
        what = "is not a directory" if d.exists() else "does not exist"
        raise ArtifactError(f"'{d}' {what}; {_compile_hint(d)}")
    mpath = d / MANIFEST
    if not mpath.exists():
        if (d / "run.json").is_file():
            raise ArtifactError(f"'{d}' is a run directory, not an artifact; its compiled network is in "
                                f"'{d / 'artifact'}' (to continue the run: gndgl train --resume {d})")
        raise ArtifactError(f"'{d}' has no {MANIFEST}; it is not a gndgl artifact. {_compile_hint(d).capitalize()}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        fmt = manifest["format"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"'{mpath}' is corrupt; {remedy}") from None
    if fmt != FORMAT_VERSION:
        fix = f"{remedy} with this version" if remedy == RECOMPILE else remedy
        raise ArtifactError(f"'{d}' has artifact format {fmt}, this gndgl reads format {FORMAT_VERSION}; {fix}")
    if verify:
        unlisted = [name for name in REQUIRED if name not in files]
        if unlisted:
            raise ArtifactError(f"'{mpath}' does not list {', '.join(unlisted)} (edited or corrupted); {remedy}")
        for name, digest in files.items():
            f = d / name
            if not f.is_file():
                raise ArtifactError(f"'{f}' is missing from the artifact; {remedy}")
            if fsio.sha256_file(f) != digest:
                raise ArtifactError(f"'{f}' does not match its sha256 in {MANIFEST} (edited or corrupted); "
                                    f"{remedy}")
    return manifest


def read_json(art_dir: str | os.PathLike, name: str, remedy: str = RECOMPILE) -> Any:
    """Parse one JSON file of an artifact.

    Raises:
        ArtifactError: it is missing or not JSON (naming the file, with ``remedy``).
    """
    return fsio.read_json(Path(art_dir) / name, error=ArtifactError, remedy=remedy)


def read_plan(art_dir: str | os.PathLike, remedy: str = RECOMPILE) -> PartitionPlan:
    """The :class:`PartitionPlan` in an artifact's ``plan.json`` (the one place that reads that file).

    Args:
        art_dir: the artifact directory (its hashes are not checked here: see :func:`read_manifest`).
        remedy: what the error messages tell the user to do.

    Raises:
        ArtifactError: it is missing, not JSON or not a plan (naming the file, with ``remedy``).
    """
    plan_d = read_json(art_dir, PLAN, remedy)
    try:
        plan_d.pop("train", None)
        return PartitionPlan.from_dict(plan_d)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"'{Path(art_dir) / PLAN}' does not describe a plan ({exc}); {remedy}") from None


def read_weights(art_dir: str | os.PathLike, remedy: str = RECOMPILE) -> dict[str, torch.Tensor]:
    """Initial weights of an artifact (tensors only; safetensors never unpickles)."""
    path = Path(art_dir) / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"cannot read '{path}': {exc}; {remedy}") from None
