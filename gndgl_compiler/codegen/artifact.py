"""The compiled artifact: a directory a person can read.

    compiled/
      manifest.json        versions + sha256 of every other file
      spec.json            the normalised spec (defaults filled in)
      graph.json           the annotated op graph (networkx node-link JSON)
      plan.json            partitions, placement, edges, optimizer settings, costs
      code/<partition>.py  generated fx code (for reading and diffing; never executed)
      code/inference.py    the assembled inference network
      weights.safetensors  initial weights, '<partition>.<param>'

Writing builds a temporary sibling directory and renames it into place, so an
interrupted compile never leaves a half-written artifact. Loading verifies every
hash, then rebuilds the modules from ``plan.json`` with the same codegen: no stored
code is executed and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import ArtifactError
from ..partition.plan import PartitionPlan
from .modules import PartitionModule, build_assembled

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_tensors(parts: dict[int, PartitionModule], plan: PartitionPlan) -> dict[str, torch.Tensor]:
    """All parameters and buffers as ``'<partition>.<name>' -> CPU tensor``."""
    out = {}
    for p in plan.partitions:
        if p.id not in parts:
            continue
        for key, t in parts[p.id].state_dict().items():
            out[f"{p.name}.{key}"] = t.detach().to("cpu").contiguous().clone()
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


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
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write the artifact to '{out}': {exc.strerror}; choose a writable -o") from None
    try:
        os.chmod(tmp, 0o755)
        (tmp / "code").mkdir()
        _write_json(tmp / "spec.json", spec_json)
        g = nx.node_link_data(graph, edges="edges")
        _write_json(tmp / "graph.json", {"graph": g, "segments": segments})
        plan_d = plan.to_dict()
        plan_d["train"] = train
        _write_json(tmp / "plan.json", plan_d)
        _write_json(tmp / "costs.json", {"summary": plan.summary,
                                         "partitions": {p.name: p.costs for p in plan.partitions}})
        for p in plan.partitions:
            (tmp / "code" / f"{p.name}.py").write_text(parts[p.id].code())
        (tmp / "code" / "inference.py").write_text(build_assembled(plan, parts).code.strip() + "\n")
        save_file(state_tensors(parts, plan), str(tmp / WEIGHTS), metadata={"format": "gndgl-weights"})
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        manifest = {
            "format": FORMAT_VERSION, "gndgl": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "name": plan.name,
            "files": {f: sha256_file(tmp / f) for f in files},
        }
        _write_json(tmp / MANIFEST, manifest)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "a")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write the artifact to '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(art_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check ``manifest.json``.

    Raises:
        ArtifactError: missing directory or manifest, another format version, a
            missing file or a sha256 mismatch (naming the file).
    """
    d = Path(art_dir)
    if not d.is_dir():
        raise ArtifactError(f"'{d}' is not a directory; compile a spec first: gndgl compile SPEC -o {d}")
    mpath = d / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"'{d}' has no {MANIFEST}; it is not a gndgl artifact (gndgl compile SPEC -o {d})")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"'{mpath}' is corrupt; recompile the spec") from None
    if fmt != FORMAT_VERSION:
        raise ArtifactError(f"'{d}' has artifact format {fmt}, this gndgl reads format {FORMAT_VERSION}; "
                            "recompile the spec with this version")
    if verify:
        for name, digest in files.items():
            f = d / name
            if not f.is_file():
                raise ArtifactError(f"'{f}' is missing from the artifact; recompile the spec")
            if sha256_file(f) != digest:
                raise ArtifactError(f"'{f}' does not match its sha256 in {MANIFEST} (edited or corrupted); "
                                    "recompile the spec")
    return manifest


def read_json(art_dir: Path, name: str) -> Any:
    """Parse one JSON file of an artifact."""
    try:
        return json.loads((Path(art_dir) / name).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read '{Path(art_dir) / name}': {exc}; recompile the spec") from None


def read_weights(art_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Initial weights of an artifact (tensors only; safetensors never unpickles)."""
    path = Path(art_dir) / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"cannot read '{path}': {exc}; recompile the spec") from None
