"""Load a spec from YAML and turn pydantic errors into messages that name the
field path, the YAML line, what was found and what is allowed."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import SpecError, SpecErrors
from .models import LAYER_OPS, NAME_PATTERN, Spec
from .overrides import apply_overrides, relabel
from .templates import expand_model
from .yaml_loader import LineMap, load_yaml

MAX_SPEC_BYTES = 1_000_000


def _yaml_path(data: Any, loc: tuple) -> tuple:
    """Drop pydantic's union-tag elements from ``loc`` so it follows the YAML data."""
    out: list = []
    node = data
    for i, part in enumerate(loc):
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(node, dict) and part not in node and (node.get("op") == part
                                                            or (nxt is not None and nxt in node)):
            continue  # a union/discriminator tag such as 'dropout' in layers[1].dropout.p
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in node:
            # a missing field, or a union/discriminator tag
            if part in _model_field_names():
                out.append(part)
                node = None
            continue
        else:
            continue
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _model_field_names() -> frozenset[str]:
    if True:
        names: set[str] = set()

        def walk(schema: Any) -> None:
            if isinstance(schema, dict):
                for key, val in schema.items():
                    if key == "properties" and isinstance(val, dict):
                        names.update(val)
                    walk(val)
            elif isinstance(schema, list):
                for val in schema:
                    walk(val)

        walk(Spec.model_json_schema())
    return frozenset(names)


def _allowed_keys(data: Any, path: tuple) -> list[str]:
    """Field names allowed at the parent of ``path`` (for 'unknown key' messages)."""
    from . import models

    parent = path[:-1]
    cls: Any = Spec
    node = data
    for part in parent:
        if isinstance(part, int):
            if cls is None:
                return []
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        node = node.get(part) if isinstance(node, dict) else None
        if field is None:
            return []
        ann = field.annotation
        cls = None
        for cand in (models.Model, models.Cuts, models.Local, models.Head, models.Diversity, models.FinalHead,
                     models.Placement, models.Train, models.Optimizer, models.Schedule, models.Augment,
                     models.RandomResizedCrop, models.DataFeed):
            if ann is cand or cand in getattr(ann, "__args__", ()):
                cls = cand
        if part == "layers":
            cls = "layers"
    if cls == "layers" and isinstance(node, dict):
        op = node.get("op")
        for cand in (models.Conv, models.BN, models.ReLU, models.MaxPool, models.AvgPool, models.AdaptiveAvgPool,
                     models.Flatten, models.Linear, models.Dropout, models.Block):
            if cand.model_fields["op"].annotation.__args__[0] == op:
                cls = cand
    return sorted(getattr(cls, "model_fields", {}))


