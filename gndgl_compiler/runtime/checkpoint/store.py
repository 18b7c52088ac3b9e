"""The checkpoint format: atomic, verified, never unpickled.

A checkpoint ``<name>`` in a directory is two files:

- ``<name>.safetensors`` — the weights plus every tensor found in the training
  state (optimizer, scheduler, RNG states);
- ``<name>.json`` — a JSON skeleton of the state (tensors replaced by references
  into the safetensors file, see :mod:`.state_codec`), the names of the weights, the
  step, the sha256 of the safetensors file, and a ``digest`` (sha256 of the record
  itself, so an edited JSON is detected too). It is written last and is the commit
  point: a checkpoint exists once its JSON exists.

Loading uses only :mod:`json` and :func:`safetensors.torch.load_file`. Listing, finding
the newest valid one and pruning are :mod:`.checkpoint_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import Tensor

from gndgl_compiler import fsio
from gndgl_compiler.errors import ArtifactError, TrainingError
from gndgl_compiler.runtime.checkpoint.codec import flatten_state, unflatten_state

FORMAT = "gndgl-checkpoint"
FORMAT_VERSION = 1
STATE_PREFIX = "__state__/"


# --------------------------------------------------------------------------- save / load


def checkpoint_paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``(<name>.safetensors, <name>.json)`` of checkpoint ``name`` in ``directory``."""
    d = Path(directory)
    return d / f"{name}.safetensors", d / f"{name}.json"


def _prepare(tensor: Tensor) -> Tensor:
    # clone: safetensors refuses shared storage, and a view of a large buffer would save it whole
    return tensor.detach().to("cpu").contiguous().clone()


def save_checkpoint(directory: str | os.PathLike, name: str, *, tensors: dict[str, Tensor], state: dict) -> Path:
    """Save weights and training state as checkpoint ``name`` in ``directory``.

    Writes ``<name>.safetensors`` then ``<name>.json`` (the commit point), both
    atomically. Overwriting an existing checkpoint of the same name first removes its
    JSON, so a crash never leaves a committed JSON next to a foreign tensor file.

    Args:
        directory: the checkpoint directory (created if missing).
        name: checkpoint name, e.g. ``"step-000120"``.
        tensors: weights, name→tensor (moved to CPU, made contiguous, cloned).
        state: JSON-able nested state; an int ``state["step"]`` orders checkpoints.

    Returns:
        Path of the JSON file.

    Raises:
        TrainingError: if the files cannot be written (path and OS reason given);
            earlier checkpoints are untouched.
        ArtifactError: if the state holds an unsupported type or a weight name uses
            the reserved ``__state__/`` prefix.
    """
    fsio.point("checkpoint.start", directory=Path(directory), checkpoint=name)
    st_path, json_path = checkpoint_paths(directory, name)
    bad = [k for k in tensors if k.startswith(STATE_PREFIX)]
    if bad:
        raise ArtifactError(f"weight names may not start with '{STATE_PREFIX}': {bad[:3]}; rename these tensors")
    state_tensors, skeleton = flatten_state(state)
    payload = {k: _prepare(v) for k, v in tensors.items()}
    payload.update({STATE_PREFIX + k: _prepare(v) for k, v in state_tensors.items()})
    data = save(payload)
    fsio.point("checkpoint.serialized", path=st_path)
    fs = fsio.current()
    try:
        fs.mkdir(Path(directory), parents=True, exist_ok=True)
        if json_path.exists():
            fs.unlink(json_path)
    except OSError as exc:
        raise TrainingError(f"could not prepare checkpoint {json_path}: {exc.strerror or exc}; "
                            "check the directory is writable") from exc
    fsio.atomic_write_bytes(st_path, data)
    step = state.get("step")
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "tensor_file": st_path.name,
        "sha256": fsio.sha256_bytes(data),
        "size": len(data),
        "weights": sorted(tensors),
        "state": skeleton,
    }
    record["digest"] = _record_digest(record)
    fsio.atomic_write_text(json_path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    fsio.point("checkpoint.committed", path=json_path)
    return json_path


def _record_digest(record: dict) -> str:
    """sha256 of a checkpoint record without its ``digest`` field (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return fsio.sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def read_record(json_path: Path) -> dict:
    """The checked JSON record of a checkpoint (format, version, digest).

    Raises:
        ArtifactError: missing, unreadable, not a gndgl checkpoint, another version, or edited.
    """
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"checkpoint file {json_path} does not exist; "
                            "check the run directory and the checkpoint name") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint file {json_path} is unreadable or truncated ({exc}); "
                            "use an earlier checkpoint") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ArtifactError(f"{json_path} is not a gndgl checkpoint (no \"format\": \"{FORMAT}\")")
    if record.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{json_path} has checkpoint format version {record.get('version')}; "
                            f"this gndgl reads version {FORMAT_VERSION}")
    # checkpoints written before the digest existed have none; a present digest must match
    if "digest" in record and record["digest"] != _record_digest(record):
        raise ArtifactError(f"checkpoint file {json_path} was modified after it was written (its digest does not "
                            "match its content); use an earlier checkpoint")
    return record


def verify_tensor_file(st_path: Path, record: dict) -> None:
    """Check a checkpoint's tensor file against the size and sha256 in its record.

    Raises:
        ArtifactError: missing, unreadable, truncated or modified (naming the file).
    """
    try:
        digest, size = fsio.sha256_and_size(st_path)
    except FileNotFoundError as exc:
        raise ArtifactError(f"checkpoint tensor file {st_path} is missing; use an earlier checkpoint") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read checkpoint tensor file {st_path}: {exc.strerror or exc}") from exc
    if size != record.get("size") or digest != record.get("sha256"):
        raise ArtifactError(
            f"checkpoint tensor file {st_path} is truncated or was modified "
            f"({size} bytes, expected {record.get('size')}; sha256 mismatch); use an earlier checkpoint"
        )


def load_checkpoint(directory: str | os.PathLike, name: str) -> tuple[dict[str, Tensor], Any]:
    """Load and verify checkpoint ``name``; never unpickles.

    Args:
        directory: the checkpoint directory.
        name: checkpoint name (without extension).

    Returns:
        ``(tensors, state)``: the weights (CPU tensors) and the rebuilt state.

    Raises:
        ArtifactError: naming the file, if a file is missing, truncated, not a gndgl
            checkpoint, or the tensor file's sha256 does not match the JSON.
    """
    st_path, json_path = checkpoint_paths(directory, name)
    record = read_record(json_path)
    verify_tensor_file(st_path, record)
    try:
        loaded = load_file(st_path)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"cannot decode checkpoint tensor file {st_path}: {exc}") from exc
    weights_names = record.get("weights", [])
    missing = [k for k in weights_names if k not in loaded]
    if missing:
        raise ArtifactError(f"checkpoint tensor file {st_path} lacks weights {missing[:3]}; use an earlier checkpoint")
    weights = {k: loaded[k] for k in weights_names}
    state_tensors = {k[len(STATE_PREFIX):]: v for k, v in loaded.items() if k.startswith(STATE_PREFIX)}
    return weights, unflatten_state(state_tensors, record.get("state"))
