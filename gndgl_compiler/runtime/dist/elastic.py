"""Elastic restarts under torchrun: a restarted job continues its run by itself.

``torchrun --max-restarts K ... -m gndgl_compiler.worker ART --run-dir RUN ...`` restarts every
rank with the same arguments when one fails (``TORCHELASTIC_RESTART_COUNT`` > 0 on a restart). A
restarted rank whose run directory already holds ``run.json`` continues it as ``--resume RUN``
would, from the last committed checkpoint, and says so:

    attempt 0   ART --run-dir RUN ...   → new run RUN, commits ckpt 1, 2, 3 ─ rank killed
    attempt 1   ART --run-dir RUN ...   → "elastic restart 1 of 1: continuing RUN ..." ─ resumes step 3

The run directory comes from the launch arguments: ``--run-dir`` (recommended), else
``runs/<name>-<torchrun run id>`` when torchrun has a run id (``--rdzv-id``, or the one
``--standalone`` draws once per job, the same on every restart); with neither (run id ``none``) a
run is ``runs/<name>-<time>`` and a restart cannot find it, so it starts a new run (a warning says so).
The options that fix what a run trains (``--dataset``, ``--batch-size``, ...: ``resume.REFUSED``)
are the ones the run was started with and recorded in ``run.json``; a restart drops them and
continues with the record. A restart with another number of ranks (``--nnodes MIN:MAX``) re-places
the partitions (``runtime/checkpoint/replace.py``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
MAX_RESTARTS_ENV = "TORCHELASTIC_MAX_RESTARTS"
RUN_ID_ENV = "TORCHELASTIC_RUN_ID"


def restart_count(env: Mapping[str, str]) -> int:
    """Which restart of a torchrun job this is (0: its first attempt, or not under torchrun)."""
    try:
        return int(env.get(RESTART_ENV, "0") or 0)
    except ValueError:
        return 0


def default_run_dir(name: str, env: Mapping[str, str]) -> str | None:
    """``runs/<name>-<run id>`` under torchrun with a run id, else None (``runs/<name>-<time>``)."""
    run_id = env.get(RUN_ID_ENV, "")
    if not run_id or run_id == "none" or "/" in run_id or run_id.startswith("."):
        return None
    return str(Path("runs") / f"{name}-{run_id}")


def elastic_resume(args: argparse.Namespace, plan_name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """Fill in the run directory of a torchrun job and, on a restart, turn ``args`` into a resume.

    Args:
        args: the worker's parsed arguments (changed in place: ``run_dir``; on a restart of a run
            that exists, ``resume`` set, ``run_dir``, the artifact and the options fixed by the run cleared).
        plan_name: the artifact's network name (the default run directory's prefix).
        env: the environment (torchrun's variables).

    Returns:
        The line rank 0 prints when it continues a run (None: a start as usual).
    """
    from ..run.resume import REFUSED

    if args.resume or RESTART_ENV not in env:
        return None
    if not args.run_dir:
        args.run_dir = default_run_dir(plan_name, env)
    k = restart_count(env)
    if k == 0:
        return None
    if not args.run_dir:
        return (f"warning: elastic restart {k}: no --run-dir and no torchrun run id (--rdzv-id), so the run of the "
                "failed attempt cannot be found; starting a new run. Give --run-dir to continue it")
    run = Path(args.run_dir)
    if not (run / "run.json").is_file():
        return f"elastic restart {k}: {run} holds no run yet; starting it"
    for key in (*REFUSED, "lr"):
        if hasattr(args, key):
            setattr(args, key, None)
    args.resume, args.artifact = str(run), str(run / "artifact")
    return (f"elastic restart {k} of {env.get(MAX_RESTARTS_ENV, '?')}: continuing {run} from its last committed "
            "checkpoint (as --resume would)")
