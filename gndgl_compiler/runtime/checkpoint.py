"""Atomic checkpoints that never unpickle.

A checkpoint ``<name>`` in a directory is two files:

- ``<name>.safetensors`` — the weights plus every tensor found in the training
  state (optimizer, scheduler, RNG states);
- ``<name>.json`` — a JSON skeleton of the state (tensors replaced by references
  into the safetensors file), the names of the weights, the step, and the sha256 of
  the safetensors file, and a ``digest`` (sha256 of the record itself, so an edited
  JSON is detected too). It is written last and is the commit point: a checkpoint
  exists once its JSON exists.

Nested state is turned into tensors + JSON by :func:`flatten_state`; special
values are encoded as one-key objects whose key starts with ``$``
(``{"$tensor": name}``, ``{"$tuple": [...]}``, ``{"$float": "nan"}``,
``{"$dict": [[key, value], ...]}`` for dicts whose keys are not all plain strings).
Loading uses only :mod:`json` and :func:`safetensors.torch.load_file`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from gndgl_compiler.errors import ArtifactError, GndglError, TrainingError

FORMAT = "gndgl-checkpoint"
FORMAT_VERSION = 1
STATE_PREFIX = "__state__/"
_MARKERS = ("$tensor", "$tuple", "$float", "$dict")


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, error: type[GndglError] = TrainingError) -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temp file in the same directory, which is flushed, fsynced
    and renamed over ``path`` with :func:`os.replace`; then the directory is
    fsynced. A reader sees either the old file or the new one, never a mix.

    Args:
        path: destination file; its directory must exist.
        data: the content.
        error: the gndgl error class raised on failure.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TrainingError (or ``error``): on any OS failure (read-only directory, disk
            full, ...), naming the path and the OS reason. The temp file is removed
            and an earlier file at ``path`` is left untouched.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), (path.stat().st_mode & 0o777) if path.exists() else 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise error(
            f"could not write {path}: {exc.strerror or exc}. "
            "Check that the directory exists, is writable and that the disk is not full."
        ) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, error: type[GndglError] = TrainingError) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`.

    Args:
        path: destination file.
        text: the content.
        error: the gndgl error class raised on failure.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TrainingError (or ``error``): on any OS failure; ``path`` is untouched.
    """
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


# --------------------------------------------------------------------------- flatten / unflatten


def _unique(name: str, taken: dict[str, Tensor]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}#{n}", n + 1
    return candidate


