"""Sibling fusion: a module's G partitions, on one device, run as one program (DESIGN §2).

The G partitions of a module have the same IR (same node names and kinds; only the channel
slice differs), so each IR node becomes one fused op over all G groups. Values carry a
layout:

    shared  one tensor every group reads          (the detached module input, the image)
    stack   groups side by side on dim 1          (B, G·c, ...): group g in channels g·c..(g+1)·c
    mixed   a stack, wrapped in a 1-tuple          aux-head input with sharing r = 1: head g sees
                                                   group g's channels live, the others as constants

    op        shared in                  stack in                  mixed in
    conv      dense conv, W = cat_g W_g  conv(groups=G·groups)     dense conv(h, W); input gradient
                                                                   through diag_g W_g, groups=G only
    linear    like conv; on flat features the G layers are one batched matmul over (G, B, F)
              ("gstack" layout, what flatten of a stack gives)
    bn        —                          BN over G·c channels (per channel, the same math)
    slice     start = g·len tiling → the shared tensor itself (identity shortcut of group g)
    relu, pools, flatten, add: channelwise, applied as is

The ``mixed`` conv is exact: conv(cat(own live, siblings detached), W_g) has the value
conv(h, W_g), the weight gradient of that conv, and an input gradient that reaches group g's
body only through W_g's own columns (``runtime/shared_conv.py``). What cannot be expressed this
way (dropout with per-partition RNG, share_ratio < 1, predsim / InfoPro losses, differing
siblings, ...) raises :class:`NotFusable` with the reason, and the executor runs that module
partition by partition.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..codegen.modules import PartitionModule
from ..partition.plan import IRNode, Partition
from .fuse_storage import FusedTensor, fuse
from .fused_loss import FusedLoss
from .shared_conv import SharedHeadConv

_ELEMENTWISE = {"relu": torch.relu, "sigmoid": torch.sigmoid}
_POOLS = ("maxpool", "avgpool", "adaptive_avgpool", "upsample")
_DENSE_BELOW = 16
_DENSE_GROUP = 4
"""On the CPU, grouped convs with at most ``_DENSE_BELOW`` input channels in all and ``_DENSE_GROUP`` per
group run as one dense conv with a block-diagonal weight (measured on torch 2.14, one thread: 1.6x faster
at 4 groups of 4 channels; slower at 2 groups of 8 and from 32 channels on)."""


class NotFusable(Exception):
    """This module's siblings cannot run as one program; ``str(exc)`` says why."""


def _same(values: list, what: str) -> None:
    if any(v != values[0] for v in values[1:]):
        raise NotFusable(f"{what} differs between siblings")


Step = Callable[[dict], None]


