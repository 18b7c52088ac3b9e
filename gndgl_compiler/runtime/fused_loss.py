"""The local losses of a module's G sibling partitions as one batched computation.

For logits ``Z`` of shape (B, G, classes) — head g's logits in ``Z[:, g]`` — and labels y:

    ce_g    = mean_b CE(Z[b, g], y_b)                               one cross_entropy over (B, classes, G)
    p̂       = diversity_probs(Z) along the class dim                  (B, G, classes), like losses.diversity_probs
    S[b,g,h] = cos(p̂[b, g], sg[p̂[b, h]])                              one bmm of the unit rows
    pen_g   = mean_{h≠g} mean_b S[b, g, h]                           the G·(G−1) diversity terms at once
    L_g     = ce_g + w · pen_g

Partition g's loss depends on its own logits live and on its siblings' only through the
detached p̂ — the same stop-gradient as the per-partition losses (``losses.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..partition.plan import Partition
from .fused_ops import NotFusable

_EPS = 1e-12
_COS_EPS = 1e-8


class FusedLoss:
    """Batched cross-entropy (+ diversity penalty) of G sibling partitions.

    Args:
        parts: the G sibling partitions, in group order.

    Raises:
        NotFusable: a loss other than cross-entropy, or siblings whose losses differ.
    """

    def __init__(self, parts: list[Partition]):
        G = len(parts)
        loss = parts[0].loss
        if any(p.loss != loss for p in parts):
            raise NotFusable("local losses differ between siblings")
        if loss.kind != "ce":
            raise NotFusable(f"'{loss.kind}' loss")
        ids = {p.id for p in parts}
        self.weight = loss.diversity_weight if G > 1 else 0.0
        if self.weight > 0 and any(set(p.siblings) != ids - {p.id} for p in parts):
            raise NotFusable("diversity siblings are not the whole module")
        self.temperature = loss.diversity_temperature
        self.G = G
        self._off: torch.Tensor | None = None
        self._classes: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-partition losses.

        Args:
            logits: (B, G, classes).
            y: (B,) labels.

        Returns:
            (G,) tensor: partition g's local loss at index g.
        """
        G = self.G
        ce = F.cross_entropy(logits.transpose(1, 2), y.unsqueeze(1).expand(-1, G), reduction="none").mean(0)
        if self.weight <= 0:
            return ce
        z = logits.double() if logits.dtype == torch.float64 else logits.float()
        p = torch.softmax(z / self.temperature, dim=2)
        if self._classes is None or self._classes.numel() != p.shape[2] or self._classes.device != p.device:
            self._classes = torch.arange(p.shape[2], device=p.device)
        p = p.masked_fill((y.unsqueeze(1) == self._classes).unsqueeze(1), 0.0)  # no host sync (F.one_hot has one)
        p = p / p.sum(dim=2, keepdim=True).clamp_min(_EPS)
        p = F.normalize(p, p=2, dim=2, eps=_EPS)
        pn = p / torch.linalg.vector_norm(p, dim=2, keepdim=True).clamp_min(_COS_EPS)
        sim = torch.bmm(pn, pn.detach().transpose(1, 2)).mean(0)  # (G, G): sim[g, h] = mean_b cos(g, sg h)
        if self._off is None or self._off.dtype != sim.dtype or self._off.device != sim.device:
            self._off = (1 - torch.eye(G, dtype=sim.dtype, device=sim.device)) / (G - 1)
        pen = (sim * self._off).sum(1)
        return ce + (self.weight * pen).to(ce.dtype)
