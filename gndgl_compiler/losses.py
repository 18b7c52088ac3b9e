"""Local losses of gndgl (DESIGN.md section 2).

Pure functions of tensors: no module state, no side effects. Every loss returns a
0-dim tensor. Arguments that come from the compiler (temperatures, module indices)
are checked and a bad value raises :class:`ValueError`, since it is a bug of the
caller rather than something a user typed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of class logits.

    Args:
        logits: B×classes scores.
        y: B class indices (int64).

    Returns:
        0-dim tensor, the batch mean.
    """
    return F.cross_entropy(logits, y)


def similarity_matrix(x: Tensor) -> Tensor:
    """Similarity matrix S(x) of the predsim loss (Nøkland & Eidnes 2019).

    A B×C×H×W (or any B×C×...) tensor is first reduced to the per-channel standard
    deviation over the remaining dims (B×C; unbiased, or 0 when there is a single
    position); a B×D tensor is used as is. Each row is centred and L2-normalised,
    and the result is X·Xᵀ clamped to [−1, 1]. Computed in float32 (or float64 for
    float64 input) so it is safe under autocast.

    Args:
        x: B×D or B×C×... tensor.

    Returns:
        B×B tensor.

    Raises:
        ValueError: if ``x`` has fewer than 2 dims.
    """
    if x.dim() < 2:
        raise ValueError(f"similarity_matrix needs a B×D or B×C×H×W tensor, got shape {tuple(x.shape)}")
    z = x.double() if x.dtype == torch.float64 else x.float()
    if z.dim() > 2:
        z = z.flatten(2)
        z = z.std(dim=2, correction=1 if z.shape[2] > 1 else 0)
    z = z - z.mean(dim=1, keepdim=True)
    z = F.normalize(z, p=2, dim=1, eps=_EPS)
    return (z @ z.t()).clamp(-1.0, 1.0)


