"""The two ways a run is fed, behind one interface (:class:`MemoryFeed`, :class:`StreamFeed`):
``feed.batches(...)`` iterates ``(step, normalised x, y)`` for one epoch from a resumable step.

    memory: DataBundle (decoded once) ──Batches──────────────────────────────▶ (step, x, y)
    stream: SourceIndex ──DataLoader(StepSet, workers, prefetch, pinned)────▶ (step, x, y)
              worker: read bytes ─▶ decode ─▶ per-sample crop (stream_transforms) ─▶ pad-crop-flip ─▶ uint8 batch

A DataLoader item is one whole step: the order of an epoch (``batches.epoch_permutation``) and
every random choice are functions of (seed, epoch, step), and the loader yields steps in order,
so the batches do not depend on the number of workers, and a run resumed at step N reads the
same batches from N on. At most ``workers × prefetch`` batches are in flight.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ...errors import DataError
from .batches import Batches, augment, epoch_permutation, normalize, steps_per_epoch
from .cache import DataBundle
from .folder import decode_image
from .index import SourceIndex, Split
from .transforms import CropPlan, transform_batch


def default_workers() -> int:
    """Decoding workers when ``train.data.workers`` is not given: the CPUs less one, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class StepSet(torch.utils.data.Dataset):
    """Step ``i`` of an epoch as one item: ``(step, uint8 N×C×H×W, labels, skipped names)``."""

    def __init__(self, index: SourceIndex, split: Split, order: torch.Tensor | None, *, batch_size: int, steps: int,
                 plan: CropPlan, train: bool, seed: int, epoch: int, pad: int, flip: bool, skip_bad: bool,
                 finish: Any = None) -> None:
        self.index, self.split, self.order, self.bs, self.steps = index, split, order, batch_size, steps
        self.plan, self.train, self.seed, self.epoch = plan, train, seed, epoch
        self.pad, self.flip, self.skip_bad = pad, flip, skip_bad
        self.finish = finish
        """CPU runs: the batches (mean, std, dtype, channels_last) normalised here, in the worker (see ``batch``)."""

    def __len__(self) -> int:
        return self.steps

    def rows(self, step: int) -> list[int]:
        """The sample indices of ``step`` (into the split)."""
        lo, hi = step * self.bs, min((step + 1) * self.bs, len(self.split.labels))
        return self.order[lo:hi].tolist() if self.order is not None else list(range(lo, hi))

    def image(self, j: int) -> torch.Tensor | None:
        """Sample ``j`` decoded (None when unreadable and bad images are skipped)."""
        if self.split.pixels is not None:
            return self.split.pixels[self.split.refs[j]]
        try:
            return decode_image(self.index.read(self.split.refs[j]), self.split.names[j])
        except (DataError, OSError) as e:
            if not self.skip_bad:
                raise DataError(f"{e}; or set train.data.on_bad_image: skip to leave such images out") from None
            return None

    def __getitem__(self, step: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, list[str]]:
        try:
            return self.batch(step)
        except DataError as e:  # raised again in the training process: a worker's traceback is no message
            return step, None, None, [str(e)]

    def batch(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor, list[str]]:
        """Step ``step``'s uint8 images and labels, and the names of the images left out."""
        rows = self.rows(step)
        with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode call
            warnings.simplefilter("ignore", DeprecationWarning)
            imgs = [self.image(j) for j in rows]
        names = [self.split.names[j] for j in rows]
        x = transform_batch(imgs, names, self.plan, train=self.train, seed=self.seed, epoch=self.epoch, step=step)
        if self.train and (self.pad or self.flip) and self.plan.rrc is None:
            x = augment(x, seed=self.seed, epoch=self.epoch, step=step, pad=self.pad, flip=self.flip)
        y = self.split.labels[rows]
        bad = [k for k, im in enumerate(imgs) if im is None]
        if bad:
            keep = torch.tensor([im is not None for im in imgs])
            x, y = x[keep].contiguous(), y[keep]
        if self.finish is not None:
            # a float batch made here reaches the training process in shared memory: made there, every step's
            # new multi-MB tensor fragments glibc's heap, which then grows with the epoch
            # (tests/runtime/data/test_data_memory.py)
            x = _to_model(x, torch.device("cpu"), self.finish)
        return step, x, y, [names[k] for k in bad]


class _Feed:
    """What the trainer reads of a feed besides its batches (name, classes, normalisation, labels)."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    classes: list[str]
    train_y: torch.Tensor
    test_y: torch.Tensor
    mode: str
    note: str = ""

    def summary(self) -> dict[str, Any]:
        """What summary.json records of how the data was read."""
        return {"data_mode": self.mode}


class MemoryFeed(_Feed):
    """A decoded data set on the training device (``Batches``), or on the CPU with per-sample crops."""

    mode = "memory"

    def __init__(self, bundle: DataBundle, plan: CropPlan, device: torch.device, note: str = "") -> None:
        self.plan, self.device, self.note = plan, device, note
        self.bundle = bundle.to(device) if plan.rrc is None else bundle
        b = self.bundle
        self.name, self.mean, self.std, self.num_classes, self.classes = b.name, b.mean, b.std, b.num_classes, b.classes
        self.train_y, self.test_y = b.train_y, b.test_y

    def batches(self, **kw) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``Batches`` over the bundle (RandomResizedCrop: per-sample crops, see :class:`_CropBatches`)."""
        if self.plan.rrc is None:
            return Batches(self.bundle, **kw)
        return _CropBatches(self.bundle, self.plan, self.device, **kw)


