"""The Python API: compile a spec (or only plan it), load an artifact.

    >>> from gndgl_compiler import compile_spec, load_artifact
    >>> art = compile_spec("specs/resnet32_k8g4.yaml", out_dir="compiled")
    >>> art = load_artifact("compiled")
    >>> art.summary["training_speedup"]
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from .artifact import (RECOMPILE, find_artifact, load_state_tensors, read_json, read_manifest, read_plan,
                       read_weights, write_artifact)
from .codegen.modules import PartitionModule, build_assembled, build_partitions, copy_ema_from_u
from .errors import GndglError, PartitionError, SpecError
from .graph.build import OpGraph, build_graph
from .partition.partitioner import build_plan
from .partition.placement import place
from .partition.plan import PartitionPlan
from .partition.validate import validate_plan
from .spec.load import load_spec, spec_error
from .spec.models import Spec


@dataclass
class Artifact:
    """A compiled spec: the plan, the partition modules and where it lives."""

    spec: dict[str, Any]
    """The normalised spec as plain data."""
    plan: PartitionPlan
    modules: dict[int, PartitionModule]
    path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """End-to-end / max-partition MACs and speed-ups (DESIGN §4)."""
        return self.plan.summary

    @property
    def train_config(self) -> dict[str, Any]:
        """The spec's ``train`` section."""
        return self.spec["train"]

    @functools.cached_property
    def final_head(self) -> dict[str, Any]:
        """The final head: its kind, the model classifier units it replaced, notes and warnings
        (:func:`~gndgl_compiler.partition.final_report.final_head_report`; ``gndgl compile`` prints them)."""
        from .partition.final_report import final_head_report

        spec = load_spec(self.spec)
        return final_head_report(spec, build_graph(spec), self.plan)

    def assembled(self) -> fx.GraphModule:
        """The inference network (bodies + final head), sharing weights with ``modules``."""
        return build_assembled(self.plan, self.modules)


MAX_PARAMS = 250_000_000
"""Most parameters (bodies and heads) a compile allocates, initialises and writes: 1 GB of fp32."""


def _check_params(spec: Spec, plan: PartitionPlan) -> None:
    """Refuse a plan whose weights would not fit, before allocating any of them."""
    total = plan.summary["params"]
    if total <= MAX_PARAMS:
        return
    heads = total - sum(p.costs["body_params"] for p in plan.partitions)
    path = ("local", "head") if heads > total - heads else ("model",)
    raise spec_error(spec, path, f"the partitions have {total:,} parameters ({heads:,} in heads), "
                                 f"{total * 4 / 2**30:.1f} GiB of fp32 weights; gndgl compiles at most {MAX_PARAMS:,}; "
                                 "use a narrower model (model.width, 'out' of the units), fewer classes, a smaller "
                                 "local.head.hidden or fewer modules/groups")


def _spec_of(source: str | os.PathLike | dict | Spec, overrides: list[str] | None = None) -> Spec:
    if isinstance(source, Spec):
        if overrides:
            raise SpecError("overrides apply to a spec file, YAML text or data, not to a loaded Spec; pass "
                            "them to load_spec(path, overrides=...)")
        return source
    return load_spec(source, overrides=overrides)


def _gc_paused(fn):
    """Run ``fn`` with the cyclic garbage collector paused (restored afterwards).

    Building 129 partitions creates ~10^5 small Python objects (fx nodes, modules) that all
    stay alive; the collector's repeated full passes over them cost ~20% of the pipeline.
    Reference counting still frees everything that is not cyclic.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapper


def _front(spec: Spec) -> tuple[OpGraph, PartitionPlan]:
    """Graph and validated plan of a loaded spec; a stage's error becomes a SpecError naming the field."""
    try:
        og = build_graph(spec)
    except GndglError as err:
        raise spec_error(spec, ("model",), str(err)) from None
    try:
        plan = build_plan(spec, og)
        validate_plan(plan, og)
    except PartitionError as err:
        path = err.field or (("cuts", "width") if "G=" in str(err) else ("cuts", "depth"))
        raise spec_error(spec, path, str(err)) from None
    return og, plan