def _child(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, Tensor):
        name = _unique(path or "value", tensors)
        tensors[name] = obj
        return {"$tensor": name}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, _child(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _child(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("$") for k in obj)
        if plain:
            return {k: _encode(v, _child(path, k), tensors) for k, v in obj.items()}
        return {"$dict": [[_encode(k, _child(path, "$key"), tensors), _encode(v, _child(path, k), tensors)] for k, v in obj.items()]}
    raise ArtifactError(
        f"cannot checkpoint a value of type {type(obj).__name__} at '{path or '/'}': "
        "only dict, list, tuple, int, float, bool, None, str and torch.Tensor are stored; "
        "convert it to one of these before saving."
    )


def flatten_state(obj: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state into a flat name→tensor map and a JSON skeleton.

    Args:
        obj: nested dict/list/tuple/int/float/bool/None/str/Tensor, e.g.
            ``optimizer.state_dict()`` or the output of :func:`rng_state`.

    Returns:
        ``(tensors, meta)``: tensors named by their path (``"state/0/exp_avg"``),
        and a JSON-serialisable skeleton (strict JSON: no NaN literals).

    Raises:
        ArtifactError: if a value of another type is found, naming its path.
    """
    tensors: dict[str, Tensor] = {}
    meta = _encode(obj, "", tensors)
    return tensors, meta


def _decode(meta: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(meta, list):
        return [_decode(v, tensors) for v in meta]
    if not isinstance(meta, dict):
        return meta
    if len(meta) == 1:
        (key, value), = meta.items()
        if key == "$tensor":
            if value not in tensors:
                raise ArtifactError(f"checkpoint state refers to tensor '{value}', which is not in the tensor file")
            return tensors[value]
        if key == "$tuple":
            return tuple(_decode(v, tensors) for v in value)
        if key == "$float":
            return float(value)
        if key == "$dict":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in meta.items()}


def unflatten_state(tensors: dict[str, Tensor], meta: Any) -> Any:
    """Rebuild the object that :func:`flatten_state` split.

    Args:
        tensors: the name→tensor map (as saved or as loaded back).
        meta: the JSON skeleton.

    Returns:
        The nested object: key types, tuples, non-finite floats, tensor dtypes and
        shapes as they were.

    Raises:
        ArtifactError: if the skeleton names a tensor that is missing.
    """
    return _decode(meta, tensors)


# --------------------------------------------------------------------------- save / load


def _paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
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
    st_path, json_path = _paths(directory, name)
    bad = [k for k in tensors if k.startswith(STATE_PREFIX)]
    if bad:
        raise ArtifactError(f"weight names may not start with '{STATE_PREFIX}': {bad[:3]}; rename these tensors")
    state_tensors, skeleton = flatten_state(state)
    payload = {k: _prepare(v) for k, v in tensors.items()}
    payload.update({STATE_PREFIX + k: _prepare(v) for k, v in state_tensors.items()})
    data = save(payload)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        if json_path.exists():
            json_path.unlink()
    except OSError as exc:
        raise TrainingError(f"could not prepare checkpoint {json_path}: {exc.strerror or exc}; check the directory is writable") from exc
    atomic_write_bytes(st_path, data)
    step = state.get("step")
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "tensor_file": st_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "weights": sorted(tensors),
        "state": skeleton,
    }
    record["digest"] = _record_digest(record)
    atomic_write_text(json_path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    return json_path


def _record_digest(record: dict) -> str:
    """sha256 of a checkpoint record without its ``digest`` field (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _read_record(json_path: Path) -> dict:
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"checkpoint file {json_path} does not exist; check the run directory and the checkpoint name") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint file {json_path} is unreadable or truncated ({exc}); use an earlier checkpoint") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ArtifactError(f"{json_path} is not a gndgl checkpoint (no \"format\": \"{FORMAT}\")")
    if record.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{json_path} has checkpoint format version {record.get('version')}; this gndgl reads version {FORMAT_VERSION}")
    # checkpoints written before the digest existed have none; a present digest must match
    if "digest" in record and record["digest"] != _record_digest(record):
        raise ArtifactError(f"checkpoint file {json_path} was modified after it was written (its digest does not "
                            "match its content); use an earlier checkpoint")
    return record


def _verify_tensor_file(st_path: Path, record: dict) -> None:
    h, size = hashlib.sha256(), 0
    try:
        with open(st_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError as exc:
        raise ArtifactError(f"checkpoint tensor file {st_path} is missing; use an earlier checkpoint") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read checkpoint tensor file {st_path}: {exc.strerror or exc}") from exc
    if size != record.get("size") or h.hexdigest() != record.get("sha256"):
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
    st_path, json_path = _paths(directory, name)
    record = _read_record(json_path)
    _verify_tensor_file(st_path, record)
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
            record = _read_record(json_path)
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
    st_path, json_path = _paths(directory, name)
    try:
        _verify_tensor_file(st_path, _read_record(json_path))
    except ArtifactError:
        return False
    return True


def remove_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temp files (``.<name>.*.tmp``) of atomic writes that a killed process left in ``directory``.

    Call it only where no other process writes into ``directory`` at the same time.

    Returns:
        Names of the deleted files (a file that cannot be deleted is left alone).
    """
    deleted = []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            if tmp.is_file():
                tmp.unlink()
                deleted.append(tmp.name)
        except OSError:
            pass
    return deleted


def prune_checkpoints(directory: str | os.PathLike, keep: int = 2) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints, never the newest valid one.

    A checkpoint is deleted JSON first (un-commit), then its tensor file. Temp files
    that a killed writer left are deleted too (:func:`remove_temp_files`).

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
    deleted = []
    for name in names:
        if name in kept:
            continue
        st_path, json_path = _paths(d, name)
        try:
            json_path.unlink(missing_ok=True)
            st_path.unlink(missing_ok=True)
        except OSError as exc:
            raise TrainingError(f"could not delete old checkpoint {json_path}: {exc.strerror or exc}; check the directory is writable") from exc
        deleted.append(name)
    remove_temp_files(d)
    return deleted


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Current states of Python's ``random`` and torch's CPU (and CUDA) generators.

    CUDA states are captured only when CUDA is already initialised, so this never
    creates a CUDA context.

    Returns:
        ``{"python": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...]?}``, a
        structure :func:`flatten_state` can store.
    """
    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generator states captured by :func:`rng_state`.

    Args:
        state: the dict from :func:`rng_state` (possibly after a checkpoint round trip).

    Raises:
        ArtifactError: if a state is malformed. A CUDA state is restored only where
            CUDA is available (otherwise a warning says it was ignored).
    """
    try:
        if "python" in state:
            random.setstate(state["python"])
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state:
            cuda_states = list(state["cuda"])
            if not torch.cuda.is_available():
                warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; they are ignored", stacklevel=2)
            else:
                n = min(len(cuda_states), torch.cuda.device_count())
                if n < len(cuda_states):
                    warnings.warn(f"checkpoint holds {len(cuda_states)} CUDA RNG states, only {n} devices are visible", stacklevel=2)
                for i in range(n):
                    torch.cuda.set_rng_state(cuda_states[i], i)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"checkpoint RNG state is malformed ({exc}); use another checkpoint or start a fresh run") from exc
