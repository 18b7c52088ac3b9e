"""What a resumed run may change, and the learning rate of an extended run.

``gndgl train --resume RUN`` continues with the settings recorded in ``run.json``. Options
that only change how the run is carried out (``--device``, ``--log-every``,
``--checkpoint-every``, ``--data-root``, ``--fuse-siblings`` (the checkpoint layout is the
same either way), ``--cuda-graphs`` (the same step, captured or not), ``--compile``, ``--max-steps``,
``--tensorboard``) apply and are
recorded; options that would change what is trained (``--dataset``, ``--batch-size``,
``--seed``, ``--set``, ...) are refused with a message. ``--epochs`` changes the length of an
unfinished run (warm-up and milestones scale, as for a new run) or, on a finished one,
**extends** it: the added epochs run as a new schedule of the recipe's kind (a warm restart
from the trained weights, peak ``--lr`` or the recipe's), recorded in ``extensions``:

    epochs 0 ──── recipe schedule ────▶ E₀ ── new schedule over E₁−E₀ ──▶ E₁
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ...errors import RunError
from .config import Extension, RunConfig, scale_schedule
from .record import RunRecord
from .options import TrainOptions, option_label, resume_rule

_FIELDS = [f.name for f in fields(TrainOptions)]
APPLIES = tuple(name for name in _FIELDS if resume_rule(name) == "applies")
"""Options a resumed run takes (recorded in run.json; their resume rule, ``spec/models.py`` / ``options.py``);
``max_steps`` and ``tensorboard`` (rule ``attempt``) apply to the attempt only."""
REFUSED = {name: option_label(name) for name in _FIELDS if resume_rule(name) == "refused"}
"""Options that would change what is trained, and how the refusal names them."""


def _refused(opts: Any, recorded: dict[str, Any]) -> list[str]:
    """The refused options ``opts`` gives: any value, except a switch given as the run already has it
    (``--no-sync-bn`` on a run without it changes nothing)."""
    given = {key: getattr(opts, key, None) for key in REFUSED}
    return [REFUSED[key] for key, val in given.items()
            if val not in (None, []) and not (isinstance(val, bool) and val == recorded.get(key))]


def resume_config(run_dir: Path, record: RunRecord, opts: Any, *, sequential: bool = False
                  ) -> tuple[RunConfig, list[str], RunRecord]:
    """The run's config with the resume options applied.

    Args:
        run_dir: the run directory (``summary.json`` tells whether it finished).
        record: its checked ``run.json`` record (not changed).
        opts: the :class:`~gndgl_compiler.runtime.run.options.TrainOptions` given.
        sequential: the run trains module by module (cannot be extended).

    Returns:
        ``(config, notes, record)``: the config to train with, one line per applied change and the record
        with the changes (``config``, ``device``, one more ``changes`` entry; the same record if none).

    Raises:
        RunError: an option that cannot change on resume, or ``--epochs`` not beyond a
            finished run's length.
    """
    run = record.run_config(opts)
    recipe, execution = run.recipe, run.execution
    refused = _refused(opts, record.config)
    finished = _finished(run_dir)
    lr_ok = finished and opts.epochs is not None and opts.epochs > recipe.epochs
    if opts.lr is not None and not lr_ok:
        refused.append("--lr")
    if refused:
        raise RunError(f"{', '.join(refused)} cannot change when resuming: the run continues with the settings it "
                       f"started with (in {run_dir / 'run.json'}). Start a new run to change them"
                       + ("; --lr is allowed with --epochs that extends a finished run" if "--lr" in refused else ""))
    notes: list[str] = []
    changes: dict[str, Any] = {}
    for key in APPLIES:
        val, old = getattr(opts, key, None), getattr(execution, key)
        if val is not None and old != val:
            notes.append(f"{key.replace('_', '-')}: {old} → {val}")
            changes[key] = val
    execution = replace(execution, **changes)
    if opts.epochs is not None and opts.epochs != recipe.epochs:
        old = recipe.epochs
        if finished:
            if opts.epochs < old:
                raise RunError(f"the run already finished its {old} epochs; --epochs {opts.epochs} would shorten it. "
                               f"Give --epochs N with N > {old} to extend it")
            if sequential:
                raise RunError("a run with the sequential schedule cannot be extended; start a new run")
            ext = Extension(from_epoch=old, epochs=opts.epochs,
                            lr=opts.lr if opts.lr is not None else recipe.optimizer.lr,
                            schedule=scale_schedule(recipe.schedule, (opts.epochs - old) / old))
            recipe = replace(recipe, extensions=(*recipe.extensions, ext))
            notes.append(f"extended from {old} to {opts.epochs} epochs: a new {recipe.schedule.kind} schedule "
                         f"over the {opts.epochs - old} added epochs (peak lr {ext.lr:g})")
        else:
            recipe = replace(recipe, schedule=scale_schedule(recipe.schedule, opts.epochs / old))
            notes.append(f"epochs: {old} → {opts.epochs} (warm-up and milestones scaled)")
        recipe = replace(recipe, epochs=opts.epochs)
        changes["epochs"] = opts.epochs
    run = RunConfig(recipe, execution)
    return run, notes, record.changed(changes, config=run) if changes else record


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False
