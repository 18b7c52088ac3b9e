"""Fed only where read: in a distributed run, a rank none of whose partitions reads the image
(module 1's bodies; an InfoPro loss's reconstruction target) draws the epoch's labels alone
and never opens or decodes an image.

    plan.edges (src IMAGE ─▶ dst) ──▶ partitions that read the image ──▶ ranks that read images
    a labels-only rank: LabelFeed.batches(train=True) ──▶ (step, placeholder x, y) with the same y

The labels of a step are ``labels[epoch_permutation(n, seed, epoch)[step·bs:(step+1)·bs]]`` on
every rank, so they never travel. Evaluation (rank 0 only) reads images as ever. With
``on_bad_image: skip`` every rank reads images: which samples drop out of a batch is known only
after decoding it.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ...partition.plan import IMAGE
from .batches import epoch_permutation, steps_per_epoch
from .feed import StreamFeed


def image_readers(plan) -> set[int]:
    """Ids of the partitions that read the image (an input or a loss target)."""
    return {e.dst for e in plan.edges if e.src == IMAGE}


def reading_ranks(plan) -> list[int]:
    """The ranks (``partition.worker``) holding a partition that reads the image."""
    readers = image_readers(plan)
    return sorted({p.worker for p in plan.partitions if p.id in readers})


def ranks_note(plan, world: int, feed: Any) -> str:
    """``gndgl train``'s line on which ranks read images (empty in one process or for an in-memory feed)."""
    if world <= 1 or not isinstance(feed, (StreamFeed, LabelFeed)):
        return ""
    if isinstance(feed, StreamFeed) and feed.skip_bad:
        return f"data: all {world} ranks read images (on_bad_image: skip drops samples only a reader can see)"
    readers = reading_ranks(plan)
    rest = [r for r in range(world) if r not in readers]
    return (f"data: rank{'s' if len(readers) != 1 else ''} {', '.join(map(str, readers))} read images; "
            + (f"rank{'s' if len(rest) != 1 else ''} {', '.join(map(str, rest))} read labels only" if rest
               else "every rank reads them"))


def fed_where_read(feed: Any, plan, owned: Iterable[int], world: int) -> Any:
    """``feed`` itself for a rank that reads the image (or one process); a :class:`LabelFeed` otherwise."""
    if world <= 1 or not isinstance(feed, StreamFeed) or feed.skip_bad or image_readers(plan) & set(owned):
        return feed
    return LabelFeed(feed)


class LabelFeed:
    """A streamed feed for a rank that does not read the image: training batches carry labels only."""

    def __init__(self, feed: StreamFeed) -> None:
        self.feed = feed
        for k in ("name", "mean", "std", "num_classes", "classes", "train_y", "test_y", "note", "plan", "device"):
            setattr(self, k, getattr(feed, k))
        self.mode = "labels"

    def summary(self) -> dict[str, Any]:
        """As the stream's, with ``data_mode: labels``."""
        return {**self.feed.summary(), "data_mode": "labels"}

    def batches(self, *, batch_size: int, seed: int, epoch: int, start_step: int = 0, train: bool = True,
                **kw) -> Any:
        """Labels with a placeholder image batch (no memory, no decoding) for training; evaluation reads images."""
        if not train:
            return self.feed.batches(batch_size=batch_size, seed=seed, epoch=epoch, start_step=start_step,
                                     train=False, **kw)
        return _LabelBatches(self, batch_size, seed, epoch, start_step, kw.get("dtype", torch.float32))


class _LabelBatches:
    def __init__(self, f: LabelFeed, bs: int, seed: int, epoch: int, start: int, dtype: torch.dtype) -> None:
        self.f, self.bs, self.seed, self.epoch, self.start, self.dtype = f, bs, seed, epoch, start, dtype
        self.total_steps = steps_per_epoch(len(f.train_y), bs)

    def __len__(self) -> int:
        return self.total_steps - self.start

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(len(self.f.train_y), self.seed, self.epoch)
        zero = torch.zeros((), dtype=self.dtype, device=self.f.device)
        for step in range(self.start, self.total_steps):
            idx = perm[step * self.bs:(step + 1) * self.bs]
            yield step, zero.expand(len(idx), *self.f.plan.shape), self.f.train_y[idx].to(self.f.device)