def _load_init(spec: Spec, og: OpGraph, plan: PartitionPlan, modules: dict) -> None:
    """``train.init``: the partitions start from a state-dict file (its errors name the field)."""
    from .codegen.pretrained import InitError, init_from_file, resolve_init
    try:
        init_from_file(resolve_init(spec.train.init, getattr(spec, "_file", None)), spec.model.template, plan,
                       modules, og.classifier.nodes)
    except InitError as err:
        raise spec_error(spec, ("train", "init"), str(err)) from None
    for p in plan.partitions:  # MAN: the EMA units start as copies of the loaded U
        if p.man is not None:
            copy_ema_from_u(modules[p.id], modules[p.man.source])


def plan_spec(source: str | os.PathLike | dict | Spec, *, workers: int | None = None,
              overrides: list[str] | None = None) -> PartitionPlan:
    """The front half of :func:`compile_spec`: spec → graph → validated partition plan, no modules.

    Args:
        source: a spec path, YAML text, parsed data or a :class:`Spec`.
        workers: override ``placement.workers``.
        overrides: ``"a.b.c=VALUE"`` field overrides (``--set``), validated like the spec.

    Returns:
        The :class:`PartitionPlan` (costs and summary included).

    Raises:
        SpecError: the spec is invalid, or its cuts impossible for the network (field, line, what is allowed).
    """
    spec = _spec_of(source, overrides)
    if workers is not None:
        spec.placement.workers = workers
    return _front(spec)[1]


@_gc_paused
def compile_spec(source: str | os.PathLike | dict | Spec, out_dir: str | os.PathLike | None = None,
                 *, workers: int | None = None, overrides: list[str] | None = None) -> Artifact:
    """Compile a spec: graph → partitions → fx modules (and write the artifact).

    Args:
        source: a spec path, YAML text, parsed data or a :class:`Spec`.
        out_dir: where to write the artifact; ``None`` keeps it in memory.
        workers: override ``placement.workers``.
        overrides: ``"a.b.c=VALUE"`` field overrides (``--set``), validated like the spec.

    Returns:
        The :class:`Artifact`.

    Raises:
        SpecError: the spec is invalid (field, line, what is allowed).
        ArtifactError: the output directory cannot be written.
    """
    spec = _spec_of(source, overrides)
    if workers is not None:
        spec.placement.workers = workers
    og, plan = _front(spec)
    _check_params(spec, plan)
    modules = build_partitions(plan, seed=spec.train.seed)
    if spec.train.init:
        _load_init(spec, og, plan, modules)
    spec_json = spec.model_dump(mode="json")
    art = Artifact(spec_json, plan, modules)
    if out_dir is not None:
        segments = [{"index": s.index, "name": s.name, "units": s.units, "nodes": s.nodes, "output": s.output}
                    for s in og.segments]
        train = {"optimizer": spec_json["train"]["optimizer"], "schedule": spec_json["train"]["schedule"],
                 "per_partition": True}
        art.path = write_artifact(out_dir, spec_json=spec_json, graph=og.graph, segments=segments, plan=plan,
                                  train=train, parts=modules)
        art.manifest = read_manifest(art.path, verify=False)
    return art


@_gc_paused
def load_artifact(path: str | os.PathLike, *, workers: int | None = None, rank: int | None = None,
                  verify: bool = True, remedy: str = RECOMPILE) -> Artifact:
    """Load a compiled artifact: verify hashes, rebuild modules from the plan, load weights.

    Args:
        path: the artifact directory, or a folder of them (``compiled/``: its only or
            newest artifact, see :func:`~gndgl_compiler.artifact.find_artifact`).
        workers: re-place the partitions over this many distributed workers.
        rank: build only the partitions placed on this worker.
        verify: check every file's sha256 against the manifest.
        remedy: what error messages about damaged files tell the user to do (a run
            directory's copy of its artifact cannot simply be recompiled).

    Returns:
        The :class:`Artifact`.

    Raises:
        ArtifactError: missing, tampered or incompatible files.
    """
    d = find_artifact(path)
    manifest = read_manifest(d, verify=verify, remedy=remedy)
    spec = read_json(d, "spec.json", remedy)
    plan = read_plan(d, remedy)
    if workers is not None:
        place(plan, plan.devices, workers)
    ids = None if rank is None else [p.id for p in plan.partitions if p.worker == rank]
    modules = build_partitions(plan, seed=0, ids=ids, copy_ema=False)  # every weight (EMA too) comes from the file
    load_state_tensors(modules, plan, read_weights(d, remedy), str(d / "weights.safetensors"))
    return Artifact(spec, plan, modules, d, manifest)


__all__ = ["Artifact", "SpecError", "compile_spec", "load_artifact", "load_spec", "plan_spec"]
