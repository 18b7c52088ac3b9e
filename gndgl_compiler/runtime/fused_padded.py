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
    relu, gelu, silu, pools, upsample, flatten, add, dropout (padded mask entries 0): zero stays zero
    slice           a residual shortcut's channels of the shared input, gathered into the padded layout
                    (group g's slice at g·w .. g·w + c_g, exact zeros after it: ``shortcut_gather``)
    sigmoid         σ(0) = ½ — refused on a padded value (:class:`NotFusable`), as are token ops

so a real channel's value and every real parameter's gradient are those of the per-partition
program (the padded channels only add exact zeros to sums). The losses read real channels only:
predsim's per-channel statistics are masked (``FusedLoss``: the standard deviation of a padded channel
has no finite gradient and is never formed), logits / reconstructions / projections must have equal
widths. The module output leaves un-padded (``real_channels``): other stages read exactly the
per-partition concatenation.
"""

from __future__ import annotations

import torch

from ..partition.plan import IRNode
from .fused_ops import NotFusable, Step, _alias

_TOKEN_OPS = ("patch_embed", "pos_embed", "layernorm", "attention", "mlp", "token_pool")


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


class PaddedChecks:
    """The padded-form checks of :class:`~gndgl_compiler.runtime.fused.FusedStage` (``padded``, ``_pad``)
    and its residual-shortcut slices."""

    G: int
    mods: list
    padded: bool
    widths: list[int]
    _pad: dict[str, list[int]]
    _cols: dict

    def _padding(self, name: str) -> list[int] | None:
        """The per-group real widths of value ``name`` when they differ (it is padded), else None."""
        real = self._pad.get(name)
        return real if real is not None and len(set(real)) > 1 else None

    def _ir_shape(self, n: IRNode) -> tuple:
        """What must agree between siblings of a node's shape: all of it, or all but the width when padded."""
        return (len(n.shape), *n.shape[1:]) if self.padded else tuple(n.shape)

    def _ir_attrs(self, n: IRNode) -> dict:
        """What must agree between siblings of a node's attributes (a padded layer's widths may differ)."""
        return {k: v for k, v in n.attrs.items() if k not in ("in", "out")} if self.padded else n.attrs

    def _in_width(self, n: IRNode, lay: str) -> int | None:
        """The padded input width of conv / linear node ``n`` (group 0's) reading a ``lay`` value: the
        widest group's channels (× positions, for a linear layer on feature maps); None when not padded."""
        arg = n.args[0]
        if lay == "mixed":
            got = self._cols.get(arg)
            return None if got is None else got[0].shape[1]
        real = self._padding(arg) if lay in ("stack", "gstack") else None
        return None if real is None else max(real) * (n.attrs["in"] // real[0])

    def _check_padded(self, ns: list[IRNode], lays: list[str]) -> None:
        """Refuse, in an unequal split, the ops whose padded form would not keep padded channels zero.

        Raises:
            NotFusable: token ops, sigmoid, convs grouped within a partition.
        """
        n = ns[0]
        why = None
        if n.kind in _TOKEN_OPS or "gtok" in lays:
            why = f"token op {n.kind} ({n.name})"
        elif n.kind == "sigmoid" and (lays[0] == "mixed" or self._padding(n.args[0]) is not None):
            why = f"sigmoid {n.name} (sigmoid(0) = 1/2 would leak into padded channels)"
        elif n.kind == "conv" and n.attrs.get("groups", 1) != 1:
            why = f"grouped conv {n.name} within a partition"
        if why is not None:
            raise NotFusable(f"{why} in an unequal split (group widths {self.widths})")

    def _slice(self, ns: list[IRNode], lay: str, channels: int) -> Step:
        """Group g's channel slice of a shared value (``channels`` wide), for all groups: the shared value
        itself when the slices are its equal tiles in group order, else gathered (``shortcut_gather``).

        Raises:
            NotFusable: a slice of a per-group value.
        """
        n = ns[0]
        if lay != "shared":
            raise NotFusable(f"slice {n.name} of a {lay} tensor")
        starts, lengths = [m.attrs["start"] for m in ns], [m.attrs["length"] for m in ns]
        w = lengths[0]
        if lengths == [w] * self.G and starts == [g * w for g in range(self.G)] and channels == self.G * w:
            return _alias(n.name, n.args[0])
        device = next(self.mods[0].parameters()).device
        return shortcut_gather(n.name, n.args[0], starts, lengths, channels, device)