class _CropBatches(Batches):
    """In-memory batches with RandomResizedCrop / resize + centre crop per sample (CPU), then to the device."""

    def __init__(self, bundle: DataBundle, plan: CropPlan, device: torch.device, **kw) -> None:
        super().__init__(bundle, **kw)
        self.plan, self.device = plan, device

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(len(self.x), self.seed, self.epoch) if self.train else None
        bs = self.batch_size
        for step in range(self.start_step, self.total_steps):
            idx = perm[step * bs:(step + 1) * bs] if perm is not None else torch.arange(
                step * bs, min((step + 1) * bs, len(self.x)))
            imgs = [self.x[i] for i in idx.tolist()]
            xb = transform_batch(imgs, [f"train image {i}" for i in idx.tolist()], self.plan, train=self.train,
                                 seed=self.seed, epoch=self.epoch, step=step)
            yield step, _to_model(xb, self.device, self), self.y[idx].to(self.device)


@dataclass(frozen=True)
class Finish:
    """How a uint8 batch becomes the model's input (``normalize``; channels_last)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: torch.dtype
    channels_last: bool


def _to_model(xb: torch.Tensor, device: torch.device, b) -> torch.Tensor:
    """Normalise a uint8 batch on ``device`` as ``Batches`` does (dtype, channels_last)."""
    xb = normalize(xb.to(device, non_blocking=True), b.mean, b.std, b.dtype)
    return xb.contiguous(memory_format=torch.channels_last) if b.channels_last else xb


class StreamFeed(_Feed):
    """A data set read by worker processes, batch by batch (see the module docstring)."""

    mode = "stream"

    def __init__(self, index: SourceIndex, *, name: str, mean, std, plan: CropPlan, device: torch.device,
                 workers: int, prefetch: int, skip_bad: bool, on_log: Callable[[dict], None] | None = None,
                 note: str = "") -> None:
        self.index, self.plan, self.device, self.workers, self.prefetch = index, plan, device, workers, prefetch
        self.skip_bad, self.on_log, self.note, self.skipped = skip_bad, on_log, note, 0
        self.name, self.mean, self.std = name, tuple(mean), tuple(std)
        self.classes, self.num_classes = list(index.classes), len(index.classes)
        self.train_y, self.test_y = index.train.labels, index.test.labels

    def summary(self) -> dict[str, Any]:
        """Mode, workers and the images left out (``on_bad_image: skip``)."""
        return {"data_mode": "stream", "data_workers": self.workers, "bad_images_skipped": self.skipped}

    def batches(self, **kw) -> "StreamBatches":
        """The batches of one epoch (the arguments of ``Batches``)."""
        return StreamBatches(self, **kw)


class StreamBatches:
    """``Batches``' interface over a :class:`StreamFeed`: ``len()`` is the steps still to come."""

    def __init__(self, feed: StreamFeed, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                 train: bool = True, augment: bool = True, pad: int = 4, flip: bool = True, drop_last: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
        self.feed, self.mean, self.std, self.dtype, self.channels_last = feed, feed.mean, feed.std, dtype, channels_last
        split = feed.index.train if train else feed.index.test
        n = len(split.labels)
        self.total_steps = steps_per_epoch(n, batch_size, drop_last and train)
        if self.total_steps == 0 and n:
            raise DataError(f"batch size {batch_size} is larger than the {n} training images; "
                            "lower the batch size or use more data")
        if not 0 <= start_step <= self.total_steps:
            raise DataError(f"start step {start_step} is outside the epoch of {self.total_steps} steps")
        self.start_step = start_step
        order = epoch_permutation(n, seed, epoch) if train else None
        aug = augment and train
        self.steps = StepSet(feed.index, split, order, batch_size=batch_size, steps=self.total_steps, plan=feed.plan,
                             train=aug, seed=seed, epoch=epoch, pad=pad if aug else 0, flip=flip and aug,
                             skip_bad=feed.skip_bad, finish=Finish(self.mean, self.std, dtype, channels_last)
                             if feed.device.type == "cpu" else None)

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def loader(self) -> torch.utils.data.DataLoader:
        """The DataLoader over this epoch's remaining steps (in order; ``workers × prefetch`` in flight)."""
        f = self.feed
        extra = {"prefetch_factor": f.prefetch, "persistent_workers": False} if f.workers else {}
        return torch.utils.data.DataLoader(self.steps, batch_size=None, sampler=range(self.start_step,
                                                                                      self.total_steps),
                                           num_workers=f.workers, pin_memory=f.device.type == "cuda",
                                           collate_fn=_identity, worker_init_fn=_worker_init, **extra)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        f = self.feed
        for step, x, y, bad in self.loader():
            if x is None:
                raise DataError(bad[0])
            for name in bad:
                f.skipped += 1
                if f.on_log:
                    f.on_log({"kind": "note", "text": f"skipped unreadable image {name} (on_bad_image: skip)"})
            if not len(y):
                raise DataError(f"every image of step {step} is unreadable; check the data set (on_bad_image: skip "
                                "left nothing to train on)")
            x = x if self.steps.finish is not None else _to_model(x, f.device, self)  # CUDA: uint8 crosses, 4× less
            yield step, x, y.to(f.device, non_blocking=True)


def _identity(item):
    return item


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: allocations at least this large are mmapped (and unmapped when freed)."""


def _worker_init(_worker_id: int) -> None:
    """A worker's multi-MB batch tensors are mmapped and returned to the OS when freed: with glibc's default
    (a threshold that rises after the first such free) they come from the heap, which fragments and grows
    with the epoch (``tests/runtime/data/test_data_memory.py``). Only this worker process is set; elsewhere nothing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: its allocator's own behaviour
        pass
