"""An aux head's mixed input as each head's own tensor: what AugLocal's aux nets need where their first
layer is not a conv / linear / LayerNorm (which read a mixed value directly: ``conv.py``, ``tokens.py``).

    mixed (B, C, ...)  →  (G, B, C_in, ...)   head g's C_in input channels (its channel map; all C in group
                                               order for r = 1), its own group's channels live and every
                                               sibling's detached, as in its partition's ``cat``

Used by the BatchNorm1d over a pooled mixed value and by the per-token linear shortcut on a mixed token value.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layouts import FusionBuild, NotFusable


def unmixer(b: FusionBuild, arg: str, c_in: int, what: str) -> Callable[[torch.Tensor, torch.device],
                                                                           torch.Tensor]:
    """``f(stack, device) -> (G, B, C_in, ...)`` for the mixed value ``arg`` whose heads read ``c_in`` channels.

    Raises:
        NotFusable: an unequal split (padded groups).
    """
    if b.padded:
        raise NotFusable(f"{what} over a mixed tensor of unequal groups")
    got = b.channel_maps.get(arg)
    G, c = b.G, b.width
    idx = torch.arange(c_in).expand(G, c_in) if got is None else got[0]
    own = idx // c == torch.arange(G).unsqueeze(1)  # (G, C_in): channels of head g's own group
    flat = idx.reshape(-1)
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(h: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device not in cache:
            cache[device] = (flat.to(device), own.to(device))
        fl, ow = cache[device]
        B, rest = h.shape[0], h.shape[2:]
        live = h.index_select(1, fl).view(B, G, c_in, *rest)
        dead = h.detach().index_select(1, fl).view(B, G, c_in, *rest)
        x = torch.where(ow.view(1, G, c_in, *([1] * len(rest))), live, dead)
        return x.transpose(0, 1)
    return apply
