"""``load_run``: a trained run directory → the inference network in hand.

    run_dir/ ── run.json, artifact/ ──▶ plan + partition modules (hash-verified, rebuilt from plan.json)
             ── weights.safetensors (or the newest checkpoint) ──▶ trained weights
             ── data.json (or the data set's statistics) ──▶ input normalisation, class names
    ──▶ TrainedNet: images in [0, 1] ─ normalise ─ assembled network ─▶ logits

Only JSON and safetensors files are read from the run directory: nothing is unpickled and no
stored code is executed (``artifact/code/*.py`` are hashed, never run).
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...api import Artifact
from ...artifact import load_state_tensors
from ...errors import DataError, RunError
from ...partition.plan import IMAGE
from ..data.sources import IDX_CLASSES, STATS, load_dataset
from ..run.config import RunConfig
from ..step.devices import synthetic_like
from ..run.directory import DATA_RECORD, load_run_artifact, latest_run, read_run_record, run_weights


class InputError(RunError):
    """Images given to a loaded network have the wrong shape or type (bad input, exit 2)."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; uint8 images (0..255) are first divided by 255.

    Args:
        mean, std: per-channel statistics in [0, 1] units (what the run trained with).
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images."""
        x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)
        return (x - self.mean) / self.std


class _Inference(nn.Module):
    """Shared behaviour of :class:`TrainedNet` and :class:`PartitionNet`: check, normalise, run ``net``."""

    normalize: Normalize
    net: fx.GraphModule
    input_shape: tuple[int, int, int]

    def _check(self, images: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # exporting: the shapes are those of the example input
        if not isinstance(images, torch.Tensor):
            raise InputError(f"expected a tensor of images N×{'×'.join(map(str, self.input_shape))}, "
                             f"got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise InputError(f"expected images N×{c}×{h}×{w} (float in [0, 1] or uint8 0..255), got shape "
                             f"{tuple(images.shape)}; add a batch dimension with x[None] and resize/convert to "
                             f"{c} channel(s) of {h}×{w}")
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise InputError(f"expected float images in [0, 1] or uint8 images 0..255, got {images.dtype}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits N×num_classes of images N×C×H×W (float in [0, 1], or uint8 0..255).

        Raises:
            InputError: wrong shape or dtype (not checked while tracing or exporting).
        """
        self._check(images)
        return self.net(self.normalize(images))


class PartitionNet(_Inference):
    """One partition as an early-exit classifier: images → logits of that partition's aux head.

    It runs the bodies the partition depends on (its inputs and the siblings it reads shares from),
    its own body and its aux head. Weights are shared with the :class:`TrainedNet` it came from.

    Attributes:
        name: the partition's name; ``net``: the fx GraphModule (normalised image → logits);
        ``body`` / ``head``: the partition's own body (its inputs → its output) and aux head
        (its output and sibling shares → a dict with ``"logits"``).
    """

    def __init__(self, parent: "TrainedNet", name: str, net: fx.GraphModule):
        super().__init__()
        self.name, self.input_shape, self.classes = name, parent.input_shape, parent.classes
        self.normalize, self.net = parent.normalize, net
        self.eval()

    @property
    def body(self) -> nn.Module:
        """The partition's own body module."""
        return getattr(self.net, self.name.replace(".", "_"))

    @property
    def head(self) -> nn.Module:
        """The partition's aux head module."""
        return self.net.aux_head


class TrainedNet(_Inference):
    """The assembled inference network of a run, with its trained weights and input normalisation.

    ``net(images)``: images N×C×H×W, float in [0, 1] (or uint8 0..255, divided by 255 first) →
    logits N×num_classes of the final head. It is in eval mode (BatchNorm uses its running
    statistics); ``net.classes[i]`` names class ``i``.

    Attributes:
        net: the assembled fx GraphModule (normalised image → logits); its ``state_dict()`` names are
            those of ``Artifact.assembled()``.
        artifact: the run's :class:`~gndgl_compiler.api.Artifact` (plan, partition modules).
        classes, num_classes, input_shape, mean, std: what the run trained with.
        run_dir: the run directory; source: where the weights came from (``"final weights"`` or a checkpoint);
        normalization_source: ``"data.json"`` or how the statistics were found for an older run.
    """

    def __init__(self, artifact: Artifact, record: dict[str, Any], run_dir: Path, source: str):
        super().__init__()
        self.artifact, self.run_dir, self.source = artifact, run_dir, source
        self.input_shape = tuple(int(s) for s in artifact.plan.input_shape)
        self.num_classes = int(artifact.plan.num_classes)
        self.classes: list[str] = list(record["classes"])
        self.mean, self.std = [float(v) for v in record["mean"]], [float(v) for v in record["std"]]
        self.normalization_source: str = record["origin"]
        self.normalize = Normalize(self.mean, self.std)
        self.net = artifact.assembled()
        self.eval()

    @property
    def partitions(self) -> list[str]:
        """Names of the partitions :meth:`partition` accepts (those whose aux head gives logits), in network order."""
        return [p.name for p in self.artifact.plan.partitions if "logits" in p.head_outputs]

    def partition(self, name: str) -> PartitionNet:
        """One partition with its aux head: a module images → that partition's logits.

        Args:
            name: a partition name, e.g. ``"m1.g0"`` (see :attr:`partitions`).

        Returns:
            A :class:`PartitionNet` sharing weights with this network (eval mode, same input convention).

        Raises:
            RunError: unknown name, or a partition whose head gives no logits (lists the valid names).
        """
        plan = self.artifact.plan
        by_name = {p.name: p for p in plan.partitions}
        if name not in self.partitions:
            what = "has no classifier head" if name in by_name else "is not a partition of this network"
            raise RunError(f"'{name}' {what}; valid partition names: {', '.join(self.partitions)}")
        target = by_name[name]
        return PartitionNet(self, name, _partition_graph(plan, self.artifact.modules, target.id))


