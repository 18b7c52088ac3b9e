"""Nested training state ⇄ (flat name→tensor map, strict-JSON skeleton), for checkpoints.

:func:`flatten_state` turns dicts/lists/tuples/scalars/tensors into tensors + JSON;
special values are encoded as one-key objects whose key starts with ``$``
(``{"$tensor": name}``, ``{"$tuple": [...]}``, ``{"$float": "nan"}``,
``{"$dict": [[key, value], ...]}`` for dicts whose keys are not all plain strings).
:func:`unflatten_state` rebuilds the object exactly.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gndgl_compiler.errors import ArtifactError

_MARKERS = ("$tensor", "$tuple", "$float", "$dict")


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
        return {"$dict": [[_encode(k, _child(path, "$key"), tensors), _encode(v, _child(path, k), tensors)]
                          for k, v in obj.items()]}
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
