"""The typed run configuration: the :class:`Recipe` (what is trained) apart from the
:class:`Execution` (how the run is carried out), built from the spec's validated ``train:``
section and the :class:`~.options.TrainOptions`.

    spec train: (pydantic Train) ─┐
    TrainOptions (CLI, API) ──────┼─▶ RunConfig(recipe, execution) ──▶ optim.py, the Trainer, resume.py
    run.json "config" (checked) ──┘            │
                                               └── .record() ──▶ run.json "config" (the same flat format as ever)

The optimizer, schedule and augmentation stay the spec's pydantic models, so their defaults
are declared once (``spec/models.py``). ``run.json`` keeps its flat ``config`` object: the spec's
``train`` fields plus ``limit_train``, ``limit_test`` and, for an extended run, ``extensions``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

import torch

from ...errors import RunError
from ...spec.models import Schedule, Train
from ...spec.setting import settings_of
from .options import TrainOptions

_SETTINGS = settings_of(Train)
RECIPE_FIELDS = tuple(name for name, (_info, s) in _SETTINGS.items() if s.part == "recipe")
"""The spec's ``train`` fields that say what is trained (their ``Setting.part``, ``spec/models.py``)."""
EXECUTION_FIELDS = tuple(name for name, (_info, s) in _SETTINGS.items() if s.part == "execution")
"""The spec's ``train`` fields that say how the run is carried out (recorded in run.json too)."""
OVERRIDDEN = tuple(name for name, (_info, s) in _SETTINGS.items() if s.option)
"""The spec's ``train`` fields a :class:`~.options.TrainOptions` field of the same name overrides."""


@dataclass(frozen=True)
class Extension:
    """Epochs added to a finished run: a new schedule over ``epochs - from_epoch`` epochs."""

    from_epoch: int
    epochs: int
    lr: float
    schedule: Schedule

    def record(self) -> dict[str, Any]:
        """As stored in run.json."""
        return {"from_epoch": self.from_epoch, "epochs": self.epochs, "lr": self.lr,
                "schedule": self.schedule.model_dump(mode="json")}


