"""Local losses against straightforward reference computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gndgl_compiler import losses as L


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- reference implementations (loops, float64)


def ref_similarity(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    b = x.shape[0]
    rows = []
    for i in range(b):
        if x.dim() == 4:
            v = torch.stack([x[i, c].flatten().std() for c in range(x.shape[1])])
        else:
            v = x[i].clone()
        v = v - v.mean()
        rows.append(v / v.norm())
    out = torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            out[i, j] = min(1.0, max(-1.0, float(rows[i] @ rows[j])))
    return out


def ref_diversity_probs(logits, y, t):
    out = []
    for i in range(logits.shape[0]):
        e = [math.exp(float(v) / t) for v in logits[i]]
        p = [v / sum(e) for v in e]
        p[int(y[i])] = 0.0
        s = sum(p)
        p = [v / s for v in p]
        n = math.sqrt(sum(v * v for v in p))
        out.append([v / n for v in p])
    return torch.tensor(out, dtype=torch.float64)


def ref_supcon(z, y, tau):
    z = F.normalize(z.double(), dim=1)
    n = z.shape[0]
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and int(y[p]) == int(y[i])]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        li = -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
        losses.append(li)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- tests


def test_cross_entropy_matches_manual(gen):
    logits = torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    manual = -sum(float(torch.log_softmax(logits[i].double(), 0)[y[i]]) for i in range(6)) / 6
    assert L.cross_entropy(logits, y).item() == pytest.approx(manual, rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (7, 6)])
def test_similarity_matrix_matches_loops(gen, shape):
    x = torch.randn(*shape, generator=gen)
    s = L.similarity_matrix(x)
    assert s.shape == (shape[0], shape[0])
    torch.testing.assert_close(s.double(), ref_similarity(x), atol=1e-5, rtol=1e-5)
    assert float(s.max()) <= 1.0 and float(s.min()) >= -1.0


def test_similarity_matrix_of_onehot_is_label_agreement():
    y = torch.tensor([0, 1, 0, 2])
    s = L.similarity_matrix(F.one_hot(y, 3).float())
    same = (y[:, None] == y[None, :])
    assert torch.allclose(s[same], torch.ones(()))
    assert (s[~same] < 0).all()


def test_predsim_loss_matches_formula(gen):
    h = torch.randn(6, 4, 2, 2, generator=gen)
    logits = torch.randn(6, 3, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    beta = 0.7
    sim = ((ref_similarity(h) - ref_similarity(F.one_hot(y, 3).double())) ** 2).mean()
    ce = F.cross_entropy(logits.double(), y)
    expected = beta * sim + (1 - beta) * ce
    assert L.predsim_loss(h, logits, y, 3, beta=beta).item() == pytest.approx(expected.item(), rel=1e-5)


def test_predsim_beta_zero_is_cross_entropy(gen):
    h = torch.randn(6, 4, 2, 2, generator=gen)
    logits = torch.randn(6, 3, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    assert torch.equal(L.predsim_loss(h, logits, y, 3, beta=0.0), L.cross_entropy(logits, y))


def test_diversity_probs_matches_manual(gen):
    logits = torch.randn(5, 4, generator=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    p = L.diversity_probs(logits, y, temperature=3.0)
    torch.testing.assert_close(p.double(), ref_diversity_probs(logits, y, 3.0), atol=1e-6, rtol=1e-5)
    assert torch.all(p[torch.arange(5), y] == 0)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(5))


def test_diversity_penalty_matches_pairwise_cosines(gen):
    y = torch.randint(0, 5, (8,), generator=gen)
    ps = [L.diversity_probs(torch.randn(8, 5, generator=gen), y, 3.0) for _ in range(3)]
    expected = 0.0
    for b in (1, 2):
        cos = [float(ps[0][i] @ ps[b][i]) / (float(ps[0][i].norm()) * float(ps[b][i].norm())) for i in range(8)]
        expected += sum(cos) / 8
    expected /= 2
    assert L.diversity_penalty(ps[0], ps[1:]).item() == pytest.approx(expected, rel=1e-5)


def test_diversity_penalty_gradient_stays_in_own_group(gen):
    y = torch.randint(0, 5, (8,), generator=gen)
    logits = [torch.randn(8, 5, generator=gen, requires_grad=True) for _ in range(3)]
    ps = [L.diversity_probs(lg, y, 3.0) for lg in logits]
    L.diversity_penalty(ps[0], [ps[1], ps[2]]).backward()
    assert logits[0].grad is not None and logits[0].grad.abs().sum() > 0
    assert logits[1].grad is None and logits[2].grad is None


def test_diversity_penalty_empty_is_zero(gen):
    p = torch.rand(4, 3, generator=gen)
    out = L.diversity_penalty(p, [])
    assert out.shape == () and out.item() == 0.0 and out.device == p.device


def test_supcon_matches_loops(gen):
    z = torch.randn(10, 6, generator=gen)
    y = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 1, 4])  # classes 3 and 4 have no positive
    out = L.supcon_loss(F.normalize(z, dim=1), y, temperature=0.07)
    assert out.item() == pytest.approx(ref_supcon(z, y, 0.07), rel=1e-4)


def test_supcon_without_positives_is_zero_and_differentiable(gen):
    z = torch.randn(4, 3, generator=gen, requires_grad=True)
    out = L.supcon_loss(z, torch.arange(4))
    out.backward()
    assert out.item() == 0.0 and z.grad is not None


def test_supcon_gradient_finite(gen):
    z = torch.randn(8, 5, generator=gen, requires_grad=True)
    L.supcon_loss(z, torch.randint(0, 2, (8,), generator=gen)).backward()
    assert torch.isfinite(z.grad).all()


def test_recon_bce_matches_formula_and_autocast(gen):
    recon = torch.sigmoid(torch.randn(2, 3, 4, 4, generator=gen))
    target = torch.rand(2, 3, 4, 4, generator=gen)
    r, t = recon.double(), target.double()
    expected = -(t * torch.log(r) + (1 - t) * torch.log(1 - r)).mean()
    assert L.recon_bce(recon, target).item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.recon_bce(recon.bfloat16(), target)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_ensemble_weights():
    assert L.ensemble_weights(3) == pytest.approx([2 / 14, 4 / 14, 8 / 14])
    assert sum(L.ensemble_weights(16)) == pytest.approx(1.0)
    assert L.ensemble_weights(1) == [1.0]


def test_layerwise_ensemble(gen):
    probs = [[torch.softmax(torch.randn(4, 3, generator=gen), 1) for _ in range(g)] for g in (2, 1, 4)]
    out = L.layerwise_ensemble(probs)
    w = [2 / 14, 4 / 14, 8 / 14]
    expected = sum(wk * sum(groups) / len(groups) for wk, groups in zip(w, probs))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(4))
