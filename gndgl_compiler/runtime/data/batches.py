"""Deterministic batching: the order of an epoch, augmentation and normalisation, each a
function of (seed, epoch, step), and :class:`Batches`, which iterates an epoch from a
resumable position on the data's device.

    DataBundle ──Batches(seed, epoch, start_step)──▶ (step, normalised x, y)

All randomness is drawn on the CPU from generators seeded by (seed, epoch, step), so
every process and every device sees the same batches and the same augmentation.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
import torch.nn.functional as F

from ...errors import DataError
from .cache import DataBundle


def stable_seed(*parts) -> int:
    """A stable 63-bit seed derived from ``parts`` (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled order of ``n`` samples for ``epoch`` (CPU int64, identical on every process)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed("perm", seed, epoch)))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Return the number of batches of ``batch_size`` in ``n`` samples (a short last one unless ``drop_last``)."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Return the CPU index tensor of every step of ``epoch``; step ``i`` is element ``i``."""
    perm = epoch_permutation(n, seed, epoch)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps_per_epoch(n, batch_size, drop_last))]


def augment_params(n: int, *, seed: int, epoch: int, step: int, pad: int = 4,
                   flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the CPU crop offsets (dy, dx in [0, 2*pad]) and flip mask that :func:`augment` uses."""
    g = torch.Generator().manual_seed(stable_seed("aug", seed, epoch, step))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    mask = torch.randint(0, 2, (n,), generator=g).bool() if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, mask


def augment(x_uint8: torch.Tensor, *, seed: int, epoch: int, step: int, pad: int = 4,
            flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding ``pad`` plus random horizontal flip of an N×C×H×W batch, on its device.

    The draw (see :func:`augment_params`) depends only on (seed, epoch, step) and is made on the CPU.
    Returns a tensor of the same shape and dtype (``x_uint8`` itself when pad=0 and flip=False).
    Raises DataError when ``x_uint8`` is not 4-D or ``pad`` is negative.
    """
    if x_uint8.dim() != 4 or pad < 0:
        raise DataError(f"augment needs N×C×H×W images and pad >= 0, got shape {tuple(x_uint8.shape)}, pad {pad}")
    if pad == 0 and not flip:
        return x_uint8
    n, c, h, w = x_uint8.shape
    dev = x_uint8.device
    dy, dx, mask = (t.to(dev) for t in augment_params(n, seed=seed, epoch=epoch, step=step, pad=pad, flip=flip))
    xp = F.pad(x_uint8, (pad, pad, pad, pad)) if pad else x_uint8
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                        # N×H
    cols = dx[:, None] + torch.where(mask[:, None], w - 1 - ar_w, ar_w)  # N×W, reversed where flipped
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x_uint8: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``(x/255 - mean)/std`` per channel (channel dim -3) as ``dtype`` (computed in float32)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.to(torch.float32) * (1.0 / (255.0 * s)) - m / s).to(dtype)


class Batches:
    """Iterates ``(step, x_float_normalised, y)`` for one epoch from a resumable position.

    Train batches follow :func:`epoch_permutation` and are augmented with :func:`augment`;
    test batches (``train=False``) are sequential, unaugmented and keep the short last batch.
    ``len()`` is the number of batches still to come (total minus ``start_step``).

    Raises:
        DataError: non-positive batch size, a batch larger than the training set with
            ``drop_last``, or ``start_step`` outside the epoch.
    """

    def __init__(self, bundle: DataBundle, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                 train: bool = True, augment: bool = True, pad: int = 4, flip: bool = True,
                 drop_last: bool = True, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.x, self.y = (bundle.train_x, bundle.train_y) if train else (bundle.test_x, bundle.test_y)
        self.mean, self.std = bundle.mean, bundle.std
        self.batch_size, self.seed, self.epoch, self.train = batch_size, seed, epoch, train
        self.augment, self.pad, self.flip = augment and train, pad, flip
        self.drop_last = drop_last and train
        self.dtype, self.channels_last = dtype, channels_last
        self.total_steps = steps_per_epoch(len(self.x), batch_size, self.drop_last)
        if self.total_steps == 0 and len(self.x):
            raise DataError(f"batch size {batch_size} is larger than the {len(self.x)} training images; "
                            "lower the batch size or use more data")
        if not 0 <= start_step <= self.total_steps:
            raise DataError(f"start step {start_step} is outside the epoch of {self.total_steps} steps")
        self.start_step = start_step

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        n, bs, dev = len(self.x), self.batch_size, self.x.device
        perm = epoch_permutation(n, self.seed, self.epoch) if self.train else None
        for step in range(self.start_step, self.total_steps):
            if perm is None:
                xb, yb = self.x[step * bs:(step + 1) * bs], self.y[step * bs:(step + 1) * bs]
            else:
                idx = perm[step * bs:(step + 1) * bs].to(dev)
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.augment:
                xb = augment(xb, seed=self.seed, epoch=self.epoch, step=step, pad=self.pad, flip=self.flip)
            xb = normalize(xb, self.mean, self.std, self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield step, xb, yb
