"""The training options, declared once: ``gndgl train``'s flags, the worker's argparse and the
launcher's argv are all derived from the fields of :class:`TrainOptions` and :class:`LaunchOptions`.

``TrainOptions`` is derived: one field per setting of the spec's ``train:`` section that declares an option
(``spec/models.py`` ``Train``, each field's ``Setting``), then the run's own options (:class:`_RunOptions`).
Each field carries its flag, metavar, help, bounds, where it goes (``part``: ``recipe`` = what is trained,
``execution`` = how, ``run`` = which run directory, ``launch`` = the distributed launch) and what a resumed run
does with it (``resume``) in its metadata (:func:`option`). A field without a flag is API-only.

    Train settings + _RunOptions ─▶ TrainOptions / LaunchOptions fields ─┬─▶ cli/train_cmd.py  Typer parameters
                                                                         ├─▶ worker_parser()   the worker's argparse
                                                                         └─▶ worker_argv(...)  ``--workers N``'s argv
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Callable

from .progress import ProgressFn


@dataclass(frozen=True)
class Option:
    """How one option is spelled and where it goes."""

    flags: str
    """``--name`` or ``--name/--no-name`` (an on/off flag)."""
    help: str
    metavar: str | None = None
    min: float | None = None
    max: float | None = None
    part: str = "execution"
    """``recipe``, ``execution``, ``run``, ``launch`` or ``display``."""
    cli: bool = True
    """A ``gndgl train`` flag."""
    worker: bool = True
    """A flag of the distributed worker (passed on by ``--workers N``)."""
    resume: str = "attempt"
    """What ``--resume`` does with it: ``applies``, ``refused``, ``extends`` or ``attempt`` (spec/setting.py)."""

    @property
    def flag(self) -> str:
        """The option's (first) flag, e.g. ``--fused``."""
        return self.flags.split("/")[0]


def option(default: Any, flags: str, help: str, **kw: Any) -> Any:
    """A dataclass field with its :class:`Option` in the metadata (its ``help`` is the field's description)."""
    return field(default=default, metadata={"option": Option(flags, help, **kw)})


def api_field(default: Any, doc: str, *, repr: bool = True) -> Any:
    """A dataclass field of the Python API only (no flag), with its one-line description."""
    return field(default=default, repr=repr, metadata={"doc": doc})


def describe(cls: type) -> str:
    """One line per field of ``cls``: name, type, default and description (for ``help(cls)``)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in fields(cls):
        opt = f.metadata.get("option")
        doc = opt.help if opt is not None else f.metadata.get("doc", "")
        flag = f" [{opt.flags}]" if opt is not None and opt.cli else ""
        typ = getattr(hints[f.name], "__name__", None) if not typing.get_args(hints[f.name]) else None
        typ = typ or str(hints[f.name]).replace("typing.", "")
        lines.append(f"        {f.name} ({typ}, default {f.default!r}){flag}: {doc}")
    return "\n".join(lines)


def _documented(cls: type) -> type:
    """Append the fields' descriptions to the docstring of the dataclass ``cls`` (``help(cls)`` shows them)."""
    cls.__doc__ = f"{(cls.__doc__ or '').rstrip()}\n\n    Fields:\n{describe(cls)}\n"
    return cls


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@dataclass
class _RunOptions:
    """The TrainOptions fields that are not settings of the spec's ``train:`` section (those are derived from
    ``spec/models.py`` ``Train``: :func:`_train_fields`)."""

    download: bool = option(False, "--download", "Let torchvision download CIFAR (needs internet).", worker=False)
    device: str | None = option(None, "--device", "Run every partition on this device (cpu, cuda, cuda:N).",
                                metavar="DEVICE", resume="applies")
    lr: float | None = option(None, "--lr", "Override the peak learning rate.", metavar="LR", min=0.0, part="recipe",
                              resume="extends")
    run_dir: str | None = option(None, "--run-dir", "Run directory (default runs/<name>-<time>).", metavar="DIR",
                                 part="run", resume="refused")
    resume: str | None = option(None, "--resume", "Continue an interrupted run directory.", metavar="RUN_DIR",
                                part="run")
    limit_train: int | None = option(None, "--limit-train", "Use only N training images.", metavar="N", min=1,
                                     part="recipe", resume="refused")
    limit_test: int | None = option(None, "--limit-test", "Use only N test images.", metavar="N", min=1,
                                    part="recipe", resume="refused")
    max_steps: int | None = option(None, "--max-steps", "Stop after N steps (checkpointed).", metavar="N", min=1)
    tensorboard: bool | None = option(None, "--tensorboard/--no-tensorboard", "TensorBoard logs (default: when "
                                      "installed).", worker=False)
    overrides: list[str] | None = option(None, "--set", "Set any spec field (repeatable), e.g. --set "
                                         "train.optimizer.weight_decay=5e-4; on a compiled artifact only train.* "
                                         "fields.", metavar="FIELD=VALUE", part="recipe", resume="refused")
    threads: int | None = option(None, "--threads", "Intra-op threads of this process.", metavar="N", min=1,
                                 cli=False)
    eval_every_epoch: bool = api_field(True, "Evaluate on the test set at the end of every epoch.")
    keep_checkpoints: int = api_field(2, "How many step checkpoints to keep (older ones are pruned).")
    on_log: Callable[[dict], None] | None = api_field(None, "Called with every record: kinds setup, note, train, "
                                                      "eval (schemas in docs/api.md).", repr=False)
    on_progress: ProgressFn | None = api_field(None, "Called with a ProgressEvent per training step, test batch "
                                               "and decoded chunk (docs/api.md).", repr=False)


