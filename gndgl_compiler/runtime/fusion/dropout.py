"""The sibling-fused form of dropout: each group's mask from its own partition's generator.

Group g's partition draws its mask from its own stream (``runtime/step/streams.py``) for a tensor of
its own shape; the fused step draws the same G masks, in the same order, from the same G
generators and joins them in the fused layout — concatenated along channels for a ``stack``
tensor ``(B, G·c, ...)``, stacked for a ``gstack`` tensor ``(G, B, D)`` — so the fused module
computes exactly what the G partition programs compute (``tests/runtime/fusion/test_fused.py``). It has no
parameters; over a padded value each group's mask is drawn for its real width, padded with zeros.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...graph.random_ops import SeededDropout
from .layouts import FusionBuild, NodeGroup, NotFusable, Step


def dropout(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """The fused dropout of ``grp`` (each group's mask from its own partition's generator); output in its
    input's layout."""
    real = b.padding(grp.arg)
    return dropout_step(grp.name, grp.arg, grp.modules(), grp.layout, real), grp.layout


def dropout_step(name: str, arg: str, subs: list[torch.nn.Module], lay: str, real: list[int] | None = None) -> Step:
    """The fused step of dropout node ``name`` reading ``arg`` in layout ``lay``.

    Args:
        name, arg: the IR node and its input.
        subs: the node's module in each group's program, in group order.
        lay: the input's fused layout.
        real: an unequal split's real group widths (the input is padded: each group's mask is drawn for
            its real width and padded with zeros), else None.

    Raises:
        NotFusable: a dropout without per-partition generator, or over a tensor not split by group.
    """
    if not all(isinstance(m, SeededDropout) for m in subs):
        raise NotFusable(f"dropout {name} without a per-partition generator")
    if lay not in ("stack", "gstack"):
        raise NotFusable(f"dropout {name} over a {lay} tensor")
    mask = _mask(subs, lay) if real is None else _padded_mask(subs, lay, real)
    first = subs[0]

    def step(env: dict) -> None:
        x = env[arg]
        env[name] = x if not first.training or first.p == 0.0 else x * mask(x)

    return step


def _mask(subs: list[torch.nn.Module], lay: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The G groups' masks drawn from their generators and joined in the fused layout ``lay``."""
    G = len(subs)

    def mask(x: torch.Tensor) -> torch.Tensor:
        if lay == "gstack":  # (G, B, D): group g's tensor is x[g]
            return torch.stack([m.mask(x.shape[1:], x) for m in subs])
        shape = (x.shape[0], x.shape[1] // G, *x.shape[2:])  # (B, G·c, ...): group g's channels, block g of dim 1
        return torch.cat([m.mask(shape, x) for m in subs], dim=1)

    return mask


def _padded_mask(subs: list[torch.nn.Module], lay: str, real: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`_mask` over a padded value: group g's mask drawn for its c_g real channels (features), as its
    partition draws it, then padded with zeros to the padded width."""
    dim = 1  # stack (B, G·w, ...): channels; gstack (G, B, w): features of each group's (B, w)

    def mask(x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape[1:]) if lay == "gstack" else [x.shape[0], x.shape[1] // len(subs), *x.shape[2:]]
        w, pieces = shape[dim], []
        for m, c in zip(subs, real):
            pieces.append(m.mask([*shape[:dim], c, *shape[dim + 1:]], x))
            if c < w:
                pieces.append(x.new_zeros([*shape[:dim], w - c, *shape[dim + 1:]]))
        joined = torch.cat(pieces, dim=dim)
        return joined.view(x.shape[1], len(subs), w).transpose(0, 1) if lay == "gstack" else joined

    return mask
