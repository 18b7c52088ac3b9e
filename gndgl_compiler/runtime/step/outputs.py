"""Body outputs of one step, by partition id, with fused modules stored whole.

A fused module produces one tensor (B, G·c, ...) for its G partitions. It is kept as is —
the next fused module reads it directly instead of concatenating G slices — and a
partition's own slice is cut (a view) only when a per-partition consumer asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch


class StageOutputs(MutableMapping):
    """``{partition id: body output}`` where fused modules' outputs are sliced on first read.

    A full mapping: ``h[pid]``, ``h.get(pid)``, ``pid in h``, iteration and ``len`` all see the
    partitions of fused outputs too (their slice is cut when read)."""

    def __init__(self, initial: dict[int, torch.Tensor]):
        self.sliced: dict[int, torch.Tensor] = dict(initial)
        """Outputs stored per partition (or already cut from a fused output)."""
        self.fused: dict[tuple[int, ...], torch.Tensor] = {}
        """Fused outputs, by the partition ids that own them (in channel order)."""
        self.owner: dict[int, tuple[tuple[int, ...], int, int]] = {}
        """``{pid: (fused key, first channel, channels)}`` of each partition of a fused output."""

    def put_fused(self, pids: list[int], tensor: torch.Tensor, widths: list[int] | None = None) -> None:
        """Store the output of a fused module whose partitions ``pids`` own consecutive channel slices in
        order: of ``widths`` channels each (None: equal slices)."""
        key = tuple(pids)
        self.fused[key] = tensor
        widths = widths or [tensor.shape[1] // len(pids)] * len(pids)
        start = 0
        for width, pid in zip(widths, pids):
            self.owner[pid] = (key, start, width)
            start += width

    def get_fused(self, pids: list[int]) -> torch.Tensor | None:
        """The fused tensor of exactly these partitions in this order, or None."""
        return self.fused.get(tuple(pids))

    def __getitem__(self, pid: int) -> torch.Tensor:
        if pid in self.sliced:
            return self.sliced[pid]
        key, start, width = self.owner[pid]  # KeyError: nobody produced it
        t = self.fused[key].narrow(1, start, width)
        self.sliced[pid] = t
        return t

    def __setitem__(self, pid: int, tensor: torch.Tensor) -> None:
        self.sliced[pid] = tensor

    def __delitem__(self, pid: int) -> None:
        if pid not in self:
            raise KeyError(pid)
        self.pop(pid)

    def __contains__(self, pid: object) -> bool:
        return pid in self.sliced or pid in self.owner

    def __iter__(self) -> Iterator[int]:
        yield from self.sliced
        yield from (pid for pid in self.owner if pid not in self.sliced)

    def __len__(self) -> int:
        return len(self.sliced) + sum(pid not in self.sliced for pid in self.owner)

    def pop(self, pid, default=None):  # noqa: ANN001 - dict signature
        """Drop a partition's output (``default`` if there was none); a fused tensor goes when its last
        partition is dropped."""
        owner = self.owner.pop(pid, None)
        if owner is not None and not any(o[0] == owner[0] for o in self.owner.values()):
            self.fused.pop(owner[0], None)
        return self.sliced.pop(pid, default)
