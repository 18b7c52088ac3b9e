"""What every fused op's builder reads and adds to: the value layouts, one IR node over the G siblings
(:class:`NodeGroup`) and the record of one fused stage being built (:class:`FusionBuild`).

Values carry a layout:

    shared    one tensor every group reads          (the detached module input, the image)
    share_in  a sibling's share, read by an aux head (only its input ``cat`` may read it)
    stack     groups side by side on dim 1          (B, G·c, ...): group g in channels g·c..(g+1)·c
    gstack    flat group features as (G, B, F)      (what flatten of a stack gives)
    mixed     a stack, wrapped in a 1-tuple          aux-head input with sharing: head g sees group g's
                                                     channels live, the others as constants
    gtok      tokens (G, B, N, c)                   token-last and group-major (``fusion/tokens.py``)
    gfull     tokens (G, B, N, D)                   group g's own view of a full-width tensor

An unequal split pads every group of a ``stack`` / ``gstack`` value to the widest group's width
(``fusion/padded.py``); :attr:`FusionBuild.real_widths` keeps each value's real widths per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...partition.plan import IRNode, Partition
from .storage import FusedTensor, fuse, fuse_layer

Step = Callable[[dict], None]
"""A fused op's forward: ``env -> None``, sets ``env[node name]`` from its inputs' values."""


class NotFusable(Exception):
    """This module's siblings cannot run as one program; ``str(exc)`` says why."""


def same(values: list, what: str) -> None:
    """Refuse siblings whose ``values`` differ.

    Raises:
        NotFusable: ``what`` differs between siblings.
    """
    if any(v != values[0] for v in values[1:]):
        raise NotFusable(f"{what} differs between siblings")


@dataclass
class NodeGroup:
    """One IR node of the G siblings (same name and kind; only the channel slice differs).

    Attributes:
        nodes: each sibling's node, in group order.
        layouts: the fused layouts of the node's inputs (``node.args``), in order.
        graphs: each sibling's GraphModule (its submodules are named after the IR nodes).
        head: the node is in the aux heads (inputs ``h`` and sibling shares), not in the bodies.
        lists: each sibling's whole node list (body or head), in group order.
    """

    nodes: list[IRNode]
    layouts: list[str]
    graphs: list[torch.nn.Module]
    head: bool
    lists: list[list[IRNode]]

    @property
    def node(self) -> IRNode:
        """Group 0's node (name, kind, args and shape of all groups but the width)."""
        return self.nodes[0]

    @property
    def name(self) -> str:
        return self.nodes[0].name

    @property
    def arg(self) -> str:
        """The node's first input."""
        return self.nodes[0].args[0]

    @property
    def layout(self) -> str:
        """The layout of the node's first input."""
        return self.layouts[0]

    def modules(self) -> list[torch.nn.Module]:
        """The node's module in each sibling's program, in group order."""
        return [gm.get_submodule(self.name) for gm in self.graphs]


@dataclass
class FusionBuild:
    """The record of one fused stage being built, which the op builders read and add to.

    Attributes:
        G: the number of sibling groups.
        parts: the sibling partitions, in group order.
        widths: each group's real output width.
        padded: the widths differ (an unequal split, fused padded: ``fusion/padded.py``).
        owner: group 0's partition module (its ``training`` flag drives BatchNorm and dropout).
        tensors: the fused parameter and buffer storages, in creation order.
        bn_counters: the BatchNorm ``num_batches_tracked`` buffers (fused by the stage at the end).
        channel_maps: value name -> a mixed value's channel map ``(index (G, C_in), C)``: head g's input
            channels as channels of the whole module output (C of them); None for the identity (share
            ratio 1 in group order).
        real_widths: value name -> each group's real width of a stack / gstack value.
    """

    G: int
    parts: list[Partition]
    widths: list[int]
    padded: bool
    owner: torch.nn.Module
    tensors: list[FusedTensor] = field(default_factory=list)
    bn_counters: list[torch.Tensor] = field(default_factory=list)
    channel_maps: dict[str, tuple[torch.Tensor, int] | None] = field(default_factory=dict)
    real_widths: dict[str, list[int]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """The padded group width (every group's, when equal)."""
        return max(self.widths)

    @property
    def device(self) -> torch.device:
        """Where the siblings' parameters live."""
        return next(self.owner.parameters()).device

    # ---------------------------------------------------------------- parameters: how they are viewed
    def fuse(self, parts: list[torch.Tensor], linear: bool = False) -> FusedTensor:
        """Fuse equal-shaped sibling tensors (``storage.fuse``) and keep the storage."""
        ft = fuse(parts, linear=linear)
        self.tensors.append(ft)
        return ft

    def fuse_layer(self, parts: list[torch.Tensor], cols: int | None = None, *, stacked: bool = False,
                   fill: float = 0.0, grad: bool | None = None) -> FusedTensor:
        """Fuse one layer's sibling tensors, padded when their widths differ (``storage.fuse_layer``),
        and keep the storage."""
        ft = fuse_layer(parts, cols, stacked=stacked, fill=fill, grad=grad)
        self.tensors.append(ft)
        return ft

    # ---------------------------------------------------------------- padded groups
    def padding(self, name: str) -> list[int] | None:
        """The per-group real widths of value ``name`` when they differ (it is padded), else None."""
        real = self.real_widths.get(name)
        return real if real is not None and len(set(real)) > 1 else None

    def ir_shape(self, n: IRNode) -> tuple:
        """What must agree between siblings of a node's shape: all of it, or all but the width when padded."""
        return (len(n.shape), *n.shape[1:]) if self.padded else tuple(n.shape)

    def ir_attrs(self, n: IRNode) -> dict:
        """What must agree between siblings of a node's attributes (a padded layer's widths may differ)."""
        return {k: v for k, v in n.attrs.items() if k not in ("in", "out")} if self.padded else n.attrs

    def in_width(self, n: IRNode, lay: str) -> int | None:
        """The padded input width of conv / linear node ``n`` (group 0's) reading a ``lay`` value: the
        widest group's channels (× positions, for a linear layer on feature maps); None when not padded."""
        arg = n.args[0]
        if lay == "mixed":
            got = self.channel_maps.get(arg)
            return None if got is None else got[0].shape[1]
        real = self.padding(arg) if lay in ("stack", "gstack") else None
        return None if real is None else max(real) * (n.attrs["in"] // real[0])

    # ---------------------------------------------------------------- tokens
    def tokens(self, x: torch.Tensor, lay: str) -> torch.Tensor:
        """A stack (B, G·c, N) token value as gtok (G, B, N, c) (a copy); gtok / gfull as they are."""
        if lay != "stack":
            return x
        B, C, N = x.shape
        return x.view(B, self.G, C // self.G, N).permute(1, 0, 3, 2).contiguous()


def stacked(y: torch.Tensor) -> torch.Tensor:
    """gtok (G, B, N, c) → the stack (B, G·c, N) (a module's output)."""
    G, B, N, c = y.shape
    return y.permute(1, 0, 3, 2).reshape(B, G * c, N)


def alias(name: str, arg: str) -> Step:
    """Bind ``name`` to ``arg``'s value (group g's own slice of a shared tensor is the whole stack)."""
    def step(env: dict) -> None:
        env[name] = env[arg]
    return step


def call(name: str, f: Callable, args: list[str], listed: bool = False, **kw) -> Step:
    """``env[name] = f(*args, **kw)`` (or ``f([args], **kw)`` when ``listed``)."""
    def step(env: dict) -> None:
        vals = [env[a] for a in args]
        env[name] = f(vals, **kw) if listed else f(*vals, **kw)
    return step
