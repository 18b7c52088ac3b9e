"""Sibling fusion of an unequal (balanced) split: every group padded to the widest group's width.

A balanced split gives groups of unequal widths (128 channels in 6 groups: 22, 22, 21, 21, 21, 21).
The fused program pads each group's block of a ``stack`` value (B, G·w, ...) — or ``gstack`` value
(G, B, w) — to the widest group's width ``w``: group g's real channels are g·w .. g·w + c_g, its
padded channels g·w + c_g .. (g+1)·w. Exactness rests on one invariant, **padded channels are exact
zeros**, kept by every fused op:

    conv / linear   padded weight rows, columns and bias entries are exact zeros (``fuse_padded``);
                    they belong to no parameter, so no optimizer, decay or load ever writes them
    bn              padded γ = β = 0: the output of a padded (all-zero, variance-0) channel is β = 0;
                    padded running mean 0 / variance 1 are never read for a real channel
    relu, gelu, silu, pools, upsample, flatten, add, dropout (padded mask entries 0), man_mix: zero stays zero
    slice           a residual shortcut's channels of the shared input, gathered into the padded layout
                    (group g's slice at g·w .. g·w + c_g, exact zeros after it: ``shortcut_gather``)
    sigmoid         σ(0) = ½ — refused on a padded value (:class:`NotFusable`), as are token ops

so a real channel's value and every real parameter's gradient are those of the per-partition
program (the padded channels only add exact zeros to sums). An op's own refusal is its
``FusedOpDef.padded`` (``fusion/table.py``); token ops (``FusedOpDef.token``) have no padded form. The
losses read real channels only: predsim's per-channel statistics are masked (``FusedLoss``: the standard
deviation of a padded channel has no finite gradient and is never formed), logits / reconstructions /
projections must have equal widths. The module output leaves un-padded (``real_channels``): other stages
read exactly the per-partition concatenation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .layouts import FusionBuild, NodeGroup, NotFusable, Step

if TYPE_CHECKING:
    from .table import FusedOpDef


def real_channels(widths: list[int], width: int, device: torch.device) -> torch.Tensor:
    """The indices of the real channels of a padded (B, G·width, ...) value, in group order.

    Args:
        widths: each group's real width c_g.
        width: the padded width (max c_g).
        device: where the index lives.

    Returns:
        (Σ c_g,) int64 tensor: ``padded.index_select(1, idx)`` is the per-partition concatenation.
    """
    return torch.cat([torch.arange(g * width, g * width + c) for g, c in enumerate(widths)]).to(device)


def shortcut_gather(name: str, arg: str, starts: list[int], lengths: list[int], channels: int,
                    device: torch.device) -> Step:
    """Each group's channel slice of a shared (B, channels, ...) value as one stack value: slice g
    (``starts[g]`` .. + ``lengths[g]``) lands at channels g·w .. g·w + lengths[g], w = max length, and
    the channels after it (the padding) are exact zeros. One ``index_copy_`` into a zero tensor, after
    an ``index_select`` unless the slices tile the value in order (a residual shortcut's usual case)."""
    G, w = len(starts), max(lengths)
    src = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    dst = torch.cat([torch.arange(g * w, g * w + n) for g, n in enumerate(lengths)]).to(device)
    tiled = torch.equal(src, torch.arange(channels))
    src = src.to(device)

    def gather(env: dict) -> None:
        x = env[arg]
        out = x.new_zeros(x.shape[0], G * w, *x.shape[2:])
        env[name] = out.index_copy_(1, dst, x if tiled else x.index_select(1, src))
    return gather


def check_padded(b: FusionBuild, d: FusedOpDef, grp: NodeGroup) -> None:
    """Refuse, in an unequal split, an op whose padded form would not keep padded channels zero.

    Raises:
        NotFusable: token ops (or any op on tokens), and what the op's ``padded`` check refuses
            (a sigmoid on a padded value, a conv grouped within a partition).
    """
    n = grp.node
    why = None
    if d.token or "gtok" in grp.layouts:
        why = f"token op {n.kind} ({n.name})"
    elif d.padded is not None:
        why = d.padded(b, grp)
    if why is not None:
        raise NotFusable(f"{why} in an unequal split (group widths {b.widths})")


def nonzero_at_zero(value: str) -> Callable[[FusionBuild, NodeGroup], str | None]:
    """The ``padded`` check of an op that maps 0 to ``value`` (sigmoid: 1/2): refused on a padded (or
    mixed) value."""

    def check(b: FusionBuild, grp: NodeGroup) -> str | None:
        n = grp.node
        if grp.layout == "mixed" or b.padding(n.args[0]) is not None:
            return f"{n.kind} {n.name} ({n.kind}(0) = {value} would leak into padded channels)"
        return None
    return check


def ungrouped(b: FusionBuild, grp: NodeGroup) -> str | None:
    """The ``padded`` check of a conv: one grouped within a partition is refused."""
    n = grp.node
    return f"grouped conv {n.name} within a partition" if n.attrs.get("groups", 1) != 1 else None
