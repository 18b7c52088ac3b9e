"""The fused form of each IR op over a module's G sibling groups (the layouts of ``runtime/fused.py``).

Values carry a layout:

    shared  one tensor every group reads          (the detached module input, the image)
    stack   groups side by side on dim 1          (B, G·c, ...): group g in channels g·c..(g+1)·c
    gstack  flat group features as (G, B, F)      (what flatten of a stack gives)
    mixed   a stack, wrapped in a 1-tuple          aux-head input with sharing r = 1: head g sees
                                                   group g's channels live, the others as constants

    op        shared in                  stack in                  mixed in
    conv      dense conv, W = cat_g W_g  conv(groups=G·groups)     dense conv(h, W); input gradient
                                                                   through diag_g W_g, groups=G only
    linear    like conv; on flat features the G layers are one batched matmul over (G, B, F)
    bn        —                          BN over G·c channels (per channel, the same math)
    relu, pools, flatten, add: channelwise, applied as is

Each builder fuses the G layers' parameters (``runtime/fuse_storage.py``) and returns a *step*
``env -> None`` that sets the node's value; what has no exact fused form raises :class:`NotFusable`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..partition.plan import IRNode
from .fuse_storage import FusedTensor, fuse_layer
from .shared_conv import SharedHeadConv

_ELEMENTWISE = {"relu": torch.relu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu}
_POOLS = ("maxpool", "avgpool", "adaptive_avgpool", "upsample")
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
                    stride: int, padding: int) -> Callable[[dict], None]:
    """The step of a grouped conv run as ``groups`` convs on its channel blocks, outputs concatenated
    (the same convs as per partition: exact)."""

    def separate(env: dict) -> None:
        xs = env[arg].chunk(groups, 1)
        ws = w.fused.chunk(groups, 0)
        bs = bias.chunk(groups, 0) if bias is not None else [None] * groups
        env[name] = torch.cat([F.conv2d(x, wt, b, stride, padding) for x, wt, b in zip(xs, ws, bs)], 1)
    return separate


class NotFusable(Exception):
    """This module's siblings cannot run as one program; ``str(exc)`` says why."""


def _same(values: list, what: str) -> None:
    if any(v != values[0] for v in values[1:]):
        raise NotFusable(f"{what} differs between siblings")


Step = Callable[[dict], None]


