"""Training runtime, one step: the executor against hand-written PyTorch, and fused vs unfused.

The hand-written networks below are written the way a researcher would write them
(plain ``nn.Module`` / ``nn.Sequential``), independently of the compiler. The
compiled artifact's initial weights are copied in, one optimisation step is taken
on both sides with the same batch and learning rate, and every parameter and BN
buffer must be bit-for-bit equal afterwards.

Whole training runs (schedules, loss decrease, evaluation): ``tests/runtime/test_runtime_training.py``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from paths import SPECS

SGD = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
ADAM = {"kind": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int = 8, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


# ======================================================================================
# Hand-written reference networks (CIFAR ResNet-32, 1c2f aux head)
# ======================================================================================

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


def resnet32_blocks() -> list[tuple[str, nn.Module]]:
    """The 15 blocks of ResNet-32 as (unit name, block), stages of 16/32/64 channels."""
    out, cin = [], 16
    for s, cout in enumerate((16, 32, 64), start=1):
        for b in range(5):
            out.append((f"s{s}.b{b}", BasicBlock(cin, cout, 2 if (b == 0 and s > 1) else 1)))
            cin = cout
    return out


class ResNet32(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(*[b for _, b in resnet32_blocks()])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu(self.bn1(self.conv1(x)))


class AuxHead1c2f(nn.Module):
    """1c2f: Conv3x3(C→2C, s2, no bias) → BN → ReLU → GAP → Linear(2C→F) → ReLU → Linear(F→classes)."""

    def __init__(self, c: int, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc1 = nn.Linear(2 * c, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, h):
        h = F.relu(self.bn(self.conv(h)))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self.fc2(F.relu(self.fc1(h)))


class PoolLinear(nn.Module):
    def __init__(self, c: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


# ---- name mapping: hand-written state-dict key -> compiled state-dict key -------------

def _block_key(unit: str, rest: str) -> str:
    """Key inside a BasicBlock (conv1, bn2.weight, shortcut.0.weight, ...) → compiled key."""
    base = unit.replace(".", "_")
    rest = rest.replace("shortcut.0.", "shortcut.").replace("shortcut.1.", "shortcut_bn.")
    return f"{base}_{rest}"


def copy_into(hand: nn.Module, compiled: dict[str, torch.Tensor], key_map) -> dict[str, str]:
    """Copy compiled tensors into ``hand`` through ``key_map``; return {hand key: compiled key}."""
    sd = hand.state_dict()
    mapping = {k: key_map(k) for k in sd}
    assert sorted(mapping.values()) == sorted(compiled), (sorted(mapping.values()), sorted(compiled))
    with torch.no_grad():
        for k, ck in mapping.items():
            assert sd[k].shape == compiled[ck].shape, (k, ck)
            sd[k].copy_(compiled[ck])
    return mapping


def assert_equal_states(hand: nn.Module, compiled: dict[str, torch.Tensor], mapping: dict[str, str]) -> None:
    sd = hand.state_dict()
    bad = [f"{k} <-> {ck}: max|diff|={(sd[k].double() - compiled[ck].double()).abs().max().item():.3g}"
           for k, ck in mapping.items() if not torch.equal(sd[k], compiled[ck])]
    assert not bad, "hand-written and compiled differ after one step:\n" + "\n".join(bad)


def partition_state(pm) -> dict[str, torch.Tensor]:
    """A partition's body + aux state (parameters and BN buffers, detached views)."""
    out = {f"body.{k}": v for k, v in pm.body.state_dict().items()}
    out.update({f"aux.{k}": v for k, v in pm.aux.state_dict().items()})
    return out


def resnet_key(k: str) -> str:
    """Hand-written ResNet32 key → compiled e2e partition key."""
    if k.startswith("conv1."):
        return "body.stem." + k[6:]
    if k.startswith("bn1."):
        return "body.stem_bn." + k[4:]
    if k.startswith("fc."):
        return "aux." + k
    m = re.match(r"blocks\.(\d+)\.(.*)", k)
    assert m, k
    unit = resnet32_blocks_names()[int(m.group(1))]
    return "body." + _block_key(unit, m.group(2))


def resnet32_blocks_names() -> list[str]:
    return [f"s{s}.b{b}" for s in (1, 2, 3) for b in range(5)]


# ======================================================================================
# 1. end-to-end: Executor(fused=False) == hand-written ResNet-32, bit for bit
# ======================================================================================

def test_e2e_matches_handwritten_resnet32_bit_for_bit():
    art = compile_spec(SPECS / "resnet32_e2e.yaml")
    assert list(art.modules) == [0]
    pm = art.modules[0]
    net = ResNet32()
    mapping = copy_into(net, partition_state(pm), resnet_key)
    stem0 = pm.body.stem.weight.detach().clone()

    x, y = batch(8)
    lr = 0.05
    ex = Executor(art.plan, art.modules, SGD, {0: CPU}, per_device_optim=False)
    stats = ex.train_step(x, y, lr)

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert torch.equal(stats[0][0], loss.detach())
    assert_equal_states(net, partition_state(pm), mapping)
    # the step really changed something (weights and BN running stats)
    assert not torch.equal(pm.body.stem.weight, stem0)
    assert int(pm.body.stem_bn.num_batches_tracked) == 1


