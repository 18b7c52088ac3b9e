"""Random ops that draw from an explicit ``torch.Generator`` (never the global RNG).

A registry op with ``random=True`` gets a module with a ``generator`` attribute; the executor
(``runtime/step/streams.py``) sets it to its partition's own generator on the partition's device and
seeds that generator per step, so a dropout mask is a pure function of (seed, step, partition)
whatever else runs in the process. Without a generator (a module used outside an executor) it
draws from the global RNG like ``nn.Dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeededDropout(nn.Module):
    """Dropout whose mask comes from ``self.generator`` (set by the executor), scaled by ``1/(1-p)``.

    ``mask(shape, like)`` is exposed so the sibling-fused runner draws each group's mask from its
    own partition's generator and concatenates them (``runtime/fusion/dropout.py``): the same
    numbers, in the same order, as the partition's own program.

    Args:
        p: probability of zeroing an element.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def mask(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The scaled keep-mask (0 or ``1/(1-p)``) of a tensor of ``shape``, dtype and device of ``like``."""
        keep = 1.0 - self.p
        m = torch.empty(shape, dtype=like.dtype, device=like.device)
        return m.bernoulli_(keep, generator=self.generator).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, True)
        return x * self.mask(x.shape, x)

    def extra_repr(self) -> str:
        return f"p={self.p}"
