"""``--set a.b.c=VALUE``: change any spec field from the command line.

    "train.optimizer.weight_decay=5e-4"  ──parse──▶  (("train", "optimizer", "weight_decay"), 0.0005)
    spec data (from YAML)  ──apply──▶  the same data with the field set  ──▶  the usual validation

Values are read as YAML (with the same safe loader as spec files), so ``5e-4``, ``true``,
``[s1.b0, 5]`` and ``{kind: cosine}`` mean what they mean in a spec; list items are
addressed by index (``model.layers.3.out=32``). Errors in an overridden field name the
``--set`` option instead of a YAML line.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..errors import SpecError
from .yaml_loader import LineMap, load_yaml

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$|^[0-9]+$")


def parse_override(text: str) -> tuple[tuple[str | int, ...], Any]:
    """Split ``"a.b.c=VALUE"`` into its field path and YAML value.

    Args:
        text: the option's argument.

    Returns:
        ``(path, value)``; path items that are digits become list indices.

    Raises:
        SpecError: no ``=``, an empty or malformed path, or a value that is not YAML.
    """
    where = f"--set {text}"
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(_KEY.match(p) for p in parts):
        raise SpecError("expected --set FIELD.PATH=VALUE with a dotted path of spec fields, e.g. "
                        "--set train.optimizer.weight_decay=5e-4 or --set cuts.width=2", file=where)
    try:
        value, _ = load_yaml(raw if raw.strip() else "null", file=where)
    except SpecError as exc:
        raise SpecError(f"the value is not valid YAML ({exc.message})", file=where) from None
    return tuple(int(p) if p.isdigit() else p for p in parts), value


def apply_overrides(data: Any, overrides: list[str], lines: LineMap | None = None) -> tuple[Any, dict[tuple, str]]:
    """Set every ``--set`` field in a copy of the spec data.

    Args:
        data: the spec as parsed YAML (not changed).
        overrides: ``"a.b=VALUE"`` strings, applied in order.
        lines: the spec's line map; entries of overridden fields are removed from it.

    Returns:
        ``(new data, {path: option text})``.

    Raises:
        SpecError: a malformed option, or a path through a value that is not a mapping or
            list (names the option and what is there).
    """
    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    done: dict[tuple, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                raise SpecError(_cannot(path, i, node), file=f"--set {text}")
        last = path[-1]
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            raise SpecError(_cannot(path, len(path) - 1, node), file=f"--set {text}")
        done[path] = f"--set {text}"
        if lines is not None:
            for p in [p for p in lines if p[:len(path)] == path]:
                del lines[p]
    return out, done


def _cannot(path: tuple, i: int, node: Any) -> str:
    head = ".".join(map(str, path[:i])) or "the spec"
    if isinstance(node, list):
        return f"'{head}' is a list of {len(node)} items; address one by index 0..{len(node) - 1}"
    return f"'{head}' is {type(node).__name__} {node!r}, not a mapping; it has no field '{path[i]}'"


def relabel(err: SpecError, done: dict[tuple, str]) -> SpecError:
    """Point an error in an overridden field at its ``--set`` option instead of a YAML line.

    Args:
        err: a spec error (or :class:`~gndgl_compiler.errors.SpecErrors`).
        done: what :func:`apply_overrides` returned.

    Returns:
        ``err``, with ``file``/``line`` of the affected errors replaced.
    """
    from ..errors import SpecErrors

    def fix(e: SpecError) -> SpecError:
        for path, option in done.items():
            dotted = ".".join(str(p) for p in path)
            norm = re.sub(r"\[(\d+)\]", r".\1", e.path)
            if norm == dotted or norm.startswith(dotted + ".") or (norm and dotted.startswith(norm + ".")):
                return SpecError(e.message, path=e.path, line=None, file=option)
        return e

    if isinstance(err, SpecErrors):
        return SpecErrors([fix(e) for e in err.errors])
    return fix(err)


def override_train(train: dict, overrides: list[str]) -> dict:
    """Apply ``train.*`` overrides to a compiled artifact's ``train`` section and validate it.

    Args:
        train: the artifact's ``train`` section (plain data; not changed).
        overrides: ``"train.a.b=VALUE"`` strings.

    Returns:
        The checked section as plain data (defaults filled in).

    Raises:
        SpecError: a field outside ``train`` (the network is compiled: recompile to change it),
            or an invalid value (naming the option).
    """
    from pydantic import ConfigDict, ValidationError, create_model

    from .load import spec_errors_from_validation
    from .models import Train

    for text in overrides:
        path, _ = parse_override(text)
        if path[0] != "train" or len(path) < 2:
            raise SpecError("an artifact is already compiled; only train.* fields can change here. To change "
                            f"'{'.'.join(map(str, path))}', recompile: gndgl compile SPEC --set {text}",
                            file=f"--set {text}")
    data, done = apply_overrides({"train": train}, overrides)
    only_train = create_model("TrainSection", __config__=ConfigDict(extra="forbid"), train=(Train, ...))
    try:
        checked = only_train.model_validate(data)
    except ValidationError as exc:  # locations start at 'train', as in a spec file
        raise relabel(spec_errors_from_validation(exc, data, LineMap(), None), done) from None
    return checked.train.model_dump(mode="json")
