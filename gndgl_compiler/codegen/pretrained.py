"""Initial weights from a state dict: torchvision's names ⇄ gndgl's, and each partition's slice.

gndgl names a network's tensors after its op-graph nodes (``spec → graph``), whatever the cuts:

    torchvision                      gndgl (op graph)
    conv1.* / bn1.*                  stem.* / stem_bn.*
    layer<s>.<j>.conv<i>.*           s<s>.b<j>.conv<i>.*
    layer<s>.<j>.bn<i>.*             s<s>.b<j>.bn<i>.*
    layer<s>.<j>.downsample.0.*      s<s>.b<j>.shortcut.*
    layer<s>.<j>.downsample.1.*      s<s>.b<j>.shortcut_bn.*
    fc.*                             fc.*

:func:`load_full_state` copies such a state dict into the partition modules of a plan: partition (k, g)
takes, of every tensor of its units, group g's output channels (rows) and — for a layer reading only its
group's slice — group g's input channels (columns); a dense-in layer keeps all columns. At K = G = 1 this
is the whole network; at G > 1 a layer that was dense becomes its block-diagonal part (the width-cut network
is a different, grouped network, DESIGN §2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import GndglError
from ..partition.groups import group_offset
from ..partition.plan import PartitionPlan
from ..spec.imagenet import IMAGENET_CONFIGS
from .modules import PartitionModule

_TV_UNIT = re.compile(r"^layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$")
_GN_UNIT = re.compile(r"^s(\d+)\.b(\d+)\.(conv\d|bn\d|shortcut|shortcut_bn)\.(\w+)$")
_TV_TOP = {"conv1": "stem", "bn1": "stem_bn", "fc": "fc"}
_GN_TOP = {v: k for k, v in _TV_TOP.items()}
_TV_PART = {"downsample.0": "shortcut", "downsample.1": "shortcut_bn"}
_GN_PART = {v: k for k, v in _TV_PART.items()}


class InitError(GndglError):
    """A state dict does not fit the network (unknown, missing or mis-shaped tensors; exit 2)."""


def _check_template(name: str) -> tuple[int, ...]:
    if name not in IMAGENET_CONFIGS:
        raise InitError(f"'{name}' is not a torchvision template; valid: {', '.join(IMAGENET_CONFIGS)}")
    return IMAGENET_CONFIGS[name].blocks


def _rename(key: str, unit: re.Pattern, top: dict, part: dict, fmt: str, blocks: tuple[int, ...]) -> str:
    head, _, leaf = key.partition(".")
    if head in top and leaf and "." not in leaf:
        return f"{top[head]}.{leaf}"
    m = unit.match(key)
    if m is None:
        raise InitError(f"tensor '{key}' is not one of the network's (stem, stages 1-4, fc)")
    s, j, layer, leaf = int(m[1]), int(m[2]), m[3], m[4]
    if not (1 <= s <= len(blocks) and j < blocks[s - 1]):
        raise InitError(f"tensor '{key}': stage {s} block {j} is not in this network (blocks per stage: "
                        f"{list(blocks)})")
    return fmt.format(s=s, j=j, layer=part.get(layer, layer), leaf=leaf)


def from_torchvision(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ``models.<name>()`` state dict with gndgl's names (see the module docstring).

    Args:
        name: a torchvision template (``resnet50``, ``resnext101_32x8d``, ...).
        state_dict: e.g. ``torchvision.models.resnet50(weights=...).state_dict()``.

    Returns:
        The same tensors (not copied), keyed by op-graph names: the input of :func:`load_full_state`
        or of ``train.init`` (saved with ``torch.save``).

    Raises:
        InitError: an unknown template, or a tensor that the template does not have.
    """
    blocks = _check_template(name)
    return {_rename(k, _TV_UNIT, _TV_TOP, _TV_PART, "s{s}.b{j}.{layer}.{leaf}", blocks): v
            for k, v in state_dict.items()}