def predsim_loss(sim_features: Tensor, logits: Tensor, y: Tensor, num_classes: int, beta: float = 0.99) -> Tensor:
    """The predsim loss: β·MSE(S(sim_features), S(onehot(y))) + (1−β)·CE(logits, y).

    Args:
        sim_features: output of the similarity conv (B×C×H×W) or B×D features.
        logits: B×classes output of the prediction branch.
        y: B class indices.
        num_classes: number of classes of the one-hot targets.
        beta: weight of the similarity term, in [0, 1].

    Returns:
        0-dim tensor.

    Raises:
        ValueError: if ``beta`` is outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"predsim beta must be in [0, 1], got {beta}")
    s_features = similarity_matrix(sim_features)
    # y == arange: the one-hot targets without F.one_hot's range check (two host reads per call)
    onehot = (y.unsqueeze(1) == torch.arange(num_classes, device=y.device)).to(s_features.dtype)
    s_labels = similarity_matrix(onehot)
    sim = F.mse_loss(s_features, s_labels)
    return beta * sim + (1.0 - beta) * cross_entropy(logits, y)


def diversity_probs(logits: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Normalised non-target probabilities p̂ of the diversity penalty (section 3.4).

    p = softmax(logits / T); the true class is zeroed; p is renormalised to sum 1
    (with a tiny eps against 0) and then L2-normalised. Computed in float32 (float64 for
    float64 logits, so double-precision checks of the fused losses stay exact).

    Args:
        logits: B×classes scores of one group's aux head.
        y: B class indices.
        temperature: softmax temperature T > 0 (recipe: 3.0).

    Returns:
        B×classes tensor whose rows have unit L2 norm.

    Raises:
        ValueError: if ``temperature`` is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"diversity temperature must be > 0, got {temperature}")
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    p = torch.softmax(z / temperature, dim=1)
    # y == arange: the one-hot mask without F.one_hot's range check (a host sync per call)
    p = p.masked_fill(y.unsqueeze(1) == torch.arange(p.shape[1], device=p.device), 0.0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(_EPS)
    return F.normalize(p, p=2, dim=1, eps=_EPS)


def diversity_penalty(p_own: Tensor, p_others: Sequence[Tensor]) -> Tensor:
    """Mean over siblings b of the batch-mean cosine cos(p̂_a, sg[p̂_b]).

    The sibling tensors are detached here, so a caller may pass live tensors: no
    gradient ever reaches another group.

    Args:
        p_own: B×classes output of :func:`diversity_probs` for this group (live).
        p_others: the siblings' B×classes outputs of :func:`diversity_probs`.

    Returns:
        0-dim tensor; a zero tensor on ``p_own``'s device when ``p_others`` is empty.
    """
    if len(p_others) == 0:
        return torch.zeros((), device=p_own.device, dtype=p_own.dtype)
    cosines = [F.cosine_similarity(p_own, p_b.detach().to(p_own.dtype), dim=1, eps=1e-8).mean() for p_b in p_others]
    return torch.stack(cosines).mean()


def supcon_loss(z: Tensor, y: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out" form).

    For anchor i with positives P(i) (other samples of the same label):
    L_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ).
    The loss is the mean of L_i over anchors that have at least one positive. ``z``
    is L2-normalised here (a no-op for already normalised projections).

    Args:
        z: B×D projections.
        y: B class indices.
        temperature: τ > 0.

    Returns:
        0-dim tensor; zero (still attached to ``z``) when no anchor has a positive.

    Raises:
        ValueError: if ``temperature`` is not positive or ``z`` is not B×D.
    """
    if not temperature > 0:
        raise ValueError(f"supcon temperature must be > 0, got {temperature}")
    if z.dim() != 2:
        raise ValueError(f"supcon_loss needs B×D projections, got shape {tuple(z.shape)}")
    zf = F.normalize(_at_least_float32(z), p=2, dim=1, eps=_EPS)
    n = zf.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=zf.device)
    logits = (zf @ zf.t()) / temperature
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y.view(-1, 1) == y.view(1, -1)) & ~self_mask
    num_pos = positives.sum(dim=1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return zf.sum() * 0.0
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / num_pos[has_pos]
    return per_anchor.mean()


def recon_bce(recon: Tensor, target01: Tensor) -> Tensor:
    """Binary cross-entropy of a sigmoid reconstruction against an image in [0, 1].

    Both inputs are cast to float32 (float64 for a float64 ``recon``) and clamped to [0, 1], and
    autocast is disabled for the call, so it is safe inside an autocast region.

    Args:
        recon: B×3×H×W sigmoid output of the InfoPro decoder.
        target01: the de-normalised image, same shape, values in [0, 1].

    Returns:
        0-dim tensor, mean over all elements.
    """
    with torch.autocast(device_type=recon.device.type, enabled=False):
        r = _at_least_float32(recon)
        return F.binary_cross_entropy(r.clamp(0.0, 1.0), target01.to(r.dtype).clamp(0.0, 1.0))


def _at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 (a float64 program keeps float64 precision throughout)."""
    return t if t.dtype == torch.float64 else t.float()


def ensemble_weights(K: int) -> list[float]:
    """Weights of the layerwise ensemble: module k (1-based) gets 2^k / Σ_j 2^j.

    Args:
        K: number of modules, ≥ 1.

    Returns:
        K floats summing to 1, increasing with depth.

    Raises:
        ValueError: if K < 1.
    """
    if K < 1:
        raise ValueError(f"ensemble_weights needs K >= 1, got {K}")
    total = float(sum(2**j for j in range(1, K + 1)))
    return [2**k / total for k in range(1, K + 1)]


def layerwise_ensemble(probs_by_module: Sequence[Sequence[Tensor]]) -> Tensor:
    """Layerwise ensemble prediction (the number the official code reports).

    Within module k the groups' softmax probabilities are averaged; modules are
    weighted by :func:`ensemble_weights` and summed.

    Args:
        probs_by_module: for each module (shallow to deep), the list of its groups'
            B×classes softmax probabilities (already softmaxed, not logits).

    Returns:
        B×classes tensor of ensemble probabilities (rows sum to 1).

    Raises:
        ValueError: if there is no module or a module has no group.
    """
    if len(probs_by_module) == 0 or any(len(groups) == 0 for groups in probs_by_module):
        raise ValueError("layerwise_ensemble needs at least one module and one group per module")
    weights = ensemble_weights(len(probs_by_module))
    total = None
    for w, groups in zip(weights, probs_by_module):
        term = w * torch.stack(list(groups)).mean(dim=0)
        total = term if total is None else total + term
    return total
