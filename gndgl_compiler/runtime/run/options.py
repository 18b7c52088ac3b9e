"""The training options, declared once: ``gndgl train``'s flags, the worker's argparse and the
launcher's argv are all derived from the fields of :class:`TrainOptions` and :class:`LaunchOptions`.

Each field carries its flag, metavar, help, bounds and where it goes (``part``: ``recipe`` = what
is trained, ``execution`` = how, ``run`` = which run directory, ``launch`` = the distributed
launch) in its metadata (:func:`option`). A field without metadata is API-only (callbacks).

    TrainOptions / LaunchOptions fields ─┬─▶ cli/train_cmd.py   Typer parameters (flags, help, metavars)
                                         ├─▶ worker_parser()    argparse of ``python -m gndgl_compiler.worker``
                                         └─▶ worker_argv(...)   the argv ``--workers N`` gives each rank
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
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


@_documented
@dataclass
class TrainOptions:
    """Overrides of the spec's ``train`` section and run settings (None = keep the spec's).

    ``train_artifact(source, TrainOptions(...))`` takes these; ``gndgl train`` has one flag per field
    shown with ``[--flag]``, the others are for the Python API. See docs/api.md."""

    epochs: int | None = option(None, "--epochs",
                                "Override train.epochs (the warm-up and LR milestones scale with it).",
                                metavar="N", min=1, part="recipe")
    dataset: str | None = option(None, "--dataset", "Override train.dataset (cifar10, fashion-mnist, synthetic, a "
                                 "folder/.tar.gz, ...).", metavar="NAME|PATH", part="recipe")
    data_root: str | None = option(None, "--data-root", "Where data set files live.", metavar="DIR")
    download: bool = option(False, "--download", "Let torchvision download CIFAR (needs internet).", worker=False)
    device: str | None = option(None, "--device", "Run every partition on this device (cpu, cuda, cuda:N).",
                                metavar="DEVICE")
    """Put every partition on this device (overrides the placement)."""
    batch_size: int | None = option(None, "--batch-size", "Override train.batch_size.", metavar="N", min=1,
                                    part="recipe")
    lr: float | None = option(None, "--lr", "Override the peak learning rate.", metavar="LR", min=0.0, part="recipe")
    seed: int | None = option(None, "--seed", "Override train.seed.", metavar="N", min=0, part="recipe")
    fused: bool | None = option(None, "--fused/--no-fused", "Per-device fused step (default from the spec).")
    fuse_siblings: bool | None = option(None, "--fuse-siblings/--no-fuse-siblings", "Run each module's sibling "
                                        "partitions on one device as one program (default from the spec).")
    """Sibling fusion (see ``Train.fuse_siblings``); a checkpoint of either setting resumes with the other."""
    amp: str | None = api_field(None, "Override train.amp: auto, bf16 or off (bf16 autocast; API only).")
    compile: str | None = option(None, "--compile", "torch.compile each sibling-fused module's program: off or "
                                 "regional (default from the spec, train.compile).", metavar="off|regional")
    """``train.compile`` (``runtime/step/compile.py``); a resumed run may change it."""
    cuda_graphs: str | None = option(None, "--cuda-graphs", "Capture each step as one CUDA graph: auto, on or off "
                                     "(default from the spec, train.cuda_graphs).", metavar="auto|on|off")
    """``train.cuda_graphs`` (``runtime/step/cuda_graphs.py``); a resumed run may change it."""
    channels_last: str | None = api_field(None, "Override train.channels_last: auto, on or off (API only).")
    run_dir: str | None = option(None, "--run-dir", "Run directory (default runs/<name>-<time>).", metavar="DIR",
                                 part="run")
    resume: str | None = option(None, "--resume", "Continue an interrupted run directory.", metavar="RUN_DIR",
                                part="run")
    limit_train: int | None = option(None, "--limit-train", "Use only N training images.", metavar="N", min=1,
                                     part="recipe")
    limit_test: int | None = option(None, "--limit-test", "Use only N test images.", metavar="N", min=1,
                                    part="recipe")
    max_steps: int | None = option(None, "--max-steps", "Stop after N steps (checkpointed).", metavar="N", min=1)
    """Stop after this many global steps (for smoke tests)."""
    checkpoint_every: int | None = option(None, "--checkpoint-every", "Also checkpoint every N steps.", metavar="N",
                                          min=0)
    log_every: int | None = option(None, "--log-every", "Log every N steps.", metavar="N", min=1)
    tensorboard: bool | None = option(None, "--tensorboard/--no-tensorboard", "TensorBoard logs (default: when "
                                      "installed).", worker=False)
    overrides: list[str] | None = option(None, "--set", "Set any spec field (repeatable), e.g. --set "
                                         "train.optimizer.weight_decay=5e-4; on a compiled artifact only train.* "
                                         "fields.", metavar="FIELD=VALUE", part="recipe")
    """``"train.a.b=VALUE"`` changes of the artifact's ``train`` section (``--set``), validated like a spec."""
    threads: int | None = option(None, "--threads", "Intra-op threads of this process.", metavar="N", min=1,
                                 cli=False)
    eval_every_epoch: bool = api_field(True, "Evaluate on the test set at the end of every epoch.")
    keep_checkpoints: int = api_field(2, "How many step checkpoints to keep (older ones are pruned).")
    on_log: Callable[[dict], None] | None = api_field(None, "Called with every record: kinds setup, note, train, "
                                                      "eval (schemas in docs/api.md).", repr=False)
    """Called with every metrics record (and, flagged ``partial``, the last window before a stop)."""
    on_progress: ProgressFn | None = api_field(None, "Called with a ProgressEvent per training step, test batch "
                                               "and decoded chunk (docs/api.md).", repr=False)
    """Called with a :class:`ProgressEvent` per step, test batch and decoded chunk (host data only)."""


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


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


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
           "describe", "from_args", "option", "worker_argv",
           "worker_parser"]
