"""``evaluate_run``: test accuracy of a finished or partial run (its newest weights)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ...artifact import load_state_tensors
from ..run.config import RunConfig
from ..step.devices import synthetic_like, resolve_devices
from ..step.executor import Executor
from ..run.directory import load_run_artifact, read_run_record, run_weights
from ..data.select import FeedRequest, load_feed


def evaluate_run(run_dir: str | Path, device: str | None = None, limit_test: int | None = None) -> dict[str, Any]:
    """Test accuracy of a finished or partial run (latest weights or checkpoint).

    Raises:
        GndglError: not a run directory, or no weights in it.
    """
    run_dir = Path(run_dir)
    saved = read_run_record(run_dir)
    art = load_run_artifact(run_dir, saved)
    config = RunConfig.from_record(saved["config"])
    tensors, source = run_weights(run_dir, saved)
    load_state_tensors(art.modules, art.plan, tensors, str(run_dir))
    devices = resolve_devices(art, device or "cpu")
    root = config.execution.data_root
    if root and not Path(root).expanduser().is_dir():
        warnings.warn(f"the run's data root {root} (run.json) is no longer a folder; looking for "
                      f"'{config.recipe.dataset}' in the default places", stacklevel=2)
        root = None
    first = devices[art.plan.partitions[0].id]
    r = config.recipe
    data = load_feed(FeedRequest(r.dataset, r.augment, tuple(art.plan.input_shape), first, config.execution.data,
                                 root, False, 1, limit_test or r.limit_test,
                                 synthetic_like(art.plan, r.batch_size)))  # streamed sets evaluate streamed
    ex = Executor(art.plan, art.modules, None, devices, per_device_optim=False,  # no optimizers
                  denorm=(data.mean, data.std))
    ev = ex.evaluate(data.batches(batch_size=256, seed=0, epoch=0, train=False, augment=False))
    ev["source"] = source
    return ev