def _option_type(annotation: Any) -> Any:
    """The TrainOptions type of a ``train:`` field's type: ``None`` stripped, a ``Literal`` of strings as ``str``."""
    typ = _without_none(annotation)
    return str if typing.get_origin(typ) is typing.Literal else typ


def _train_fields() -> list[tuple[str, Any, Any]]:
    """One TrainOptions field (default None = the spec's) per ``train:`` setting that declares ``option``: its flag,
    help, metavar and part from its :class:`~gndgl_compiler.spec.setting.Setting`, its lower bound from its ``ge``."""
    from ...spec.models import Train
    from ...spec.setting import settings_of

    out = []
    for name, (info, s) in settings_of(Train).items():
        if not s.option:
            continue
        if s.flags is None:
            meta: dict[str, Any] = {"doc": s.help, "resume": s.resume}
        else:
            low = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
            meta = {"option": Option(s.flags, s.help, s.metavar, min=low, part=s.part, worker=s.worker,
                                     resume=s.resume)}
        out.append((name, _option_type(info.annotation) | None, field(default=None, metadata=meta)))
    return out


def _train_options() -> type:
    """:class:`TrainOptions`: the ``train:`` settings' fields, then :class:`_RunOptions`' (``help()`` lists them)."""
    hints = typing.get_type_hints(_RunOptions)
    run = [(f.name, hints[f.name], field(default=f.default, repr=f.repr, metadata=f.metadata))
           for f in fields(_RunOptions)]
    cls = make_dataclass("TrainOptions", [*_train_fields(), *run], namespace={"__doc__": _TRAIN_OPTIONS_DOC})
    cls.__module__ = __name__
    return _documented(cls)


_TRAIN_OPTIONS_DOC = """Overrides of the spec's ``train`` section and run settings (None = keep the spec's).

    ``train_artifact(source, TrainOptions(...))`` takes these; ``gndgl train`` has one flag per field
    shown with ``[--flag]``, the others are for the Python API. See docs/api.md. The fields are derived from
    ``spec/models.py`` ``Train`` (its settings) and ``_RunOptions`` (the run's own options)."""
TrainOptions = _train_options()


def resume_rule(name: str) -> str:
    """What ``--resume`` does with TrainOptions field ``name`` (:data:`~gndgl_compiler.spec.setting.RESUME_RULES`)."""
    f = TrainOptions.__dataclass_fields__[name]
    opt = f.metadata.get("option")
    return opt.resume if opt is not None else f.metadata.get("resume", "attempt")


def option_label(name: str) -> str:
    """How a message names TrainOptions field ``name``: its flags, or its name (an API-only field)."""
    opt = TrainOptions.__dataclass_fields__[name].metadata.get("option")
    return opt.flags if opt is not None and opt.cli else name


