"""Hand-written training loops for ResNet-32, the way a researcher writes them (no gndgl).

* ``HandE2E``   — plain end-to-end backprop.
* ``HandDGL``   — DGL: K modules, each trained by its own 1c2f aux head (the last by avgpool + fc)
                  on the detached output of the previous module.
* ``HandAugLocal`` — AugLocal (Ma et al., ICLR 2024) in the style of its official code: a module per unit up to
                  the 13th, each with an aux net of fresh blocks shaped like the later blocks it samples
                  (depth rule, round half to even), the losses summed and one backward over the sum.
* ``HandDGLMAN`` — DGL + MAN (official-code style: LB + EMA of the next first block, one backward).
* ``HandGNDGLMAN`` — GN-DGL + MAN: per group an LB unit and an EMA copy of the group's slice of the next
                  module's first block over ``cat(own live, siblings detached)``, one backward.
* ``HandGNDGL`` — GN-DGL in the style of the paper's official code: per module one network with a
                  dense first conv (and 1x1 shortcut) and ``Conv2d(groups=G)`` after it, G 1c2f heads,
                  head g over ``cat(own slice live, siblings detached)``, cross-entropy + diversity
                  penalty, a separate 1c2f final head on the detached last output.

Each has one SGD-Nesterov optimizer over all its parameters, and ``step(x, y)``, which returns what a
training loop logs and gndgl's ``train_step`` returns too: per head the detached loss and the number of
correct predictions, left on the device (no ``.item()``). The module splits
are those of the specs ``resnet32_k2g2``, ``resnet32_k4g4``, ``resnet32_k8g4`` / ``resnet32_k8g1``,
``auglocal/resnet32_auglocal_d2``,
so the networks have exactly gndgl's parameter counts (the benchmarks check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4
OPT = {"kind": "sgd", "lr": LR, "momentum": MOMENTUM, "nesterov": True, "weight_decay": WD, "betas": (0.9, 0.999)}
NUM_CLASSES = 10

# ResNet-32: 3 stages x 5 blocks: (cin, cout, stride) per block
BLOCKS = [(cin, cout, 2 if (b == 0 and s > 0) else 1)
          for s, (cin0, cout) in enumerate([(16, 16), (16, 32), (32, 64)])
          for b, cin in enumerate([cin0] + [cout] * 4)]
SPLITS = {  # block indices per module, as the specs cut them
    2: [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]],
    4: [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]],
    8: [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14]],
}


def sgd(params):
    # foreach: the multi-tensor step PyTorch uses by default on CUDA (the cheaper choice on a CPU too)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD, foreach=True)


class Block(nn.Module):
    """BasicBlock; with groups G > 1, conv2 (and conv1 and the shortcut unless ``dense``) are grouped convs."""

    def __init__(self, cin, cout, stride=1, groups=1, dense=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False, groups=1 if dense else groups)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False, groups=1 if dense else groups),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def stem():
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())


class Head1c2f(nn.Module):
    """Conv3x3(C→2C, s2) → BN → ReLU → GAP → Linear(2C→128) → ReLU → Linear(128→classes)."""

    def __init__(self, c, hidden=128):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc1 = nn.Linear(2 * c, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, h):
        h = F.relu(self.bn(self.conv(h)))
        return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))))


class PoolFC(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.fc = nn.Linear(c, NUM_CLASSES)

    def forward(self, h):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def ce_backward(out, y):
    """Cross-entropy of ``out`` against ``y``, backpropagated; returns (detached loss, number correct)."""
    loss = F.cross_entropy(out, y)
    loss.backward()
    return loss.detach(), (out.argmax(1) == y).sum()


def opt_step(opt):
    opt.step()
    opt.zero_grad()


def diversity_probs(logits, y, T):
    p = torch.softmax(logits / T, dim=1)
    p = p.masked_fill(F.one_hot(y, p.shape[1]).bool(), 0.0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return F.normalize(p, dim=1, eps=1e-12)


class HandE2E:
    def __init__(self):
        self.net = nn.Sequential(stem(), *[Block(*b) for b in BLOCKS], PoolFC(64)).train()
        self.opt = sgd(self.net.parameters())

    def step(self, x, y):
        stats = [ce_backward(self.net(x), y)]
        opt_step(self.opt)
        return stats

    def modules(self):
        return [self.net]


class HandDGL:
    def __init__(self, K=8):
        self.mods, self.heads = [], []
        for k, idx in enumerate(SPLITS[K]):
            layers = ([stem()] if k == 0 else []) + [Block(*BLOCKS[i]) for i in idx]
            self.mods.append(nn.Sequential(*layers).train())
            c = BLOCKS[idx[-1]][1]
            self.heads.append((PoolFC(c) if k == K - 1 else Head1c2f(c)).train())
        self.opt = sgd([p for m in self.mods + self.heads for p in m.parameters()])

    def step(self, x, y):
        h, stats = x, []
        for body, head in zip(self.mods, self.heads):
            h = body(h.detach())
            stats.append(ce_backward(head(h), y))
        opt_step(self.opt)
        return stats

    def modules(self):
        return self.mods + self.heads


class HandGNDGL:
    def __init__(self, K=8, G=4, div_weight=0.5, T=3.0):
        self.G, self.w, self.T = G, div_weight, T
        self.mods, self.heads = [], []
        for k, idx in enumerate(SPLITS[K]):
            layers = [stem()] if k == 0 else []
            layers += [Block(*BLOCKS[i], groups=G, dense=(k > 0 and j == 0)) for j, i in enumerate(idx)]
            self.mods.append(nn.Sequential(*layers).train())
            self.heads.append(nn.ModuleList([Head1c2f(BLOCKS[idx[-1]][1]) for _ in range(G)]).train())
        self.final = Head1c2f(64).train()
        self.opt = sgd([p for m in self.mods + self.heads + [self.final] for p in m.parameters()])

    def shared_inputs(self, h):
        """Head g's input, sharing r = 1: cat(group g's channels live, its siblings' detached)."""
        groups = h.chunk(self.G, dim=1)
        return [torch.cat([o if j == g else o.detach() for j, o in enumerate(groups)], dim=1) for g in range(self.G)]

    def group_losses(self, logits, y, stats, total=0.0):
        """``total`` plus the G heads' losses (cross-entropy + diversity); each head's (loss, correct) into
        ``stats``."""
        p_hat = [diversity_probs(lg, y, self.T) for lg in logits]
        for g, lg in enumerate(logits):
            cos = [F.cosine_similarity(p_hat[g], p_hat[j].detach(), dim=1).mean() for j in range(self.G) if j != g]
            head_loss = F.cross_entropy(lg, y) + self.w * torch.stack(cos).mean()
            total = total + head_loss
            stats.append((head_loss.detach(), (lg.argmax(1) == y).sum()))
        return total

    def step(self, x, y):
        h, stats = x, []
        for body, heads in zip(self.mods, self.heads):
            h = body(h.detach())
            logits = [head(a) for head, a in zip(heads, self.shared_inputs(h))]
            self.group_losses(logits, y, stats).backward()
        stats.append(ce_backward(self.final(h.detach()), y))
        opt_step(self.opt)
        return stats

    def modules(self):
        return self.mods + self.heads + [self.final]