def _with_settings(name: str, part: str, base: type, doc: str) -> type:
    """The frozen dataclass ``name``: ``base``'s fields, then one keyword field per ``train:`` setting of ``part``
    (its type from ``spec/models.py``), so a new setting reaches the runtime without another declaration."""
    own = [(n, info.annotation, field(kw_only=True)) for n, (info, s) in _SETTINGS.items() if s.part == part]
    cls = make_dataclass(name, own, bases=(base,), frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


@dataclass(frozen=True)
class _RecipeRest:
    """The recipe beyond the ``train:`` settings of part ``recipe``."""

    limit_train: int | None = None
    limit_test: int | None = None
    extensions: tuple[Extension, ...] = ()

    @property
    def crop_pad(self) -> int:
        """Random-crop padding (0 = no crop)."""
        return self.augment.crop_pad if self.augment else 0  # type: ignore[attr-defined]

    @property
    def flip(self) -> bool:
        """Random horizontal flip."""
        return bool(self.augment and self.augment.flip)  # type: ignore[attr-defined]


Recipe = _with_settings("Recipe", "recipe", _RecipeRest, """What is trained: the same recipe gives the same weights (bit
    for bit on CPU), however it is run. The ``train:`` settings of part ``recipe`` (dataset, batch_size, epochs,
    seed, optimizer, schedule, augment, ...), the data limits and any extensions.""")


@dataclass(frozen=True)
class _ExecutionRest:
    """How the run is carried out beyond the ``train:`` settings of part ``execution``: this attempt's settings."""

    device: str | None
    """Every partition on this device (None = the plan's placement)."""
    download: bool = False
    tensorboard: bool | None = None
    max_steps: int | None = None
    keep_checkpoints: int = 2
    eval_every_epoch: bool = True
    threads: int | None = None

    def amp_on(self, device: torch.device) -> bool:
        """bf16 autocast on ``device`` (``auto`` = on CUDA)."""
        amp = self.amp  # type: ignore[attr-defined]
        return amp == "bf16" or (amp == "auto" and device.type == "cuda")

    def channels_last_on(self, device: torch.device) -> bool:
        """channels_last memory format on ``device`` (``auto`` = on CUDA)."""
        cl = self.channels_last  # type: ignore[attr-defined]
        return cl == "on" or (cl == "auto" and device.type == "cuda")


Execution = _with_settings("Execution", "execution", _ExecutionRest, """How the run is carried out: devices,
    kernels, logging, checkpoints, when to stop. The ``train:`` settings of part ``execution`` (data_root, fused,
    fuse_siblings, amp, channels_last, compile, cuda_graphs, log_every, checkpoint_every, data, ...; see
    ``spec/models.py``) and this attempt's own settings.""")


def _run_only(opts: TrainOptions) -> dict[str, Any]:
    """The execution settings that are not recorded in run.json (they apply to this attempt only): the
    :class:`Execution` fields that are neither ``train`` settings nor the device."""
    return {f.name: getattr(opts, f.name) for f in fields(Execution) if f.name not in (*EXECUTION_FIELDS, "device")}


@dataclass(frozen=True)
class RunConfig:
    """A run's settings: ``recipe`` (what) and ``execution`` (how)."""

    recipe: Recipe
    execution: Execution

    @classmethod
    def of(cls, train: Train, opts: TrainOptions, *, device: str | None, limit_train: int | None = None,
           limit_test: int | None = None, extensions: tuple[Extension, ...] = ()) -> "RunConfig":
        """The config of a checked ``train`` section run with ``opts``' run-only settings."""
        recipe = Recipe(**{k: getattr(train, k) for k in RECIPE_FIELDS}, limit_train=limit_train,
                        limit_test=limit_test, extensions=tuple(extensions))
        execution = Execution(device=device, **{k: getattr(train, k) for k in EXECUTION_FIELDS}, **_run_only(opts))
        return cls(recipe, execution)

    @classmethod
    def from_record(cls, cfg: dict[str, Any], opts: TrainOptions | None = None, *,
                    device: str | None = None) -> "RunConfig":
        """The config of a checked run.json ``config`` (see :func:`~.run_dir.read_run_record`).

        Raises:
            ValueError: a field that is not what the spec's ``train`` section allows.
        """
        train = Train.model_validate({k: v for k, v in cfg.items() if k in Train.model_fields})
        try:
            exts = tuple(Extension(int(e["from_epoch"]), int(e["epochs"]), float(e["lr"]),
                                   Schedule.model_validate(e["schedule"])) for e in cfg.get("extensions") or [])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.extensions: {exc}") from None
        return cls.of(train, opts or TrainOptions(), device=device, limit_train=cfg.get("limit_train"),
                      limit_test=cfg.get("limit_test"), extensions=exts)

    def train(self) -> Train:
        """The spec's ``train`` section this config runs."""
        r, e = self.recipe, self.execution
        return Train.model_construct(**{k: getattr(r, k) for k in RECIPE_FIELDS},
                                     **{k: getattr(e, k) for k in EXECUTION_FIELDS})

    def record(self) -> dict[str, Any]:
        """run.json's ``config``: the ``train`` fields, ``limit_train``, ``limit_test``, any ``extensions``."""
        out = self.train().model_dump(mode="json")
        out["limit_train"], out["limit_test"] = self.recipe.limit_train, self.recipe.limit_test
        if self.recipe.extensions:
            out["extensions"] = [e.record() for e in self.recipe.extensions]
        return out


def scale_schedule(sched: Schedule, ratio: float) -> Schedule:
    """The schedule for a run ``ratio`` times as long: warm-up and milestones scale with it."""
    update: dict[str, Any] = {}
    if sched.warmup_epochs:
        update["warmup_epochs"] = sched.warmup_epochs * ratio
    if sched.milestones:
        update["milestones"] = [m * ratio for m in sched.milestones]
    return sched.model_copy(update=update, deep=True)


def new_run_config(spec_train: dict[str, Any], opts: TrainOptions) -> RunConfig:
    """The config of a new run: the artifact's ``train`` section with the options applied.

    Overriding ``epochs`` keeps the recipe's shape: the warm-up and the multistep milestones
    scale with the run length (160 epochs with 10 of warm-up run as 16 with 1).

    Raises:
        SpecError: a bad ``--set``; RunError: an option value the ``train`` section does not allow.
    """
    from pydantic import ValidationError

    cfg = copy.deepcopy(spec_train)
    if opts.overrides:
        from ...spec.overrides import override_train
        cfg = override_train(cfg, opts.overrides)
    spec_epochs = cfg.get("epochs", Train.model_fields["epochs"].default)
    cfg.update({k: getattr(opts, k) for k in OVERRIDDEN if getattr(opts, k) is not None})
    if opts.lr is not None:
        cfg["optimizer"] = {**(cfg.get("optimizer") or {}), "lr": opts.lr}
    try:
        train = Train.model_validate(cfg)  # once: the section with every option applied
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RunError(f"train.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    if opts.epochs is not None and opts.epochs != spec_epochs:
        train = train.model_copy(update={"schedule": scale_schedule(train.schedule, train.epochs / spec_epochs)})
    return RunConfig.of(train, opts, device=opts.device, limit_train=opts.limit_train, limit_test=opts.limit_test)


__all__ = ["Execution", "Extension", "Recipe", "RunConfig", "new_run_config", "scale_schedule"]