@_documented
@dataclass
class LaunchOptions:
    """How ``gndgl train`` starts distributed ranks (not training settings)."""

    workers: int | None = option(None, "--workers", "Distributed: spawn N local worker processes.", metavar="N",
                                 min=1, part="launch", worker=False)
    replicas: int | None = option(None, "--replicas", "Distributed: R data-parallel copies of the pipeline (R·N "
                                  "processes; default: the spec's placement.replicas).", metavar="R", min=1,
                                  part="launch")
    timeout: float = option(300.0, "--timeout", "Distributed: seconds a rank waits for a peer.", metavar="SECONDS",
                            min=1.0, part="launch")
    port: int | None = option(None, "--port", "Distributed: rendezvous port (default: a free one).", metavar="PORT",
                              min=1, max=65535, part="launch", worker=False)


PROGRESS_EVERY_S = 30.0
"""Default seconds between progress lines in a pipe or log file: often enough that a log shows the run is
alive and how fast it goes (a CI job or ``tail -f`` sees a line every half minute, however long a step or a
log window takes), rare enough that an hour-long run logs ~120 lines."""


@_documented
@dataclass
class DisplayOptions:
    """How ``gndgl train`` / ``gndgl sweep`` show progress on the console (not training settings)."""

    progress_every: float = option(PROGRESS_EVERY_S, "--progress-every", "In a pipe or log file, print a progress "
                                   "line (step, s/step, ETA) after this many seconds without one.",
                                   metavar="SECONDS", min=0.0, part="display", worker=False)


def declared(cls: type) -> list[tuple[str, Any, Any, Option]]:
    """``(name, type, default, Option)`` of every declared option of ``cls``, in declaration order.

    ``type`` is the field's type without ``None`` (``int``, ``float``, ``str``, ``bool``, ``list[str]``).
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is None:
            continue
        out.append((f.name, _without_none(hints[f.name]), None if f.default is MISSING else f.default, opt))
    return out


def _base(typ: Any) -> Any:
    return typing.get_origin(typ) or typ


def worker_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The worker's argparse: every option with ``worker=True``, plus the artifact, ``--json``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("artifact", nargs="?", default="compiled", help="compiled artifact directory")
    for cls in (TrainOptions, LaunchOptions):
        for name, typ, default, opt in declared(cls):
            if not opt.worker:
                continue
            flags = opt.flags.split("/")
            if _base(typ) is bool:
                action = argparse.BooleanOptionalAction if len(flags) > 1 else "store_true"
                p.add_argument(flags[0], dest=name, action=action, default=default, help=opt.help)
            elif _base(typ) is list:
                p.add_argument(flags[0], dest=name, action="append", default=default, metavar=opt.metavar,
                               help=opt.help)
            else:
                p.add_argument(flags[0], dest=name, type=typ, default=default, metavar=opt.metavar, help=opt.help)
    p.add_argument("--json", action="store_true", help="end with the run summary as one JSON line")
    return p


def from_args(cls: type, args: argparse.Namespace | dict) -> Any:
    """An instance of ``cls`` from parsed arguments (options the parser does not have keep their default)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return cls(**{name: values[name] for name, *_ in declared(cls) if name in values})


def worker_argv(*options: Any) -> list[str]:
    """The worker flags that reproduce ``options`` (TrainOptions / LaunchOptions): every worker option
    that is set (not None, False or empty)."""
    argv: list[str] = []
    for opts in options:
        for name, typ, _default, opt in declared(type(opts)):
            val = getattr(opts, name)
            if not opt.worker or val is None or val is False and len(opt.flags.split("/")) == 1 or val == []:
                continue
            if _base(typ) is bool:
                argv.append(opt.flag if val else opt.flags.split("/")[1])
            elif _base(typ) is list:
                for item in val:
                    argv += [opt.flag, str(item)]
            else:
                argv += [opt.flag, str(val)]
    return argv


__all__ = ["DisplayOptions", "LaunchOptions", "Option", "PROGRESS_EVERY_S", "TrainOptions", "api_field", "declared",
           "describe", "from_args", "option", "option_label", "resume_rule", "worker_argv",
           "worker_parser"]
