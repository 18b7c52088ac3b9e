"""What ``run.json`` holds, typed: :class:`RunRecord`. Records written by any earlier version still load
(a missing ``fuse_siblings`` / ``data`` / ``world`` takes the value those runs had); keys this version does
not know are kept as they were.

    run.json ──▶ RunRecord.from_json (checked field by field) ──▶ .run_config(opts) ─▶ RunConfig
             ◀── .to_json()  ◀── .changed(time, **changes) (a resume that changed settings)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .config import RunConfig

_KNOWN = ("config", "device", "world", "source", "changes")


@dataclass(frozen=True)
class RunRecord:
    """A run's ``run.json``: its settings, where it ran, and what resumed attempts changed."""

    config: dict[str, Any]
    """The checked ``config``: every field of the spec's ``train`` section, ``limit_train``, ``limit_test`` and,
    for an extended run, ``extensions`` (:meth:`RunConfig.record`)."""
    device: str | None = None
    """``--device`` of the run (None = the plan's placement)."""
    world: int = 1
    """How many processes the run trains with (now)."""
    source: str | None = None
    """The artifact the run was started from."""
    changes: tuple[dict[str, Any], ...] = ()
    """One entry per resume that changed a setting: ``time`` and the new values."""
    other: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, kept as they were."""

    @classmethod
    def new(cls, config: RunConfig, *, world: int, source: str | None) -> "RunRecord":
        """The record of a new run."""
        return cls(config.record(), config.execution.device, world, source)

    @classmethod
    def from_json(cls, data: Any) -> "RunRecord":
        """The record of a parsed ``run.json``.

        Raises:
            ValueError: a missing or ill-typed field (named).
        """
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("no 'config' object")
        world = data.get("world", 1)
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise ValueError(f"'world' is {world!r}, not a positive integer")
        if not isinstance(data.get("device"), (str, type(None))):
            raise ValueError(f"'device' is {data['device']!r}, not a device name")
        config = dict(data["config"])
        check_config_record(config)
        changes = data.get("changes")
        listed = isinstance(changes, list)  # anything else is kept as it was, as before records were typed
        return cls(config, data.get("device"), world, data.get("source"), tuple(changes) if listed else (),
                   {k: v for k, v in data.items() if k not in _KNOWN or k == "changes" and not listed})

    def to_json(self) -> dict[str, Any]:
        """As written to ``run.json`` (the same keys as ever; ``changes`` only once there are some)."""
        out = {"config": self.config, "device": self.device, "world": self.world, "source": self.source,
               **self.other}
        if self.changes:
            out["changes"] = list(self.changes)
        return out

    def run_config(self, opts: Any = None) -> RunConfig:
        """The run's config, with ``opts``' settings of this attempt (``--max-steps``, ...)."""
        return RunConfig.from_record(self.config, opts, device=self.device)

    def changed(self, changes: dict[str, Any], *, config: RunConfig | None = None,
                world: int | None = None) -> "RunRecord":
        """This record after a resume that changed ``changes`` (the new ``config`` and / or ``world``)."""
        upd: dict[str, Any] = {"changes": (*self.changes, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **changes})}
        if config is not None:
            upd.update(config=config.record(), device=config.execution.device)
        if world is not None:
            upd["world"] = world
        return replace(self, **upd)


def check_config_record(cfg: dict) -> None:
    """Check the ``config`` of a ``run.json`` in place (fills nested defaults); ValueError names a bad field."""
    from pydantic import ValidationError

    from ...spec.models import Train
    from ...spec.setting import settings_of

    for name, (info, setting) in settings_of(Train).items():  # settings added after runs were recorded
        if setting.missing_ok and name not in cfg:
            default = info.get_default(call_default_factory=True)
            cfg[name] = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
    missing = sorted(set(Train.model_fields) - set(cfg))
    if missing:
        raise ValueError(f"config has no {', '.join(repr(m) for m in missing)}")
    if not isinstance(cfg.get("extensions", []), list):
        raise ValueError("config.extensions is not a list")
    for key in ("limit_train", "limit_test"):
        val = cfg.get(key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"config.{key} is {val!r}, not a positive integer or null")
    train = {k: v for k, v in cfg.items() if k not in ("limit_train", "limit_test", "extensions")}
    try:
        checked = Train.model_validate_json(json.dumps(train), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"config.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    cfg.update(checked.model_dump(mode="json"))
    RunConfig.from_record(cfg)  # the extensions


__all__ = ["RunRecord", "check_config_record"]