class FusedOps:
    """The op builders of :class:`~gndgl_compiler.runtime.fused.FusedStage` (``G``, ``parts``, ``mods``,
    ``width``, ``tensors`` and ``_bn_counters`` are the stage's)."""

    G: int
    parts: list
    mods: list
    width: int
    tensors: list[FusedTensor]
    _bn_counters: list[torch.Tensor]
    _cols: dict[str, tuple[torch.Tensor, int] | None]

    def _head_cat(self, ns: list[IRNode], lists: list[list[IRNode]], inputs: list[str]) -> Step:
        """``cat(own live, siblings' first k channels detached)`` → a mixed value.

        Any share ratio and any order of the cat: head g's input channels are mapped to channels of the
        whole module output h (``self._cols``: a (G, C_in) index, or None for the identity, r = 1 in group
        order); a conv or linear layer over the mixed value then runs over all of h with head g's weight
        columns scattered to the channels it reads (zeros elsewhere: the same value, exactly).
        """
        G, c, widths = self.G, self.width, self.widths
        by_id = {q.id: q.group for q in self.parts}
        cols = []
        for g, (n, p) in enumerate(zip(ns, self.parts)):
            share_names = [m.name for m in lists[g] if m.kind == "input"][1:]
            read = {"h": (g, widths[g])}
            for nm, s in zip(share_names, p.shares):
                if s.source not in by_id or s.channels > widths[by_id[s.source]]:
                    raise NotFusable("aux head shares are not this module's sibling outputs")
                read[nm] = (by_id[s.source], s.channels)
            if any(a not in read for a in n.args) or "h" not in n.args \
                    or len({read[a][0] for a in n.args}) != len(n.args):
                raise NotFusable("aux head input is not the module output and sibling shares")
            cols.append(torch.cat([torch.arange(read[a][0] * c, read[a][0] * c + read[a][1]) for a in n.args]))
        # padded: a head reading fewer channels reads, in its padded columns, a padded (zero) channel of h
        # (the narrowest group's last; its weight there is a padded zero, so the scatter's duplicates agree)
        dummy = min(range(G), key=lambda q: widths[q]) * c + c - 1
        width = max(len(col) for col in cols)
        idx = torch.stack([torch.cat([col, col.new_full((width - len(col),), dummy)]) for col in cols])
        full = G * c
        ident = idx.shape[1] == full and torch.equal(idx, torch.arange(full).expand(G, full))
        self._cols[ns[0].name] = None if ident else (idx, full)
        arg = "h"

        def step(env: dict) -> None:
            live = env[arg]
            env[ns[0].name] = (live,)  # a mixed value: per head, own slice live, the others constants
        return step

    def _conv(self, name: str, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        """A conv or linear layer of all G groups; returns (step, output layout)."""
        G, arg = self.G, n.args[0]
        a = n.attrs
        cols = self._in_width(n, lay)
        if n.kind == "linear":
            return self._linear(name, arg, lay, mods, cols)
        w = fuse_layer([m.weight for m in mods], cols)
        b = fuse_layer([m.bias for m in mods]) if mods[0].bias is not None else None
        self.tensors += [w] + ([b] if b is not None else [])
        bias = b.fused if b is not None else None
        groups, stride, padding = a.get("groups", 1), a["stride"], a["padding"]
        if lay in ("shared", "stack"):
            if lay == "shared" and groups != 1:
                raise NotFusable(f"grouped conv {name} on a shared input")
            g_all = 1 if lay == "shared" else G * groups
            cin = w.fused.shape[1] * g_all
            if g_all > 1 and groups == 1 and cin <= _DENSE_BELOW and cin // g_all <= _DENSE_GROUP \
                    and w.fused.device.type == "cpu":
                # CPU: a grouped conv with a few channels per group is slower than the dense conv with a
                # block-diagonal weight (exact: the off-diagonal blocks are exact zeros, their gradient is dropped)
                o = w.fused.shape[0] // G
                mask = torch.zeros(G * o, cin, 1, 1, dtype=w.fused.dtype, device=w.fused.device)
                for g in range(G):
                    mask[g * o:(g + 1) * o, g * (cin // G):(g + 1) * (cin // G)] = 1

                def block_diag(env: dict) -> None:
                    weight = w.fused.repeat(1, G, 1, 1) * mask
                    env[name] = F.conv2d(env[arg], weight, bias, stride, padding)
                return block_diag, "stack"
            if g_all > 1 and groups == 1 and (cin // g_all) % _GROUPED_MULTIPLE and w.fused.device.type == "cpu":
                return _separate_convs(name, arg, w, bias, g_all, stride, padding), "stack"

            def conv(env: dict) -> None:
                env[name] = F.conv2d(env[arg], w.fused, bias, stride, padding, groups=g_all)
            return conv, "stack"
        if lay != "mixed" or groups != 1:
            raise NotFusable(f"conv {name} on a {lay} tensor")

        spread = self._spread(arg, w.fused)
        cin = self._cols[arg][1] if spread is not None else w.fused.shape[1]
        own = None
        if cin <= _DENSE_BELOW and cin // G <= _DENSE_GROUP and w.fused.device.type == "cpu":
            o = w.fused.shape[0] // G
            own = torch.zeros(G * o, cin, 1, 1, dtype=w.fused.dtype, device=w.fused.device)
            for g in range(G):
                own[g * o:(g + 1) * o, g * (cin // G):(g + 1) * (cin // G)] = 1

        def mixed(env: dict) -> None:
            weight = w.fused if spread is None else spread(w.fused)
            env[name] = SharedHeadConv.apply(env[arg][0], weight, bias, G, [stride] * 2, [padding] * 2, own)
        return mixed, "stack"

    def _spread(self, arg: str, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a mixed input read through a channel map: ``W -> W_full``, head g's weight columns
        scattered to the channels of h it reads, exact zeros elsewhere (None: the map is the identity).

        ``W`` is (G·O, C_in, k...) for a conv, (G, O, C_in) for a linear layer."""
        got = self._cols.get(arg)
        if got is None:
            return None
        G = self.G
        idx, full = got
        idx = idx.to(w.device)

        def spread(wt: torch.Tensor) -> torch.Tensor:
            linear = wt.dim() == 3  # (G, O, C_in); a conv weight is (G·O, C_in, k, k)
            w3 = wt if linear else wt.view(G, -1, *wt.shape[1:])
            index = idx.view(G, 1, -1, *([1] * (w3.dim() - 3))).expand(w3.shape)
            out = w3.new_zeros(G, w3.shape[1], full, *w3.shape[3:]).scatter(2, index, w3)
            return out if linear else out.view(-1, full, *wt.shape[2:])
        return spread

    def _linear(self, name: str, arg: str, lay: str, mods: list[torch.nn.Module], cols: int | None) -> tuple[Step, str]:
        """G linear layers as one batched matmul over (G, B, F) features (layout ``gstack``); ``cols``: the
        padded input width (None: not padded)."""
        G = self.G
        w = fuse_layer([m.weight for m in mods], cols, stacked=True)  # (G, O, I)
        b = fuse_layer([m.bias for m in mods]) if mods[0].bias is not None else None
        self.tensors += [w] + ([b] if b is not None else [])
        O, I = w.fused.shape[1:]

        def bias3() -> torch.Tensor | None:
            return None if b is None else b.fused.view(G, 1, O)

        if lay == "shared":
            def dense(env: dict) -> None:
                x = env[arg]
                out = F.linear(x, w.fused.view(G * O, I), None if b is None else b.fused)
                env[name] = out.view(x.shape[0], G, O).transpose(0, 1)
            return dense, "gstack"
        if lay in ("stack", "gstack"):
            def batched(env: dict) -> None:
                x = env[arg]
                if lay == "stack":
                    x = x.view(x.shape[0], G, -1).transpose(0, 1)
                wt = w.fused.transpose(1, 2)
                env[name] = torch.bmm(x, wt) if b is None else torch.baddbmm(bias3(), x, wt)
            return batched, "gstack"

        spread = self._spread(arg, w.fused)
        full = I if spread is None else self._cols[arg][1]

        def mixed(env: dict) -> None:
            x = env[arg][0]
            wt = w.fused if spread is None else spread(w.fused)
            out = SharedHeadConv.apply(x.unsqueeze(-1), wt.reshape(G * O, full, 1), None if b is None else b.fused,
                                       G, [1], [0])
            env[name] = out.view(x.shape[0], G, O).transpose(0, 1)
        return mixed, "gstack"

    def _bn(self, name: str, arg: str, mods: list[torch.nn.Module], lay: str) -> Step:
        m0 = mods[0]
        _same([(m.eps, m.momentum, m.affine, m.track_running_stats) for m in mods], f"batch norm {name}")
        if not (m0.affine and m0.track_running_stats and m0.momentum is not None):
            raise NotFusable(f"batch norm {name} without affine / running stats / momentum")
        w, b = fuse_layer([m.weight for m in mods]), fuse_layer([m.bias for m in mods])  # padded: γ = β = 0
        rm = fuse_layer([m.running_mean for m in mods], grad=False)
        rv = fuse_layer([m.running_var for m in mods], grad=False, fill=1.0)
        self.tensors += [w, b, rm, rv]
        self._bn_counters += [m.num_batches_tracked for m in mods]
        eps, momentum, owner = m0.eps, m0.momentum, self.mods[0]

        def bn(env: dict) -> None:
            x = env[arg]
            if lay == "gstack":  # (G, B, F) -> (B, G·F): one channel per (group, feature)
                x = x.transpose(0, 1).reshape(x.shape[1], -1)
            y = F.batch_norm(x, rm.fused, rv.fused, w.fused, b.fused, owner.training, momentum, eps)
            env[name] = y.view(y.shape[0], self.G, -1).transpose(0, 1) if lay == "gstack" else y
        return bn

    def _channelwise(self, n: IRNode, lay: str) -> Step:
        from ..graph.ops import get_op
        name, arg = n.name, n.args[0]
        G = self.G
        if n.kind == "flatten" and lay == "stack":  # (B, G·c, h, w) -> (G, B, c·h·w)
            def fn(x: torch.Tensor) -> torch.Tensor:
                return x if x.dim() == 2 else x.reshape(x.shape[0], G, -1).transpose(0, 1)
        elif n.kind == "flatten":
            def fn(x: torch.Tensor) -> torch.Tensor:
                return x if x.dim() <= 2 or lay == "gstack" else x.flatten(1)
        elif n.kind in _ELEMENTWISE:
            fn = _ELEMENTWISE[n.kind]
        elif n.kind == "l2norm":  # over the features of each group: dim 2 of (G, B, F)
            if lay != "gstack":
                raise NotFusable(f"l2norm {name} on a {lay} tensor")

            def fn(x: torch.Tensor) -> torch.Tensor:
                return F.normalize(x, dim=2)
        else:
            op = get_op(n.kind)
            kwargs = op.kwargs(n.attrs, [])

            def fn(x: torch.Tensor, _f=op.target(), _k=kwargs) -> torch.Tensor:
                return _f(x, **_k)
        if lay == "mixed":
            got = self._cols.get(arg)
            if got is not None and n.kind == "flatten":  # channel c of head g's input -> features c·S..c·S+S
                idx, full = got
                S = n.shape[0] // idx.shape[1]
                got = ((idx.unsqueeze(2) * S + torch.arange(S)).flatten(1), full * S)
            self._cols[name] = got

            def step(env: dict) -> None:
                env[name] = (fn(env[arg][0]),)
        else:
            def step(env: dict) -> None:
                env[name] = fn(env[arg])
        return step


def _alias(name: str, arg: str) -> Step:
    """Bind ``name`` to ``arg``'s value (group g's own slice of a shared tensor is the whole stack)."""
    def step(env: dict) -> None:
        env[name] = env[arg]
    return step


def _fn(name: str, f: Callable, args: list[str], listed: bool = False, **kw) -> Step:
    """``env[name] = f(*args, **kw)`` (or ``f([args], **kw)`` when ``listed``)."""
    def step(env: dict) -> None:
        vals = [env[a] for a in args]
        env[name] = f(vals, **kw) if listed else f(*vals, **kw)
    return step