def _partition_graph(plan, modules: dict, pid: int) -> fx.GraphModule:
    """fx graph: normalised image → the bodies partition ``pid`` needs → its aux head → logits."""
    parts = {p.id: p for p in plan.partitions}
    need, todo = set(), [pid]
    while todo:
        q = todo.pop()
        if q == IMAGE or q in need:
            continue
        need.add(q)
        todo += [i.source for i in parts[q].inputs] + [s.source for s in parts[q].shares]
    root, graph = nn.Module(), fx.Graph()
    env = {IMAGE: graph.placeholder("image")}
    for p in plan.partitions:
        if p.id in need:
            key = p.name.replace(".", "_")
            root.add_module(key, modules[p.id].body)
            env[p.id] = graph.create_node("call_module", key, tuple(env[i.source] for i in p.inputs), {}, name=key)
    target = parts[pid]
    shares = [graph.call_function(operator.getitem, (env[s.source], (slice(None), slice(None, s.channels))))
              for s in target.shares]
    root.add_module("aux_head", modules[pid].aux)
    head = graph.create_node("call_module", "aux_head", (env[pid], *shares), {}, name="aux_head")
    graph.output(graph.call_function(operator.getitem, (head, "logits")))
    graph.lint()
    return fx.GraphModule(root, graph, f"{target.name.replace('.', '_').title()}Exit")


def _data_record(run_dir: Path, saved: dict, art: Artifact) -> dict[str, Any]:
    """Normalisation and class names of a run: its ``data.json``, or for an older run the data set's."""
    c = int(art.plan.input_shape[0])
    path = run_dir / DATA_RECORD
    if path.is_file():
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            _check_record(rec, c, int(art.plan.num_classes))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise RunError(f"'{path}' is unreadable or damaged ({exc}); restore it, or delete it to use the "
                           "data set's statistics instead") from None
        return {**rec, "origin": DATA_RECORD}
    config = RunConfig.from_record(saved["config"])
    dataset = config.recipe.dataset
    origin = f"statistics of data set '{dataset}' (the run has no {DATA_RECORD})"
    try:  # an older run: the statistics the training data had, computed the same way
        data = load_dataset(dataset, root=config.execution.data_root, input_shape=tuple(art.plan.input_shape),
                            limit_train=1, limit_test=1, synthetic=synthetic_like(art.plan, config.recipe.batch_size))
        rec = {"mean": list(data.mean), "std": list(data.std), "classes": list(data.classes)}
    except DataError as exc:
        known = str(dataset).strip().lower().replace("_", "-").replace("fashionmnist", "fashion-mnist")
        if known not in STATS:
            raise RunError(f"'{run_dir}' has no {DATA_RECORD} (trained before gndgl recorded the input "
                           f"normalisation) and its data set '{dataset}' cannot be loaded here to recompute it "
                           f"({exc}). Load it where the data set is, or write {path} as "
                           '{"mean": [...], "std": [...], "classes": [...]} with the per-channel statistics in '
                           "[0, 1] units") from None
        mean, std = STATS[known]
        rep = c // len(mean) if c % len(mean) == 0 else 1  # grey images trained on a 3-channel net
        names = IDX_CLASSES.get(known) or [str(i) for i in range(int(art.plan.num_classes))]
        rec, origin = {"mean": list(mean) * rep, "std": list(std) * rep, "classes": list(names)}, \
            f"standard statistics of '{known}' (the run has no {DATA_RECORD} and the data set is not here)"
    _check_record(rec, c, int(art.plan.num_classes))
    return {**rec, "origin": origin}


def _check_record(rec: Any, channels: int, num_classes: int) -> None:
    """ValueError naming the bad field of a data record."""
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    for key in ("mean", "std"):
        val = rec.get(key)
        if (not isinstance(val, list) or len(val) != channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in val)):
            raise ValueError(f"'{key}' must be a list of {channels} finite numbers, got {val!r}")
    if not all(v > 0 for v in rec["std"]):
        raise ValueError(f"'std' must be positive, got {rec['std']!r}")
    classes = rec.get("classes")
    if not isinstance(classes, list) or len(classes) != num_classes or not all(isinstance(v, str) for v in classes):
        raise ValueError(f"'classes' must be a list of {num_classes} names")


def load_run(run_dir: str | Path | None = None) -> TrainedNet:
    """The trained network of a run directory, ready for inference.

    Args:
        run_dir: a directory made by ``gndgl train``; default: the newest run in ``./runs``.

    Returns:
        A :class:`TrainedNet` on the CPU in eval mode: ``net(images)`` takes images N×C×H×W, float
        in [0, 1] (or uint8 0..255), normalises them as in training and returns logits.
        ``net.partition(name)`` gives one partition with its aux head.

    Raises:
        RunError: not a run directory, a damaged ``run.json`` / ``data.json`` / weights file, or no
            weights or checkpoints yet (each message says what to do).
        ArtifactError: the run's ``artifact/`` copy was modified.
    """
    run_dir = Path(run_dir) if run_dir is not None else latest_run()
    saved = read_run_record(run_dir)
    art = load_run_artifact(run_dir, saved)
    tensors, source = run_weights(run_dir, saved)
    load_state_tensors(art.modules, art.plan, tensors, str(run_dir))
    return TrainedNet(art, _data_record(run_dir, saved, art), run_dir, source)


__all__ = ["InputError", "Normalize", "PartitionNet", "TrainedNet", "load_run"]