class FusedStage:
    """One module's G sibling partitions as one program (body, aux heads, local losses).

    Args:
        mods: the G partition modules of the module, in group order, already on their device.

    Raises:
        NotFusable: with the reason, when the siblings cannot be fused exactly.
    """

    def __init__(self, mods: list[PartitionModule]):
        parts = [m.part for m in mods]
        self.G = G = len(parts)
        if G < 2:
            raise NotFusable("a single group (nothing to fuse)")
        if [p.group for p in parts] != list(range(G)) or any(p.groups != G for p in parts):
            raise NotFusable("not all groups of the module are here")
        self.mods, self.parts, self.pids = mods, parts, [p.id for p in parts]
        _same([[i.source for i in p.inputs] for p in parts], "input list")
        if any(n.kind in ("dropout",) for p in parts for n in p.body + p.head):
            raise NotFusable("dropout (per-partition random streams)")
        if any(p.loss.kind == "infopro" for p in parts):
            raise NotFusable("InfoPro loss")
        outs = parts[0].head_outputs
        _same([p.head_outputs for p in parts], "head outputs")
        if set(outs) != {"logits"}:
            raise NotFusable(f"head outputs {sorted(outs)} (only class logits fuse)")
        self.logits = outs["logits"]
        self.loss = FusedLoss(parts)  # checked before any parameter moves into fused storage
        self.width = parts[0].out_shape[0]
        self.tensors: list[FusedTensor] = []
        self._bn_counters: list[torch.Tensor] = []
        self.body = self._compile([p.body for p in parts], [m.body for m in mods], head=False)
        self.body_out = parts[0].output
        self.head = self._compile([p.head for p in parts], [m.aux for m in mods], head=True)
        self.counters = fuse(self._bn_counters, grad=False) if self._bn_counters else None
        self.cat_input: str | None = self._cat_input(parts[0])

    # ---------------------------------------------------------------- compilation
    @staticmethod
    def _cat_input(p: Partition) -> str | None:
        """The body's ``cat`` of all its inputs in order, if that is how it starts (fed fused)."""
        ins = [n.name for n in p.body if n.kind == "input"]
        for n in p.body:
            if n.kind == "cat" and n.args == ins and len(ins) > 1:
                return n.name
        return None

    def _compile(self, lists: list[list[IRNode]], gms: list[torch.nn.Module], head: bool) -> list[tuple[str, Step]]:
        """The fused steps of the siblings' bodies (or aux heads), fusing their parameters on the way.

        Args:
            lists: each sibling's IR nodes (body or head), in group order.
            gms: each sibling's GraphModule (its submodules are named after the IR nodes).
            head: compiling the aux heads (inputs ``h`` + sibling shares) rather than the bodies.

        Returns:
            ``[(node name, step)]`` in IR order; each step sets ``env[node name]``.

        Raises:
            NotFusable: an op or pattern without an exact fused form.
        """
        G = self.G
        _same([[(n.kind, n.shape) if head and n.kind in ("input", "cat") else (n.name, n.kind, n.args, n.shape)
                for n in nodes] for nodes in lists], "IR")
        layout: dict[str, str] = {}
        steps: list[tuple[str, Step]] = []
        inputs = [n.name for n in lists[0] if n.kind == "input"]
        for i, n in enumerate(lists[0]):
            ns = [nodes[i] for nodes in lists]
            kind, name, args = n.kind, n.name, n.args
            if kind == "input":
                layout[name] = ("stack" if name == "h" else "share_in") if head else "shared"
                continue
            lays = [layout[a] for a in args]
            if kind == "slice":
                _same([n.attrs["length"] for n in ns], "slice length")
                ln = n.attrs["length"]
                if lays != ["shared"] or [m.attrs["start"] for m in ns] != [g * ln for g in range(G)] \
                        or self._shape(lists[0], args[0])[0] != G * ln:
                    raise NotFusable(f"slice {name} is not group g's own channels")
                steps.append((name, _alias(name, args[0])))
                layout[name] = "stack"
                continue
            if kind == "cat" and head:
                steps.append((name, self._head_cat(ns, lists, inputs)))
                layout[name] = "mixed"
                continue
            if "share_in" in lays:
                raise NotFusable(f"sibling shares read by {kind} (share_ratio < 1 or a custom head)")
            _same([m.attrs for m in ns], f"attributes of {name}")
            if kind == "cat":
                if set(lays) != {"shared"}:
                    raise NotFusable(f"cat {name} of group tensors")
                steps.append((name, _fn(name, torch.cat, args, dim=1, listed=True)))
                layout[name] = "shared"
            elif kind in ("conv", "linear"):
                step, layout[name] = self._conv(name, n, lays[0], [gm.get_submodule(name) for gm in gms])
                steps.append((name, step))
            elif kind == "bn":
                if lays[0] not in ("stack", "gstack"):
                    raise NotFusable(f"batch norm {name} over a {lays[0]} tensor")
                steps.append((name, self._bn(name, args[0], [gm.get_submodule(name) for gm in gms], lays[0])))
                layout[name] = lays[0]
            elif kind in _ELEMENTWISE or kind in _POOLS or kind == "flatten":
                if kind in _POOLS and lays[0] == "gstack":
                    raise NotFusable(f"{kind} {name} on flat features")
                steps.append((name, self._channelwise(n, lays[0])))
                layout[name] = "gstack" if kind == "flatten" and lays[0] == "stack" else lays[0]
            elif kind == "add":
                if lays[0] != lays[1] or lays[0] == "mixed":
                    raise NotFusable(f"add {name} of {lays[0]} and {lays[1]} tensors")
                steps.append((name, _fn(name, torch.add, args)))
                layout[name] = lays[0]
            else:
                raise NotFusable(f"op '{kind}' ({name})")
        out = lists[0][-1].name if not head else lists[0][[m.name for m in lists[0]].index(
            self.parts[0].head_outputs.get("logits", lists[0][-1].name))].name
        if layout[out] not in ("stack", "gstack"):
            raise NotFusable(f"{'head' if head else 'body'} output is not per group")
        if not head:
            self.body_gstack = layout[out] == "gstack"
        return steps

    @staticmethod
    def _shape(nodes: list[IRNode], name: str) -> list[int]:
        """Per-sample shape of IR node ``name``."""
        return next(n.shape for n in nodes if n.name == name)

    def _head_cat(self, ns: list[IRNode], lists: list[list[IRNode]], inputs: list[str]) -> Step:
        """``cat(own live, siblings detached)`` in group order → a mixed value (sharing r = 1)."""
        G = self.G
        for g, (n, p) in enumerate(zip(ns, self.parts)):
            share_names = [m.name for m in lists[g] if m.kind == "input"][1:]
            if len(p.shares) != G - 1 or any(s.channels != self.width for s in p.shares):
                raise NotFusable("share_ratio < 1")
            group_of = {"h": g}
            by_id = {q.id: q.group for q in self.parts}
            for nm, s in zip(share_names, p.shares):
                group_of[nm] = by_id[s.source]
            if [group_of.get(a) for a in n.args] != list(range(G)):
                raise NotFusable("aux head input is not the module output in group order")
        arg = "h"

        def step(env: dict) -> None:
            live = env[arg]
            env[ns[0].name] = (live,)  # a mixed value: per head, own slice live, the others constants
        return step

    def _conv(self, name: str, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        """A conv or linear layer of all G groups; returns (step, output layout)."""
        G, arg = self.G, n.args[0]
        a = n.attrs
        if n.kind == "linear":
            return self._linear(name, arg, lay, mods)
        w = fuse([m.weight for m in mods])
        b = fuse([m.bias for m in mods]) if mods[0].bias is not None else None
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

            def conv(env: dict) -> None:
                env[name] = F.conv2d(env[arg], w.fused, bias, stride, padding, groups=g_all)
            return conv, "stack"
        if lay != "mixed" or groups != 1:
            raise NotFusable(f"conv {name} on a {lay} tensor")

        own = None
        cin = w.fused.shape[1]
        if cin <= _DENSE_BELOW and cin // G <= _DENSE_GROUP and w.fused.device.type == "cpu":
            o = w.fused.shape[0] // G
            own = torch.zeros(G * o, cin, 1, 1, dtype=w.fused.dtype, device=w.fused.device)
            for g in range(G):
                own[g * o:(g + 1) * o, g * (cin // G):(g + 1) * (cin // G)] = 1

        def mixed(env: dict) -> None:
            env[name] = SharedHeadConv.apply(env[arg][0], w.fused, bias, G, [stride] * 2, [padding] * 2, own)
        return mixed, "stack"

    def _linear(self, name: str, arg: str, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        """G linear layers as one batched matmul over (G, B, F) features (layout ``gstack``)."""
        G = self.G
        w = fuse([m.weight for m in mods], linear=True)  # (G, O, I)
        b = fuse([m.bias for m in mods]) if mods[0].bias is not None else None
        self.tensors += [w] + ([b] if b is not None else [])
        O, I = mods[0].weight.shape

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

        def mixed(env: dict) -> None:
            x = env[arg][0]
            out = SharedHeadConv.apply(x.unsqueeze(-1), w.fused.view(G * O, I, 1), None if b is None else b.fused,
                                       G, [1], [0])
            env[name] = out.view(x.shape[0], G, O).transpose(0, 1)
        return mixed, "gstack"

    def _bn(self, name: str, arg: str, mods: list[torch.nn.Module], lay: str) -> Step:
        m0 = mods[0]
        _same([(m.eps, m.momentum, m.affine, m.track_running_stats) for m in mods], f"batch norm {name}")
        if not (m0.affine and m0.track_running_stats and m0.momentum is not None):
            raise NotFusable(f"batch norm {name} without affine / running stats / momentum")
        w, b = fuse([m.weight for m in mods]), fuse([m.bias for m in mods])
        rm = fuse([m.running_mean for m in mods], grad=False)
        rv = fuse([m.running_var for m in mods], grad=False)
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
        else:
            op = get_op(n.kind)
            kwargs = op.kwargs(n.attrs, [])

            def fn(x: torch.Tensor, _f=op.function, _k=kwargs) -> torch.Tensor:
                return _f(x, **_k)
        if lay == "mixed":
            def step(env: dict) -> None:
                env[name] = (fn(env[arg][0]),)
        else:
            def step(env: dict) -> None:
                env[name] = fn(env[arg])
        return step

    # ---------------------------------------------------------------- execution
    def intact(self) -> bool:
        """True while every partition parameter still aliases the fused storage."""
        return all(t.intact() for t in self.tensors) and (self.counters is None or self.counters.intact())

    def attach_grads(self) -> None:
        """Make the partitions' ``.grad`` views of the fused gradients (before a fused backward)."""
        for t in self.tensors:
            t.attach_grads()

    def fused_grads(self) -> list[torch.Tensor]:
        """The fused gradient tensors (zeroed after each optimizer step)."""
        return [t.fused.grad for t in self.tensors if t.grads is not None]

    def forward(self, inputs: list[torch.Tensor], fused_input: torch.Tensor | None,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bodies, aux heads and local losses of all G partitions.

        Args:
            inputs: the body inputs (upstream outputs, not yet detached), in plan order.
            fused_input: the concatenation of ``inputs`` when the upstream module ran fused
                (saves the cat), else None.
            y: labels.

        Returns:
            ``(body output (B, G·c, ...), logits (B, G, classes), losses (G,), total loss)``.
        """
        env: dict = {}
        skip = None
        if fused_input is not None and self.cat_input is not None:
            env[self.cat_input] = fused_input.detach()
            skip = self.cat_input
        else:
            names = [n.name for n in self.parts[0].body if n.kind == "input"]
            for nm, x in zip(names, inputs):
                env[nm] = x.detach()
        if self.counters is not None and self.mods[0].training:
            self.counters.fused.add_(1)
        for name, step in self.body:
            if name != skip and name not in env:
                step(env)
        out = env[self.body_out]
        if self.body_gstack:  # flat group features (G, B, D) -> (B, G·D)
            out = out.transpose(0, 1).reshape(out.shape[1], -1)
        henv = {"h": out}
        for name, step in self.head:
            step(henv)
        B = out.shape[0]
        z = henv[self.logits]
        logits = z.transpose(0, 1) if z.dim() == 3 else z.view(B, self.G, -1)
        losses = self.loss(logits, y)
        return out, logits, losses, losses.sum()


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
