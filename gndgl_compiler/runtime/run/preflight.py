"""What can be checked of a run before anything is compiled, written or started: the common
mistakes (a data set that is not there, a ``--data-root`` that does not exist, a device this
machine lacks, a ``--run-dir`` that is a file or not empty, an artifact or run directory that is
not one) are refused here with exit 2, by ``gndgl train`` before it compiles a spec or starts
``--workers``, and by each torchrun rank before it joins the others."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...errors import RunError
from .config import RunConfig, new_run_config
from ..data.sources import check_source
from ..step.devices import check_device
from .options import TrainOptions


def check_config(config: RunConfig, device: str | None = None, plan_devices: tuple[str, ...] = ()) -> None:
    """The data set (name or path, ``--data-root``) and the devices of a run (``device``, else the plan's).

    Raises:
        DataError, DeviceError: what is wrong and what to do.
    """
    check_source(config.recipe.dataset, root=config.execution.data_root, download=config.execution.download)
    for name in dict.fromkeys([device] if device else plan_devices):
        check_device(name)


def check_new_run_dir(requested: str | None) -> None:
    """``--run-dir`` of a new run: absent, or an empty directory.

    Raises:
        RunError: it is a file, or a directory that is not empty.
    """
    if not requested:
        return
    d = Path(requested)
    if d.exists() and not d.is_dir():
        raise RunError(f"--run-dir '{d}' is a file, not a directory; give a new or empty directory (or leave "
                       "--run-dir out for runs/NAME-TIME/)")
    if d.is_dir() and any(d.iterdir()):
        raise RunError(f"run directory '{d}' is not empty; resume it with --resume {d} or choose another")


def check_resume_source(source: str | Path | None, resume: str, own: Path | None = None) -> None:
    """Refuse an artifact or spec given together with ``--resume`` (it would be ignored), unless it is
    ``own``, the run's own copy of its artifact.

    Raises:
        RunError: naming what is used instead.
    """
    if source is None or (own is not None and Path(source).resolve() == Path(own).resolve()):
        return
    raise RunError(f"'{source}' and --resume {resume} were both given, but a resumed run continues with its own "
                   f"copy of the artifact ({Path(resume) / 'artifact'}) and its recorded settings, so '{source}' "
                   f"would be ignored; drop it (gndgl train --resume {resume}), or leave out --resume to start a new "
                   "run from it")


def check_spec_run(spec_train: dict, opts: TrainOptions) -> None:
    """A new run of a spec that is about to be compiled (``--set`` already applied to ``spec_train``)."""
    check_new_run_dir(opts.run_dir)
    check_config(new_run_config(spec_train, dataclasses.replace(opts, overrides=None)), opts.device)