# ======================================================================================
# 2. DGL K=2 (joint final head): two modules, one 1c2f aux head, detach in between
# ======================================================================================

def _dgl_k2_handwritten():
    blocks = resnet32_blocks()
    split = [n for n, _ in blocks].index("s2.b2")  # module 1 = stem .. s2.b1, module 2 = s2.b2 .. s3.b4
    m1 = nn.Sequential(Stem(), *[b for _, b in blocks[:split]])
    m2 = nn.Sequential(*[b for _, b in blocks[split:]])
    names1 = [n for n, _ in blocks[:split]]
    names2 = [n for n, _ in blocks[split:]]
    aux1 = AuxHead1c2f(32)
    cls2 = PoolLinear(64)

    def key1(k: str) -> str:  # keys of nn.ModuleDict(body=m1, aux=aux1)
        part, rest = k.split(".", 1)
        if part == "aux":
            return k
        idx, rest = rest.split(".", 1)
        if idx == "0":
            return "body." + rest.replace("conv1.", "stem.").replace("bn1.", "stem_bn.")
        return "body." + _block_key(names1[int(idx) - 1], rest)

    def key2(k: str) -> str:
        part, rest = k.split(".", 1)
        if part == "aux":
            return k
        idx, rest = rest.split(".", 1)
        return "body." + _block_key(names2[int(idx)], rest)

    return (nn.ModuleDict({"body": m1, "aux": aux1}), key1), (nn.ModuleDict({"body": m2, "aux": cls2}), key2)


def test_dgl_k2_matches_handwritten_bit_for_bit():
    art = compile_spec(SPECS / "resnet32_k2g1.yaml")
    assert [p.name for p in art.plan.partitions] == ["m1.g0", "m2.g0"]
    assert art.plan.final.id == 1
    (mod1, key1), (mod2, key2) = _dgl_k2_handwritten()
    map1 = copy_into(mod1, partition_state(art.modules[0]), key1)
    map2 = copy_into(mod2, partition_state(art.modules[1]), key2)

    x, y = batch(8, seed=1)
    lr = 0.05
    ex = Executor(art.plan, art.modules, SGD, {0: CPU, 1: CPU}, per_device_optim=False)
    stats = ex.train_step(x, y, lr)

    # the researcher's DGL loop: every module trains on the detached output of the previous one
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
            for m in (mod1, mod2)]
    h = x
    losses = []
    for m, opt in zip((mod1, mod2), opts):
        m.train()
        h = m["body"](h.detach())
        loss = F.cross_entropy(m["aux"](h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    assert torch.equal(stats[0][0], losses[0]) and torch.equal(stats[1][0], losses[1])
    assert_equal_states(mod1, partition_state(art.modules[0]), map1)
    assert_equal_states(mod2, partition_state(art.modules[1]), map2)


# ======================================================================================
# 3. fused (one backward + one foreach step per device) == unfused (per partition)
# ======================================================================================

@pytest.fixture(scope="module")
def k2g2():
    """GN-DGL K=2, G=2 with stop-gradient sharing r=1, diversity and a separate 1c2f final head."""
    art = compile_spec(SPECS / "resnet32_k2g2.yaml")
    assert len(art.plan.partitions) == 5
    assert all(len(art.modules[p.id].share_sources) == 1 for p in art.plan.partitions[:4])
    assert all(p.loss.diversity_weight == 0.5 for p in art.plan.partitions[:4])
    return art


def _all_state(modules) -> dict[str, torch.Tensor]:
    return {f"{pid}.{k}": v for pid, m in modules.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
def test_fused_equals_unfused(k2g2, optimizer):
    mods_u = copy.deepcopy(k2g2.modules)
    mods_f = copy.deepcopy(k2g2.modules)
    devices = {p.id: CPU for p in k2g2.plan.partitions}
    ex_u = Executor(k2g2.plan, mods_u, optimizer, devices, per_device_optim=False)
    # the per-device fused step (one backward, one multi-tensor optimizer step) is bit-for-bit the unfused
    # one; sibling fusion reorders float sums and is checked within rounding in tests/runtime/fusion/test_fused.py
    ex_f = Executor(k2g2.plan, mods_f, optimizer, devices, per_device_optim=True, siblings=False)
    assert len(ex_f.optimizers) == 1 and len(ex_u.optimizers) == 5
    for step, lr in enumerate((optimizer["lr"], optimizer["lr"] * 0.5, optimizer["lr"] * 0.25)):
        x, y = batch(8, seed=10 + step)
        su = ex_u.train_step(x, y, lr)
        sf = ex_f.train_step(x, y, lr)
        for pid in su:
            assert torch.equal(su[pid][0], sf[pid][0]), (step, pid, su[pid][0], sf[pid][0])
    a, b = _all_state(mods_u), _all_state(mods_f)
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"fused and unfused differ after 3 steps in {len(bad)} tensors, e.g. {bad[:5]}"
    changed = [k for k, v in _all_state(k2g2.modules).items() if not torch.equal(v, a[k])]
    assert len(changed) > len(a) // 2  # the steps did train


# ======================================================================================
# small explicit-layer GN-DGL spec (3x32x32, matches the synthetic data) for train_artifact