def auglocal_choice(ends, d=2, tau=0.5, last=15):
    """Per module (cut after unit ``ends[i]``; unit 0 the stem, unit u ≥ 1 block u-1) its depth dᵢ and the sampled
    later units, as the official code computes them."""
    out, n = [], len(ends)
    for i, end in enumerate(ends):
        x = i * tau / (n - 1)
        di = max(1, round(d * (1 - x) + x))
        out.append((di, list(range(end + 1, last + 1)) if di >= last - end
                       else [round(end + m * (last - end) / di) for m in range(1, di + 1)]))
    return out


def unit_size(u):
    """Output width and map size of ResNet-32 unit u (0 the stem) on 32×32 images."""
    return (16, 32) if u == 0 else (BLOCKS[u - 1][1], 32 // (2 ** ((u - 1) // 5)))


class AugAux(nn.Module):
    """Fresh blocks shaped like the sampled units (stride 2 when the map shrinks; width / G), GAP, [BN1d when
    d <= 1], fc."""

    def __init__(self, u, depth, sampled, G=1):
        super().__init__()
        c, size = unit_size(u)
        blocks = []
        for j in sampled:
            cj, sj = unit_size(j)
            cj //= G
            blocks.append(Block(c, cj, 2 if size > sj else 1))
            c, size = cj, (size + 1) // 2 if size > sj else size
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm1d(c) if depth <= 1 else None
        self.fc = nn.Linear(c, NUM_CLASSES)

    def forward(self, h):
        z = torch.flatten(F.adaptive_avg_pool2d(self.blocks(h), 1), 1)
        return self.fc(z if self.bn is None else self.bn(z))


class HandAugLocal:
    def __init__(self, n_cuts=13, d=2, tau=0.5):
        units = [stem()] + [Block(*b) for b in BLOCKS]
        self.mods = [units[i] for i in range(n_cuts)] + [nn.Sequential(*units[n_cuts:])]
        self.heads = [AugAux(i, di, s) for i, (di, s) in enumerate(auglocal_choice(list(range(n_cuts)), d, tau))]
        self.heads.append(PoolFC(64))
        for m in self.mods + self.heads:
            m.train()
        self.opt = sgd([p for m in self.mods + self.heads for p in m.parameters()])

    def step(self, x, y):
        h, total, stats = x, 0.0, []
        for body, head in zip(self.mods, self.heads):
            h = body(h.detach())
            out = head(h)
            loss = F.cross_entropy(out, y)
            total = total + loss
            stats.append((loss.detach(), (out.argmax(1) == y).sum()))
        total.backward()  # the official code: one backward over the summed local losses
        opt_step(self.opt)
        return stats

    def modules(self):
        return self.mods + self.heads


class HandGNDGLAugLocal(HandGNDGL):
    """GN-DGL (K modules × G groups, sharing r = 1, diversity, separate 1c2f final head) with AugLocal aux nets:
    head g of module k is an ``AugAux`` at width / G over ``cat(own live, siblings detached)``; one backward over
    all the summed local losses (AugLocal's official style)."""

    def __init__(self, K=8, G=4, d=2, tau=0.5, div_weight=0.5, T=3.0):
        super().__init__(K, G, div_weight, T)
        ends = [SPLITS[K][k][-1] + 1 for k in range(K)]  # unit index (0 the stem) that ends module k
        self.heads = [nn.ModuleList([AugAux(end, di, s, G) for _ in range(G)]).train()
                      for end, (di, s) in zip(ends, auglocal_choice(ends, d, tau))]
        self.opt = sgd([p for m in self.mods + self.heads + [self.final] for p in m.parameters()])

    def step(self, x, y):
        h, stats, total = x, [], 0.0
        for body, heads in zip(self.mods, self.heads):
            h = body(h.detach())
            logits = [head(a) for head, a in zip(heads, self.shared_inputs(h))]
            total = self.group_losses(logits, y, stats, total)
        out = self.final(h.detach())
        loss = F.cross_entropy(out, y)
        (total + loss).backward()
        stats.append((loss.detach(), (out.argmax(1) == y).sum()))
        opt_step(self.opt)
        return stats


class HandDGLMAN:
    """DGL + MAN in the style of MAN's official code: the aux net of module k < K is LB + EMA (a trainable
    block and an EMA copy of the next module's first block, no gradient) and a 1c2f head; one backward over
    the summed local losses, then θ_EMA ← m·θ_EMA + (1−m)·θ_U, then the optimizer step."""

    def __init__(self, K=8, m=0.995):
        import copy

        self.m, self.mods, self.lbs, self.emas, self.heads = m, [], [], [], []
        for k, idx in enumerate(SPLITS[K]):
            layers = ([stem()] if k == 0 else []) + [Block(*BLOCKS[i]) for i in idx]
            self.mods.append(nn.Sequential(*layers).train())
        for k, idx in enumerate(SPLITS[K]):
            if k == K - 1:
                self.heads.append(PoolFC(BLOCKS[idx[-1]][1]).train())
                continue
            u = self.mods[k + 1][0]
            self.lbs.append(Block(*BLOCKS[SPLITS[K][k + 1][0]]).train())
            self.emas.append(copy.deepcopy(u).requires_grad_(False).train())
            self.heads.append(Head1c2f(BLOCKS[SPLITS[K][k + 1][0]][1]).train())
        self.opt = sgd([p for m in self.mods + self.lbs + self.heads for p in m.parameters()])

    def step(self, x, y):
        h, stats, total = x, [], 0.0
        for k, body in enumerate(self.mods):
            h = body(h.detach())
            out = self.heads[k](self.lbs[k](h) + self.emas[k](h)) if k < len(self.lbs) else self.heads[k](h)
            loss = F.cross_entropy(out, y)
            total = total + loss
            stats.append((loss.detach(), (out.argmax(1) == y).sum()))
        total.backward()
        with torch.no_grad():
            for k, ema in enumerate(self.emas):
                e, u = list(ema.parameters()), list(self.mods[k + 1][0].parameters())
                torch._foreach_mul_(e, self.m)
                torch._foreach_add_(e, u, alpha=1 - self.m)
        opt_step(self.opt)
        return stats

    def modules(self):
        return self.mods + self.lbs + self.emas + self.heads


class GroupUnit(nn.Module):
    """Group g's slice of a dense-in grouped ``Block`` (cin → cout/G): its conv1 (and 1×1 shortcut) read all cin
    channels, its identity shortcut is the group's own channels; what MAN's LB and EMA copy in GN-DGL+MAN."""

    def __init__(self, cin, cout, stride, G, g):
        super().__init__()
        c = cout // G
        self.own = slice(g * c, (g + 1) * c)
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x[:, self.own] if self.shortcut is None else self.shortcut(x)))


