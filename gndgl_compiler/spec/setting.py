"""One declaration per training setting: what the spec's ``train:`` fields carry besides their type, default and
description (``spec/models.py``), as ``Annotated`` metadata that pydantic keeps and leaves out of the schema.

    Train field ─ type, default, bounds, description (pydantic)
                └ Setting(part, resume, flags, help, metavar) ─┬─▶ TrainOptions field, ``gndgl train`` flag, worker
                                                               │   argv (``runtime/run/options.py``)
                                                               ├─▶ Recipe / Execution field lists (``run/config.py``)
                                                               └─▶ resume rules APPLIES / REFUSED (``run/resume.py``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARTS = ("recipe", "execution", "compile")
"""``recipe``: what is trained; ``execution``: how the run is carried out; ``compile``: used at compile time."""
RESUME_RULES = ("applies", "refused", "extends", "attempt")
"""What ``--resume`` does with a changed value: ``applies`` (taken and recorded in run.json), ``refused`` (exit 2),
``extends`` (``--epochs``: lengthens the run; ``--lr`` with it), ``attempt`` (this attempt only, not recorded)."""


@dataclass(frozen=True)
class Setting:
    """How a ``train:`` field is overridden (a TrainOptions field, a flag), which part of the run it belongs to and
    what a resumed run does with it."""

    part: str
    """One of :data:`PARTS`."""
    resume: str
    """One of :data:`RESUME_RULES`."""
    flags: str | None = None
    """``--name`` or ``--name/--no-name``; None = a TrainOptions field of the Python API only."""
    help: str = ""
    """The flag's (or API field's) one-line help."""
    metavar: str | None = None
    worker: bool = True
    """A flag of the distributed worker too."""
    option: bool = True
    """TrainOptions overrides it (False: only ``--set train.NAME=...``)."""
    missing_ok: bool = False
    """Added after runs were recorded: a ``run.json`` without it takes the default (else such a record is damaged)."""


def settings_of(model: type) -> dict[str, tuple[Any, Setting]]:
    """``{name: (FieldInfo, Setting)}`` of every field of the pydantic ``model`` that declares a :class:`Setting`,
    in declaration order."""
    out = {}
    for name, info in model.model_fields.items():
        found = [m for m in info.metadata if isinstance(m, Setting)]
        if found:
            out[name] = (info, found[0])
    return out


__all__ = ["PARTS", "RESUME_RULES", "Setting", "settings_of"]
