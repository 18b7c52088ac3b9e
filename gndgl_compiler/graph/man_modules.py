"""Torch modules of the MAN / MAN++ ops (imported only when codegen builds them; see :mod:`.man_ops`)."""

from __future__ import annotations

import torch
from torch import nn


class LearnedMix(nn.Module):
    """MAN++'s mix: ``s·lb + (2 − s)·ema`` with one learnable scalar ``s``, initialised to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.empty(()))
        if not self.s.is_meta:  # codegen builds on 'meta' and initialises later (init_weights)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """s = 1 (equal weights: the sum of MAN)."""
        with torch.no_grad():
            self.s.fill_(1.0)

    def forward(self, lb: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.s * lb + (2.0 - self.s) * ema
