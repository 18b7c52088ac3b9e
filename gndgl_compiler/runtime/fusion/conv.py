"""The fused conv and linear layers of a module's G sibling groups (the layouts of ``fusion/layouts.py``).

    op        shared in                  stack in                  mixed in
    conv      dense conv, W = cat_g W_g  conv(groups=G·groups)     dense conv(h, W); input gradient
                                                                   through diag_g W_g, groups=G only
    linear    like conv; on flat features the G layers are one batched matmul over (G, B, F)

Parameters: a conv's G weights are one ``[G·O, I, k, k]`` storage (rows g·O.. are group g's), a linear
layer's one ``[G, O, I]`` storage (``fusion/storage.py``); padded when the group widths differ.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .layouts import FusionBuild, NodeGroup, NotFusable, Step
from .storage import FusedTensor
from .shared_head import SharedHeadConv

_DENSE_BELOW = 16
_DENSE_GROUP = 4
"""On the CPU, grouped convs with at most ``_DENSE_BELOW`` input channels in all and ``_DENSE_GROUP`` per
group run as one dense conv with a block-diagonal weight (measured on torch 2.14, one thread: 1.6x faster
at 4 groups of 4 channels; slower at 2 groups of 8 and from 32 channels on)."""


_GROUPED_MULTIPLE = 8
"""On the CPU, a grouped conv whose groups are not a multiple of 8 input channels runs as its G separate
convs: oneDNN's grouped kernels are slow there (measured on torch 2.14, one thread, forward + backward,
batch 32: 3 groups of 6 channels at 32x32 28 ms grouped vs 17 ms separate; 3 of 11 at 16x16 17 vs 7;
6 of 22 at 16x16 90 vs 33; 8 or 16 channels per group: grouped is faster)."""


def _separate_convs(name: str, arg: str, w: FusedTensor, bias: torch.Tensor | None, groups: int,
                    stride: int, padding: int) -> Step:
    """The step of a grouped conv run as ``groups`` convs on its channel blocks, outputs concatenated
    (the same convs as per partition: exact)."""

    def separate(env: dict) -> None:
        xs = env[arg].chunk(groups, 1)
        ws = w.fused.chunk(groups, 0)
        bs = bias.chunk(groups, 0) if bias is not None else [None] * groups
        env[name] = torch.cat([F.conv2d(x, wt, b, stride, padding) for x, wt, b in zip(xs, ws, bs)], 1)
    return separate


def _block_mask(w: torch.Tensor, G: int, cin: int) -> torch.Tensor:
    """The 0/1 (G·O, cin, 1, 1) mask of each group's own input columns (block diagonal)."""
    o = w.shape[0] // G
    mask = torch.zeros(G * o, cin, 1, 1, dtype=w.dtype, device=w.device)
    for g in range(G):
        mask[g * o:(g + 1) * o, g * (cin // G):(g + 1) * (cin // G)] = 1
    return mask


def conv(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """A conv layer of all G groups; returns (step, output layout ``stack``)."""
    n, lay, name = grp.node, grp.layout, grp.name
    mods = grp.modules()
    w = b.fuse_layer([m.weight for m in mods], b.in_width(n, lay))
    bias_t = b.fuse_layer([m.bias for m in mods]) if mods[0].bias is not None else None
    bias = bias_t.fused if bias_t is not None else None
    groups = n.attrs.get("groups", 1)
    if lay in ("shared", "stack"):
        if lay == "shared" and groups != 1:
            raise NotFusable(f"grouped conv {name} on a shared input")
        return _grouped(b, grp, w, bias, 1 if lay == "shared" else b.G * groups), "stack"
    if lay != "mixed" or groups != 1:
        raise NotFusable(f"conv {name} on a {lay} tensor")
    return _mixed_conv(b, grp, w, bias), "stack"


def _grouped(b: FusionBuild, grp: NodeGroup, w: FusedTensor, bias: torch.Tensor | None, g_all: int) -> Step:
    """The step of a conv over a shared (``g_all`` = 1) or stack value (``g_all`` = G · groups)."""
    G, name, arg, a = b.G, grp.name, grp.arg, grp.node.attrs
    groups, stride, padding = a.get("groups", 1), a["stride"], a["padding"]
    cin = w.fused.shape[1] * g_all
    cpu = w.fused.device.type == "cpu"
    if g_all > 1 and groups == 1 and cin <= _DENSE_BELOW and cin // g_all <= _DENSE_GROUP and cpu:
        # CPU: a grouped conv with a few channels per group is slower than the dense conv with a
        # block-diagonal weight (exact: the off-diagonal blocks are exact zeros, their gradient is dropped)
        mask = _block_mask(w.fused, G, cin)

        def block_diag(env: dict) -> None:
            weight = w.fused.repeat(1, G, 1, 1) * mask
            env[name] = F.conv2d(env[arg], weight, bias, stride, padding)
        return block_diag
    if g_all > 1 and groups == 1 and (cin // g_all) % _GROUPED_MULTIPLE and cpu:
        return _separate_convs(name, arg, w, bias, g_all, stride, padding)

    def grouped(env: dict) -> None:
        env[name] = F.conv2d(env[arg], w.fused, bias, stride, padding, groups=g_all)
    return grouped


def _mixed_conv(b: FusionBuild, grp: NodeGroup, w: FusedTensor, bias: torch.Tensor | None) -> Step:
    """The step of a conv over a mixed value (an aux head's first conv): :class:`SharedHeadConv`."""
    G, name, arg, a = b.G, grp.name, grp.arg, grp.node.attrs
    stride, padding = a["stride"], a["padding"]
    spread = spreader(b, arg, w.fused)
    cin = b.channel_maps[arg][1] if spread is not None else w.fused.shape[1]
    own = None
    if cin <= _DENSE_BELOW and cin // G <= _DENSE_GROUP and w.fused.device.type == "cpu":
        own = _block_mask(w.fused, G, cin)

    def mixed(env: dict) -> None:
        weight = w.fused if spread is None else spread(w.fused)
        env[name] = SharedHeadConv.apply(env[arg][0], weight, bias, G, [stride] * 2, [padding] * 2, own)
    return mixed


def spreader(b: FusionBuild, arg: str, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a mixed input read through a channel map: ``W -> W_full``, head g's weight columns
    scattered to the channels of h it reads, exact zeros elsewhere (None: the map is the identity).

    ``W`` is (G·O, C_in, k...) for a conv, (G, O, C_in) for a linear layer."""
    got = b.channel_maps.get(arg)
    if got is None:
        return None
    G = b.G
    idx, full = got
    idx = idx.to(w.device)

    def spread(wt: torch.Tensor) -> torch.Tensor:
        linear = wt.dim() == 3  # (G, O, C_in); a conv weight is (G·O, C_in, k, k)
        w3 = wt if linear else wt.view(G, -1, *wt.shape[1:])
        index = idx.view(G, 1, -1, *([1] * (w3.dim() - 3))).expand(w3.shape)
        out = w3.new_zeros(G, w3.shape[1], full, *w3.shape[3:]).scatter(2, index, w3)
        return out if linear else out.view(-1, full, *wt.shape[2:])
    return spread


def linear(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """G linear layers as one batched matmul over (G, B, F) features (output layout ``gstack``)."""
    G, name, arg, lay = b.G, grp.name, grp.arg, grp.layout
    mods = grp.modules()
    w = b.fuse_layer([m.weight for m in mods], b.in_width(grp.node, lay), stacked=True)  # (G, O, I)
    bias = b.fuse_layer([m.bias for m in mods]) if mods[0].bias is not None else None
    n_out, n_in = w.fused.shape[1:]

    if lay == "shared":
        def dense(env: dict) -> None:
            x = env[arg]
            out = F.linear(x, w.fused.view(G * n_out, n_in), None if bias is None else bias.fused)
            env[name] = out.view(x.shape[0], G, n_out).transpose(0, 1)
        return dense, "gstack"
    if lay in ("stack", "gstack"):
        def batched(env: dict) -> None:
            x = env[arg]
            if lay == "stack":
                x = x.view(x.shape[0], G, -1).transpose(0, 1)
            wt = w.fused.transpose(1, 2)
            env[name] = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.fused.view(G, 1, n_out), x, wt)
        return batched, "gstack"

    spread = spreader(b, arg, w.fused)
    full = n_in if spread is None else b.channel_maps[arg][1]

    def mixed(env: dict) -> None:
        x = env[arg][0]
        wt = w.fused if spread is None else spread(w.fused)
        out = SharedHeadConv.apply(x.unsqueeze(-1), wt.reshape(G * n_out, full, 1),
                                   None if bias is None else bias.fused, G, [1], [0])
        env[name] = out.view(x.shape[0], G, n_out).transpose(0, 1)
    return mixed, "gstack"
