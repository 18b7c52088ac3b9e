"""One module's G sibling partitions as one program: :class:`FusedStage`."""

from __future__ import annotations

import torch

from ...codegen.modules import PartitionModule
from .compile import compile_nodes, concat_input
from .layouts import FusionBuild, NotFusable, same, stacked
from .loss import FusedLoss
from .padded import real_channels
from .storage import FusedTensor, fuse


def _check_siblings(mods: list[PartitionModule]) -> None:
    """Refuse what is not a whole module of like siblings (before any parameter moves).

    Raises:
        NotFusable: one group, missing groups, differing inputs, output shapes or head outputs.
    """
    parts = [m.part for m in mods]
    G = len(parts)
    if G < 2:
        raise NotFusable("a single group (nothing to fuse)")
    if [p.group for p in parts] != list(range(G)) or any(p.groups != G for p in parts):
        raise NotFusable("not all groups of the module are here")
    same([[i.source for i in p.inputs] for p in parts], "input list")
    if any(list(p.out_shape[1:]) != list(parts[0].out_shape[1:]) for p in parts):
        raise NotFusable(f"group output shapes differ beyond the width ({[p.out_shape for p in parts]})")
    outs = parts[0].head_outputs
    same([p.head_outputs for p in parts], "head outputs")
    if set(outs) - {"sim", "recon"} not in ({"logits"}, {"proj"}) or ("proj" in outs and "recon" not in outs):
        raise NotFusable(f"head outputs {sorted(outs)} (class logits, predsim's sim, InfoPro's recon / proj fuse)")


class FusedStage:
    """One module's G sibling partitions as one program (body, aux heads, local losses).

    Each IR node of the siblings becomes one fused step, built by its kind's entry of the fused-op table
    (``fusion/table.py``); the siblings' parameters become views of one storage per layer.

    Args:
        mods: the G partition modules of the module, in group order, already on their device.

    Raises:
        NotFusable: with the reason, when the siblings cannot be fused exactly.
    """

    def __init__(self, mods: list[PartitionModule]):
        _check_siblings(mods)
        parts = [m.part for m in mods]
        self.G = len(parts)
        self.mods, self.parts, self.pids = mods, parts, [p.id for p in parts]
        self.widths = [p.out_shape[0] for p in parts]
        self.padded = len(set(self.widths)) > 1  # an unequal split: fused padded (fusion/padded.py)
        self.outputs = dict(parts[0].head_outputs)
        self.loss = FusedLoss(parts)  # checked before any parameter moves into fused storage
        self.width = max(self.widths)  # the padded group width (every group's, when equal)
        b = FusionBuild(self.G, parts, self.widths, self.padded, mods[0])
        b.real_widths["h"] = self.widths  # per-group real widths of stack / gstack values
        self.body, layout = compile_nodes(b, [p.body for p in parts], [m.body for m in mods], False, self.outputs)
        self.body_out = parts[0].output
        self.body_gstack = layout[parts[0].body[-1].name] == "gstack"
        self.body_gtok = layout[parts[0].body[-1].name] == "gtok"
        self.head, _ = compile_nodes(b, [p.head for p in parts], [m.aux for m in mods], True, self.outputs)
        self.tensors: list[FusedTensor] = b.tensors
        self.counters = fuse(b.bn_counters, grad=False) if b.bn_counters else None
        self.cat_input: str | None = concat_input(parts[0].body)
        self.unpad = real_channels(self.widths, self.width, b.device) if self.padded else None
        self.loss.sim_widths = b.padding(self.outputs["sim"]) if "sim" in self.outputs else None

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

    def forward(self, inputs: list[torch.Tensor], fused_input: torch.Tensor | None, y: torch.Tensor,
                image01: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bodies, aux heads and local losses of all G partitions.

        Args:
            inputs: the body inputs (upstream outputs, not yet detached), in plan order.
            fused_input: the concatenation of ``inputs`` when the upstream module ran fused
                (saves the cat), else None.
            y: labels.
            image01: the de-normalised image (InfoPro's reconstruction target), else None.

        Returns:
            ``(body output (B, G·c, ...), logits (B, G, classes) or None (InfoPro contrast), losses (G,),
            total loss)``.
        """
        out = self._body(inputs, fused_input)
        henv = {"h": out}  # padded: the heads read the padded layout, the other stages the real channels
        if self.unpad is not None:
            out = out.index_select(1, self.unpad)
        for _name, step in self.head:
            step(henv)
        B = out.shape[0]
        logits = None
        if "logits" in self.outputs:
            z = henv[self.outputs["logits"]]
            logits = z.transpose(0, 1) if z.dim() == 3 else z.view(B, self.G, -1)
        sim, recon, proj = (henv[self.outputs[k]] if k in self.outputs else None for k in ("sim", "recon", "proj"))
        losses = self.loss(logits, y, sim=sim, recon=recon, image01=image01, proj=proj)
        return out, logits, losses, losses.sum()

    def _body(self, inputs: list[torch.Tensor], fused_input: torch.Tensor | None) -> torch.Tensor:
        """The G bodies' output as a stack (B, G·c, ...), padded in an unequal split."""
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
        elif self.body_gtok:  # tokens (G, B, N, c) -> (B, G·c, N)
            out = stacked(out)
        return out
