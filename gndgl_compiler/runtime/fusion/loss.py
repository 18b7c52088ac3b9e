"""The local losses of a module's G sibling partitions as one batched computation.

For logits ``Z`` of shape (B, G, classes) — head g's logits in ``Z[:, g]`` — and labels y:

    ce_g    = mean_b CE(Z[b, g], y_b)                               one cross_entropy over (B, classes, G)
    p̂       = diversity_probs(Z) along the class dim                  (B, G, classes), like losses.diversity_probs
    S[b,g,h] = cos(p̂[b, g], sg[p̂[b, h]])                              one bmm of the unit rows
    pen_g   = mean_{h≠g} mean_b S[b, g, h]                           the G·(G−1) diversity terms at once
    L_g     = task_g + w · pen_g

where task_g is ce_g, or predsim's β·MSE(S(sim_g), S(onehot y)) + (1−β)·ce_g (the G similarity matrices
as one bmm), or InfoPro's λ_recon·BCE(recon_g, image) + λ_task·ce_g (softmax variant; the G BCEs are
G float32 calls), or λ_recon·BCE + λ_task·SupCon(proj_g) (contrast variant: G float32 calls).

Partition g's loss depends on its own logits live and on its siblings' only through the
detached p̂ — the same stop-gradient as the per-partition losses (``losses.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import losses as L
from ...partition.plan import Partition
from .layouts import NotFusable

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
        if loss.kind not in ("ce", "predsim", "infopro"):
            raise NotFusable(f"'{loss.kind}' loss")
        self.kind, self.spec = loss.kind, loss
        ids = {p.id for p in parts}
        self.weight = loss.diversity_weight if G > 1 else 0.0
        if self.weight > 0 and any(set(p.siblings) != ids - {p.id} for p in parts):
            raise NotFusable("diversity siblings are not the whole module")
        self.temperature = loss.diversity_temperature
        self.G = G
        self._off: torch.Tensor | None = None
        self._classes: torch.Tensor | None = None
        self.sim_widths: list[int] | None = None
        """An unequal split's real widths of predsim's ``sim`` (padded with zero channels), else None."""
        self._mask: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, sim: torch.Tensor | None = None,
                 recon: torch.Tensor | None = None, image01: torch.Tensor | None = None,
                 proj: torch.Tensor | None = None) -> torch.Tensor:
        """Per-partition losses.

        Args:
            logits: (B, G, classes).
            y: (B,) labels.
            sim: predsim's similarity features (B, G·c, ...), group g in channels g·c..(g+1)·c.
            recon: InfoPro's reconstructions (B, G·3, H, W).
            image01: InfoPro's target, the de-normalised image (B, 3, H, W).
            proj: InfoPro contrast's projections (G, B, D), instead of logits.

        Returns:
            (G,) tensor: partition g's local loss at index g.
        """
        G, spec = self.G, self.spec
        if logits is None:  # InfoPro contrast: G supervised contrastive losses (as losses.supcon_loss)
            task = torch.stack([L.supcon_loss(proj[g], y, spec.temperature) for g in range(G)])
            return spec.recon_weight * self._recon(recon, image01) + spec.task_weight * task
        ce = F.cross_entropy(logits.transpose(1, 2), y.unsqueeze(1).expand(-1, G), reduction="none").mean(0)
        if self.kind == "predsim":
            ce = spec.beta * self._predsim(sim, y, logits.shape[2]).to(ce.dtype) + (1.0 - spec.beta) * ce
        elif self.kind == "infopro":
            ce = spec.recon_weight * self._recon(recon, image01).to(ce.dtype) + spec.task_weight * ce
        if self.weight <= 0:
            return ce
        z = logits.double() if logits.dtype == torch.float64 else logits.float()
        p = torch.softmax(z / self.temperature, dim=2)
        own = (y.unsqueeze(1) == self._classes_of(p.shape[2], p.device)).unsqueeze(1)  # no host sync (unlike F.one_hot)
        p = p.masked_fill(own, 0.0)
        p = p / p.sum(dim=2, keepdim=True).clamp_min(_EPS)
        p = F.normalize(p, p=2, dim=2, eps=_EPS)
        pn = p / torch.linalg.vector_norm(p, dim=2, keepdim=True).clamp_min(_COS_EPS)
        sim = torch.bmm(pn, pn.detach().transpose(1, 2)).mean(0)  # (G, G): sim[g, h] = mean_b cos(g, sg h)
        if self._off is None or self._off.dtype != sim.dtype or self._off.device != sim.device:
            self._off = (1 - torch.eye(G, dtype=sim.dtype, device=sim.device)) / (G - 1)
        pen = (sim * self._off).sum(1)
        return ce + (self.weight * pen).to(ce.dtype)

    def _classes_of(self, n: int, device: torch.device) -> torch.Tensor:
        if self._classes is None or self._classes.numel() != n or self._classes.device != device:
            self._classes = torch.arange(n, device=device)
        return self._classes

    def _predsim(self, sim: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
        """(G,) ``MSE(S(sim_g), S(onehot(y)))``: the G similarity matrices as one bmm (``losses.similarity_matrix``)."""
        G, B = self.G, sim.shape[0]
        z = sim.double() if sim.dtype == torch.float64 else sim.float()
        flat = sim.dim() == 2  # flat features (B, G·D) are used as they are, like losses.similarity_matrix
        z = z.reshape(B, G, sim.shape[1] // G, -1)  # (B, G, c, positions)
        if self.sim_widths is None:
            z = z[..., 0] if flat else z.std(dim=3, correction=1 if z.shape[3] > 1 else 0)
            z = F.normalize(z - z.mean(dim=2, keepdim=True), p=2, dim=2, eps=_EPS).transpose(0, 1)  # (G, B, c)
        else:
            z = self._masked_stats(z, flat)
        s = torch.bmm(z, z.transpose(1, 2)).clamp(-1.0, 1.0)
        t = (y.unsqueeze(1) == self._classes_of(classes, y.device)).to(z.dtype)  # one-hot without a host sync
        t = F.normalize(t - t.mean(dim=1, keepdim=True), p=2, dim=1, eps=_EPS)
        return (s - (t @ t.t()).clamp(-1.0, 1.0)).square().mean((1, 2))

    def _masked_stats(self, z: torch.Tensor, flat: bool) -> torch.Tensor:
        """Predsim's centred, normalised channel deviations of a padded (B, G, w, positions) ``sim`` (or its
        features as they are, when ``flat``), over each group's real channels only: (G, B, w), exact zeros
        in the padded channels.

        A padded channel is all zeros: its standard deviation 0 has no finite gradient (√ at 0), so only
        real channels' variances reach the square root; means divide by each group's real width."""
        if self._mask is None or self._mask.device != z.device or self._mask.shape[2] != z.shape[2]:
            real = torch.tensor(self.sim_widths, device=z.device)
            self._mask = (torch.arange(z.shape[2], device=z.device) < real.unsqueeze(1)).unsqueeze(0)  # (1, G, w)
        mask = self._mask
        if flat:
            z = z[..., 0]
        else:
            var = z.var(dim=3, correction=1 if z.shape[3] > 1 else 0)
            z = torch.where(mask, torch.where(mask, var, 1.0).sqrt(), 0.0)
        mean = z.sum(dim=2, keepdim=True) / mask.sum(dim=2, keepdim=True).to(z.dtype)
        return F.normalize(torch.where(mask, z - mean, 0.0), p=2, dim=2, eps=_EPS).transpose(0, 1)

    def _recon(self, recon: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
        """(G,) ``losses.recon_bce`` of each group's reconstruction: G BCE calls, as per partition
        (one batched BCE rounds its float32 gradient differently, ~1e-7, since the mean's 1/N is applied apart)."""
        c = recon.shape[1] // self.G
        return torch.stack([L.recon_bce(recon[:, g * c:(g + 1) * c], image01) for g in range(self.G)])