def _show(value: Any) -> str:
    """A short JSON-like rendering of a found value (any data, e.g. a dict with bytes keys given to the API)."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):  # keys json cannot write (bytes, dates, ...)
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


TUPLE_ITEMS = {"input_shape": (3, "C, H, W"), "recon_weight": (2, "at the first and the last local module"),
               "task_weight": (2, "at the first and the last local module"), "betas": (2, "beta1, beta2")}
"""What the entries of each fixed-length list field of the spec are (for messages)."""


def _tuple_length(err: dict, data: Any, path: tuple) -> str | None:
    """'needs 3 values C, H, W; got 2' for a fixed-length list field given too few or too many entries."""
    kind, loc = err.get("type", ""), tuple(err.get("loc", ()))
    if kind == "missing" and loc and isinstance(loc[-1], int):
        field = loc[-2] if len(loc) > 1 else None
    elif kind == "too_long":
        field = loc[-1] if loc else None
    else:
        return None
    items = TUPLE_ITEMS.get(field) if isinstance(field, str) else None
    got = _lookup(data, path)
    if items is None or not isinstance(got, list):
        return None
    return f"needs {items[0]} values {items[1]}; got {len(got)} (found {_show(got)})"


def _lookup(data: Any, path: tuple) -> Any:
    node = data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _describe(err: dict, data: Any, path: tuple) -> str:
    kind = err.get("type", "")
    found = err.get("input")
    found_s = _show(found)
    key = path[-1] if path else ""
    if kind == "extra_forbidden":
        allowed = _allowed_keys(data, path)
        return f"unknown key '{key}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    tuple_msg = _tuple_length(err, data, path)
    if tuple_msg:
        return tuple_msg
    if kind == "missing":
        return "this required field is missing"
    if kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NAME_PATTERN:
        return (f"a name is 1 to 64 characters: letters, digits, '_', '.' and '-', starting with a letter or a "
                f"digit (no spaces or other signs) (found {found_s})")
    if kind == "union_tag_invalid":
        return (f"unknown op {found_s if not isinstance(found, dict) else _show(found.get('op'))}; "
                f"allowed ops: {', '.join(LAYER_OPS)}")
    if kind == "union_tag_not_found":
        return f"each unit needs an 'op'; allowed ops: {', '.join(LAYER_OPS)}"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return f"{msg} (found {found_s})"


def spec_errors_from_validation(exc: ValidationError, data: Any, lines: LineMap, file: str | None) -> SpecErrors:
    """Convert a pydantic ``ValidationError`` into :class:`SpecErrors` with lines."""
    errors: list[SpecError] = []
    seen: set[tuple] = set()
    for err in exc.errors():
        path = _yaml_path(data, tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            path = path if path and path[-1] == err["loc"][-1] else path + (err["loc"][-1],)
        msg = _describe(err, data, path)
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        errors.append(SpecError(msg, path=_dotted(path), line=lines.line_of(path), file=file))
        if len(errors) == 20:  # the first 20 are reported; a spec with 10⁵ unknown keys need not wait for the rest
            break
    return SpecErrors(errors)


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_spec(data: Any, lines: LineMap | None = None, file: str | None = None) -> Spec:
    """Validate already-parsed spec data.

    Args:
        data: the YAML document as plain Python data.
        lines: line numbers from :func:`load_yaml`, for messages.
        file: file name for messages.

    Returns:
        The validated :class:`Spec`.

    Raises:
        SpecError: naming the field, line, what was found and what is allowed.
    """
    lines = lines or LineMap()
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a YAML mapping with keys name, model, cuts, local, placement, train; "
                        f"found {type(data).__name__}", line=1, file=file)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise spec_errors_from_validation(exc, data, lines, file) from None
    names: dict[str, int] = {}
    try:
        expanded = expand_model(spec.model)
    except SpecError as err:
        path = tuple(err.path.split("."))
        raise SpecError(err.message, path=err.path, line=lines.line_of(path), file=file) from None
    for i, layer in enumerate(expanded):
        if layer.name in names:
            path = ("model", "layers", i, "name")
            raise SpecError(f"unit name '{layer.name}' is used twice (also by unit {names[layer.name]}); "
                            "names must be unique",
                            path=_dotted(path), line=lines.line_of(path), file=file)
        names[layer.name] = i
    _check_replicas(spec, lines, file)
    return spec


def _check_replicas(spec: Spec, lines: LineMap, file: str | None) -> None:
    """Refuse replicas the pipeline cannot run: with the sequential schedule, or not dividing the batch."""
    r = spec.placement.replicas
    if r == 1:
        return
    path = ("placement", "replicas")
    if spec.local.schedule == "sequential":
        raise SpecError(f"{r} replicas with local.schedule: sequential; replicas run the distributed (parallel) "
                        "pipeline: use schedule: parallel or replicas: 1", path=_dotted(path),
                        line=lines.line_of(path), file=file)
    if spec.train.batch_size % r:
        raise SpecError(f"{r} replicas do not divide train.batch_size {spec.train.batch_size}: every replica takes "
                        f"batch_size / replicas rows; use a batch size that is a multiple of {r}",
                        path=_dotted(path), line=lines.line_of(path), file=file)


def load_spec(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> Spec:
    """Load and validate a spec.

    Args:
        source: a path to a YAML file, YAML text, or already-parsed data.
        overrides: ``"a.b.c=VALUE"`` strings (``--set``) applied before validation; see
            :mod:`gndgl_compiler.spec.overrides`.

    Returns:
        The validated :class:`Spec`, with ``spec_lines`` (a LineMap) and ``spec_file``
        attached as private attributes for later error messages.

    Raises:
        SpecError: the file cannot be read or the spec is invalid.
    """
    if isinstance(source, dict):
        return _parse_with(source, LineMap(), None, overrides)
    text: str | bytes
    file: str | None = None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and
                                            (source.endswith((".yaml", ".yml")) or os.path.exists(source))):
        path = Path(source)
        file = str(source)
        if path.is_dir():
            raise SpecError(f"'{path}' is a directory; give a spec file (.yaml)", file=None)
        try:
            if path.stat().st_size > MAX_SPEC_BYTES:
                raise SpecError(f"the file is larger than {MAX_SPEC_BYTES // 1000} kB; is it really a spec?", file=file)
            text = path.read_bytes()
        except FileNotFoundError:
            raise SpecError(f"spec file '{path}' does not exist; see specs/ for examples") from None
        except OSError as exc:
            raise SpecError(f"cannot read spec file '{path}': {exc.strerror}") from None
    else:
        text = source
    data, lines = load_yaml(text, file=file)
    return _parse_with(data, lines, file, overrides)


def _parse_with(data: Any, lines: LineMap, file: str | None, overrides: list[str] | None) -> Spec:
    """:func:`parse_spec` after the ``--set`` overrides; errors in overridden fields name the option."""
    done: dict[tuple, str] = {}
    if overrides:
        data, done = apply_overrides(data, list(overrides), lines)
    try:
        spec = parse_spec(data, lines, file)
    except SpecError as err:
        raise relabel(err, done) from None
    spec._lines, spec._file, spec._overrides = lines, file, done  # type: ignore[attr-defined]
    return spec


def spec_error(spec: Spec, path: tuple, message: str) -> SpecError:
    """Build a :class:`SpecError` for a later stage, with the line of ``path`` if known."""
    lines: LineMap = getattr(spec, "_lines", None) or LineMap()
    err = SpecError(message, path=_dotted(path), line=lines.line_of(path), file=getattr(spec, "_file", None))
    return relabel(err, getattr(spec, "_overrides", None) or {})