class HandGNDGLMAN(HandGNDGL):
    """GN-DGL (K modules × G groups, sharing r = 1, diversity, separate 1c2f final head) + MAN in the style of MAN's
    official code with groups: aux net g of module k < K is LB_g + EMA_g (a trainable ``GroupUnit`` and an EMA copy
    of group g's slice of the next module's first block, no gradient) over ``cat(own live, siblings detached)``,
    then a 1c2f head; one backward over all the summed losses, then per module one EMA step over its G copies
    (θ_EMA ← m·θ_EMA + (1−m)·θ_U, U's rows of group g), then the optimizer step."""

    def __init__(self, K=8, G=4, m=0.995, div_weight=0.5, T=3.0):
        import copy

        super().__init__(K, G, div_weight, T)
        self.m, self.lbs, self.emas = m, [], []
        for k in range(K - 1):
            cin, cout, stride = BLOCKS[SPLITS[K][k + 1][0]]
            self.lbs.append(nn.ModuleList([GroupUnit(cin, cout, stride, G, g) for g in range(G)]).train())
            emas = nn.ModuleList([GroupUnit(cin, cout, stride, G, g) for g in range(G)]).train()
            with torch.no_grad():
                torch._foreach_copy_(list(emas.parameters()), self._u(k, emas))
            self.emas.append(copy.deepcopy(emas).requires_grad_(False))
            self.heads[k] = nn.ModuleList([Head1c2f(cout // G) for _ in range(G)]).train()
        self.opt = sgd([p for m in self.mods + self.lbs + self.heads + [self.final] for p in m.parameters()])

    def _u(self, k, emas):
        """U's parameters (the next module's first block), group g's rows for EMA copy g, in ``emas`` order."""
        u = list(self.mods[k + 1][0].parameters())
        return [p.narrow(0, e.own.start, e.own.stop - e.own.start) for e in emas for p in u]

    def step(self, x, y):
        h, stats, total = x, [], 0.0
        for k, (body, heads) in enumerate(zip(self.mods, self.heads)):
            h = body(h.detach())
            logits = [head(self.lbs[k][g](a) + self.emas[k][g](a) if k < len(self.lbs) else a)
                      for g, (head, a) in enumerate(zip(heads, self.shared_inputs(h)))]
            total = self.group_losses(logits, y, stats, total)
        out = self.final(h.detach())
        loss = F.cross_entropy(out, y)
        (total + loss).backward()
        stats.append((loss.detach(), (out.argmax(1) == y).sum()))
        with torch.no_grad():
            for k, emas in enumerate(self.emas):
                e = list(emas.parameters())
                torch._foreach_mul_(e, self.m)
                torch._foreach_add_(e, self._u(k, emas), alpha=1 - self.m)
        opt_step(self.opt)
        return stats

    def modules(self):
        return self.mods + self.lbs + self.emas + self.heads + [self.final]
