"""The fused form of the per-channel ops over a module's G sibling groups: BatchNorm, the registry's
function ops applied as they are (activations, pools, upsample), flatten and l2norm.

    op         shared in   stack / gstack / gtok in                         mixed in
    bn         —           BN over G·c channels (per channel, the same math); gstack as (B, G·F)   flat: each head's
                                                                                     input (``unmix.py``) → gstack
    function   as is       as is (pools and upsample: feature maps only)     as is, channel map kept
    flatten    as is       stack (B, G·c, h, w) → gstack (G, B, c·h·w)       channel map spread over positions
    l2norm     —           over each group's features: gstack only

BatchNorm parameters and running statistics become ``[G·c]`` storages (``fusion/storage.py``; padded
γ = β = 0, running variance 1).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...graph.ops import get_op
from ..dist.sync_bn import SyncedBatchNorm, synced_batch_norm
from .layouts import FusionBuild, NodeGroup, NotFusable, Step, same
from .unmix import unmixer


def batch_norm(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """BatchNorm of all G groups as one over G·c channels; output in its input's layout."""
    name, arg, lay = grp.name, grp.arg, grp.layout
    unmix = None
    if lay == "mixed" and len(grp.node.shape) == 1:  # AugLocal's BatchNorm1d over a pooled head input
        unmix, lay = unmixer(b, arg, grp.node.shape[0], f"batch norm {name}"), "gstack"
    if lay not in ("stack", "gstack"):
        raise NotFusable(f"batch norm {name} over a {lay} tensor")
    mods = grp.modules()
    m0 = mods[0]
    same([(m.eps, m.momentum, m.affine, m.track_running_stats) for m in mods], f"batch norm {name}")
    if not (m0.affine and m0.track_running_stats and m0.momentum is not None):
        raise NotFusable(f"batch norm {name} without affine / running stats / momentum")
    w, bias = b.fuse_layer([m.weight for m in mods]), b.fuse_layer([m.bias for m in mods])  # padded: γ = β = 0
    rm = b.fuse_layer([m.running_mean for m in mods], grad=False)
    rv = b.fuse_layer([m.running_var for m in mods], grad=False, fill=1.0)
    b.bn_counters += [m.num_batches_tracked for m in mods]
    eps, momentum, owner, G = m0.eps, m0.momentum, b.owner, b.G
    group = m0.group if isinstance(m0, SyncedBatchNorm) else None  # train.sync_bn over replicas

    def bn(env: dict) -> None:
        x = env[arg] if unmix is None else unmix(env[arg][0], w.fused.device)
        if lay == "gstack":  # (G, B, F) -> (B, G·F): one channel per (group, feature)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
        y = synced_batch_norm(x, rm.fused, rv.fused, w.fused, bias.fused, owner.training, momentum, eps, group)
        env[name] = y.view(y.shape[0], G, -1).transpose(0, 1) if lay == "gstack" else y
    return bn, lay


def function(maps_only: bool = False) -> Callable[[FusionBuild, NodeGroup], tuple[Step, str]]:
    """The builder of a per-channel function op: the registry's ``function`` with its ``kwargs``, applied
    to the fused value as it is (``maps_only``: refused on flat features, like a pool)."""

    def build(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
        n = grp.node
        if maps_only and grp.layout == "gstack":
            raise NotFusable(f"{n.kind} {n.name} on flat features")
        op = get_op(n.kind)
        kwargs = op.kwargs(n.attrs, [])

        def fn(x: torch.Tensor, _f=op.target(), _k=kwargs) -> torch.Tensor:
            return _f(x, **_k)
        return _per_channel(b, grp, fn), grp.layout
    return build


def flatten(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """Flatten: a stack's groups become flat group features (gstack); other layouts as they are."""
    lay, G = grp.layout, b.G
    if lay == "stack":  # (B, G·c, h, w) -> (G, B, c·h·w)
        def fn(x: torch.Tensor) -> torch.Tensor:
            return x if x.dim() == 2 else x.reshape(x.shape[0], G, -1).transpose(0, 1)
        return _per_channel(b, grp, fn), "gstack"

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() <= 2 or lay == "gstack" else x.flatten(1)
    return _per_channel(b, grp, flat, positions=True), lay


def l2norm(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """L2 normalisation over the features of each group: dim 2 of (G, B, F)."""
    if grp.layout != "gstack":
        raise NotFusable(f"l2norm {grp.name} on a {grp.layout} tensor")

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=2)
    return _per_channel(b, grp, fn), "gstack"


def _per_channel(b: FusionBuild, grp: NodeGroup, fn: Callable[[torch.Tensor], torch.Tensor],
                 positions: bool = False) -> Step:
    """The step ``env[name] = fn(env[arg])``; on a mixed value, ``fn`` of its stack, the channel map kept
    (``positions``: a flatten, head g's channel c becomes features c·S..c·S+S)."""
    name, arg = grp.name, grp.arg
    if grp.layout != "mixed":
        def step(env: dict) -> None:
            env[name] = fn(env[arg])
        return step
    got = b.channel_maps.get(arg)
    if got is not None and positions:  # channel c of head g's input -> features c·S..c·S+S
        idx, full = got
        S = grp.node.shape[0] // idx.shape[1]
        got = ((idx.unsqueeze(2) * S + torch.arange(S)).flatten(1), full * S)
    b.channel_maps[name] = got

    def mixed(env: dict) -> None:
        env[name] = (fn(env[arg][0]),)
    return mixed
