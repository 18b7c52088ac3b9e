"""Where partitions run: resolve and check devices, turn out-of-memory into a clear error;
synthetic data shaped like a plan's input."""

from __future__ import annotations

import torch

from ...api import Artifact
from ...errors import DeviceError, TrainingError


def resolve_devices(art: Artifact, device: str | None) -> dict[int, torch.device]:
    """Device of every partition, checked against what this machine has.

    Raises:
        DeviceError: a device that does not exist, naming ``--device`` as the fix.
    """
    return {p.id: check_device(device or p.device, f"partition {p.name} is placed on") for p in art.plan.partitions}


def check_device(name: str, who: str = "--device asks for") -> torch.device:
    """``name`` as a device this machine has (``who`` starts the message: ``"--device asks for"`` or ``"partition
    m1.g0 is placed on"``).

    Raises:
        DeviceError: an unknown or unsupported device, or a CUDA index this machine does not have.
    """
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if (dev.index or 0) >= n:
            fix = "--device cpu" if n == 0 else f"--device cpu or --device cuda:{n - 1 if n > 1 else 0}"
            raise DeviceError(f"{who} {name} but this machine has {n} CUDA device(s); remap with {fix}")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"unsupported device '{name}'")
    return dev


def synthetic_like(plan, batch_size: int | None = None) -> dict:
    """``synthetic`` data shaped like the network's input, with its number of classes, so that any
    spec can be smoke-tested with ``--dataset synthetic``: at least two batches of ``batch_size``
    training images (512 by default), so a spec's own batch size always fits."""
    out = {"shape": tuple(plan.input_shape), "num_classes": plan.num_classes}
    if batch_size:
        out["n_train"] = max(512, 2 * batch_size)
    return out


def guard_oom(fn, device: torch.device, bs: int):
    """Run ``fn()``; out of memory becomes a :class:`TrainingError` that suggests a smaller batch.

    Args:
        fn: the step to run.
        device: where it runs (for the message).
        bs: the batch size (the message suggests half of it).

    Returns:
        What ``fn`` returns.

    Raises:
        TrainingError: the device ran out of memory.
    """
    try:
        return fn()
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of memory on {device} with batch size {bs}; try --batch-size {max(1, bs // 2)}"
                            ) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise TrainingError(f"out of memory on {device} with batch size {bs}; try --batch-size "
                                f"{max(1, bs // 2)}") from None
        raise
