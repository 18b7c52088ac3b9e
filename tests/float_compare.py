"""Float comparisons that mean "the same computation up to rounding" on any CPU.

A tensor's own norm is no denominator when the tensor is ~0 in exact arithmetic: the gradient of a
bias that a BatchNorm follows is exactly zero, and a BatchNorm bias a few steps from its zero init is
mostly rounding. Its "relative error" is then rounding noise over rounding noise, and which kernels a
CPU picks (AVX-512 on one machine, AVX2 on another) decides whether it passes. So every tensor's error
here is measured against the scale of its whole group — a partition's update, its weights, a group's
gradient — which is far from zero in exact arithmetic. A tensor that is zero in exact arithmetic then
passes exactly when both sides agree it is zero up to rounding of that scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` for a quantity that is not ~0 in exact arithmetic (a loss, a whole network's
    weights); use :func:`scaled_error` for single tensors that can be."""
    norm = float(b.double().norm())
    assert norm > 0, "rel() needs a reference that is not zero; compare to a group's scale (scaled_error)"
    return float((a.double() - b.double()).norm()) / norm


def scale(tensors: Iterable[torch.Tensor]) -> float:
    """The norm of all ``tensors`` together (float64)."""
    return float(torch.cat([t.detach().double().reshape(-1) for t in tensors]).norm())


def scaled_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """Worst ``(‖got[k] − want[k]‖ / S, k)`` over ``want``'s keys, ``S`` the norm of all of ``want``
    together."""
    s = scale(want.values())
    assert s > 0, "the reference group is all zero: nothing to compare against"
    return max((float((got[k].double() - v.double()).norm()) / s, k) for k, v in want.items())


def floats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's floating-point state (parameters and buffers such as BatchNorm's running stats)."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def module_error(got: Mapping, want: Mapping, before: Mapping | None = None) -> tuple[float, str]:
    """Worst error over partitions of their floating state (``{pid: module}``), each tensor against its
    partition's scale; with ``before`` (``{pid: {key: tensor}}``) the updates since then are compared —
    with plain SGD at lr 1 that is the gradient."""
    worst = (0.0, "")
    for pid, m in want.items():
        w, g = floats(m), floats(got[pid])
        if before is not None:
            w = {k: v - before[pid][k] for k, v in w.items()}
            g = {k: v - before[pid][k] for k, v in g.items()}
        if scale(w.values()) == 0:  # e.g. a partition whose whole update is zero: both must be
            assert all(torch.count_nonzero(v) == 0 for v in g.values()), pid
            continue
        err, key = scaled_error(g, w)
        worst = max(worst, (err, f"{pid}.{key}"))
    return worst


def flat_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """:func:`module_error` for a flat weights file (``weights.safetensors``: keys ``<partition>.<name>``),
    each tensor against the scale of its partition's floating tensors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in want.items():
        if v.is_floating_point():
            parts.setdefault(k.split(".", 1)[0], {})[k] = v
    return max(scaled_error(got, p) for p in parts.values())
