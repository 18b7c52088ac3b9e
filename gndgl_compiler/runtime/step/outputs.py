"""Body outputs of one step, by partition id, with fused modules stored whole.

A fused module produces one tensor (B, G·c, ...) for its G partitions. It is kept as is —
the next fused module reads it directly instead of concatenating G slices — and a
partition's own slice is cut (a view) only when a per-partition consumer asks for it.
"""

from __future__ import annotations

import torch


class StageOutputs(dict):
    """``{partition id: body output}`` where fused modules' outputs are sliced on first read."""

    def __init__(self, initial: dict[int, torch.Tensor]):
        super().__init__(initial)
        self.fused: dict[tuple[int, ...], torch.Tensor] = {}
        self._owner: dict[int, tuple[tuple[int, ...], int, int]] = {}

    def put_fused(self, pids: list[int], tensor: torch.Tensor, widths: list[int] | None = None) -> None:
        """Store the output of a fused module whose partitions ``pids`` own consecutive channel slices in
        order: of ``widths`` channels each (None: equal slices)."""
        key = tuple(pids)
        self.fused[key] = tensor
        widths = widths or [tensor.shape[1] // len(pids)] * len(pids)
        start = 0
        for width, pid in zip(widths, pids):
            self._owner[pid] = (key, start, width)
            start += width

    def get_fused(self, pids: list[int]) -> torch.Tensor | None:
        """The fused tensor of exactly these partitions in this order, or None."""
        return self.fused.get(tuple(pids))

    def __missing__(self, pid: int) -> torch.Tensor:
        key, start, width = self._owner[pid]  # KeyError: nobody produced it
        t = self.fused[key].narrow(1, start, width)
        self[pid] = t
        return t

    def __contains__(self, pid: object) -> bool:
        return dict.__contains__(self, pid) or pid in self._owner

    def pop(self, pid, default=None):  # noqa: ANN001 - dict signature
        """Drop a partition's output; a fused tensor goes when its last partition is dropped."""
        owner = self._owner.pop(pid, None)
        if owner is not None and not any(o[0] == owner[0] for o in self._owner.values()):
            self.fused.pop(owner[0], None)
        return dict.pop(self, pid, default)