def to_torchvision(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_torchvision`: gndgl's op-graph names → torchvision's ``<name>`` names."""
    blocks = _check_template(name)
    return {_rename(k, _GN_UNIT, _GN_TOP, _GN_PART, "layer{s}.{j}.{layer}.{leaf}", blocks): v
            for k, v in state_dict.items()}


def looks_torchvision(keys) -> bool:
    """True when a state dict uses torchvision's ResNet names (``conv1.weight``, ``layer1.0...``)."""
    return any(k == "conv1.weight" or k.startswith("layer1.") for k in keys)


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (loaded with ``weights_only=True``; a
    checkpoint dict holding ``state_dict`` or ``model`` is unwrapped).

    Raises:
        InitError: the file is missing or holds no mapping of names to tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise InitError(f"initial-weights file '{p}' does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise InitError(f"cannot read initial weights from '{p}': {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InitError(f"'{p}' does not hold a state dict (a mapping of names to tensors)")
    return sd


def _slice(full: torch.Tensor, target: torch.Tensor, groups: int, g: int, key: str) -> torch.Tensor:
    """Group g's block of ``full`` with ``target``'s shape: rows (dim 0) and columns (dim 1) that differ."""
    out = full
    for dim in range(min(2, full.dim())):
        if full.shape[dim] != target.shape[dim]:
            start, size = group_offset(full.shape[dim], groups, g, "balanced")
            out = out.narrow(dim, start, size)
    if out.shape != target.shape:
        raise InitError(f"tensor '{key}' has shape {list(full.shape)}; this network needs {list(target.shape)}"
                        + (f" (its group {g} of {groups}: {list(target.shape)})" if groups > 1 else ""))
    return out


def _owned(plan: PartitionPlan, parts: dict[int, PartitionModule]):
    """(partition, submodule, op-graph node) of every layer with tensors a full state dict provides."""
    for p in plan.partitions:
        pm = parts.get(p.id)
        if pm is None:
            continue
        lists = [(pm.body, p.body)]
        if p.kind in ("final", "e2e") or p.head_kind.startswith("final:model"):
            lists.append((pm.aux, p.head))
        for gm, nodes in lists:
            for n in nodes:
                if n.source and hasattr(gm, n.name) and isinstance(getattr(gm, n.name), nn.Module):
                    yield p, getattr(gm, n.name), n.source


def load_full_state(plan: PartitionPlan, parts: dict[int, PartitionModule], state: Mapping[str, torch.Tensor],
                    optional: tuple[str, ...] = ()) -> int:
    """Copy a full-network state dict (op-graph names) into the partitions, each taking its slice.

    Args:
        plan: the partition plan.
        parts: its modules (any subset).
        state: ``{"<op-graph node>.<tensor>": tensor}``, e.g. from :func:`from_torchvision`.
        optional: op-graph nodes whose tensors may be absent (keep their fresh initialisation) or unused,
            e.g. the classifier ``fc`` when fine-tuning to another number of classes or when a 1c2f final
            head replaces it.

    Returns:
        The number of tensors copied.

    Raises:
        InitError: a tensor the network needs is missing, one it does not have, or a shape mismatch.
    """
    used, copied = set(), 0
    for p, mod, source in _owned(plan, parts):
        for leaf, t in mod.state_dict().items():
            key = f"{source}.{leaf}"
            if key not in state:
                if source in optional:
                    continue
                raise InitError(f"the initial weights have no '{key}' (the state dict has {len(state)} tensors, "
                                f"e.g. {', '.join(list(state)[:3])})")
            with torch.no_grad():
                t.copy_(_slice(state[key], t, p.groups, p.group, key) if t.dim() else state[key])
            used.add(key)
            copied += 1
    if len(parts) == len(plan.partitions):
        extra = sorted(k for k in set(state) - used if k.rsplit(".", 1)[0] not in optional)
        if extra:
            raise InitError(f"{len(extra)} tensor(s) of the initial weights are not in this network, e.g. "
                            f"{', '.join(extra[:3])}")
    return copied


def resolve_init(path: str, spec_file: str | None) -> Path:
    """``train.init`` as a path: as given (relative to the working directory), else next to the spec file."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and spec_file:
        beside = Path(spec_file).parent / p
        if beside.exists():
            return beside
    return p


def init_from_file(path: str | Path, template: str | None, plan: PartitionPlan,
                   parts: dict[int, PartitionModule], classifier: list[str]) -> int:
    """``train.init``: read a state-dict file, map torchvision's names if it uses them, load every
    partition's slice (:func:`load_full_state`; the ``classifier`` nodes may be absent).

    Raises:
        InitError: unreadable file, torchvision names for a network that is not a torchvision template,
            missing, unknown or mis-shaped tensors.
    """
    state = read_state_file(path)
    if looks_torchvision(state):
        if template not in IMAGENET_CONFIGS:
            raise InitError(f"'{path}' has torchvision's names (conv1, layer1, ...) but the model is not a "
                            f"torchvision template (valid: {', '.join(IMAGENET_CONFIGS)})")
        state = from_torchvision(template, state)
    return load_full_state(plan, parts, state, optional=tuple(classifier))


def full_state(plan: PartitionPlan, parts: dict[int, PartitionModule]) -> dict[str, torch.Tensor]:
    """The network's tensors with op-graph names (the inverse of :func:`load_full_state` when every module
    has one group): e.g. ``to_torchvision(name, full_state(plan, parts))`` gives a trained K-module run's
    weights to ``torchvision.models.<name>()``.

    Raises:
        InitError: a module with G > 1 (its layers are block-diagonal parts of the dense ones).
    """
    out: dict[str, torch.Tensor] = {}
    for p, mod, source in _owned(plan, parts):
        if p.groups > 1:
            raise InitError(f"partition {p.name} is one of {p.groups} width groups; a full state dict needs G = 1")
        out.update({f"{source}.{leaf}": t for leaf, t in mod.state_dict().items()})
    return out
