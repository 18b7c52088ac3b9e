"""Training runtime: the executor against hand-written PyTorch, fused vs unfused, schedules,
loss decrease and evaluation.

The hand-written networks below are written the way a researcher would write them
(plain ``nn.Module`` / ``nn.Sequential``), independently of the compiler. The
compiled artifact's initial weights are copied in, one optimisation step is taken
on both sides with the same batch and learning rate, and every parameter and BN
buffer must be bit-for-bit equal afterwards.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.executor import Executor
from gndgl_compiler.runtime.metrics import read_metrics
from gndgl_compiler.runtime.train import TrainOptions, evaluate_run, train_artifact
from tiny_spec import tiny_spec

SGD = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
ADAM = {"kind": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
CPU = torch.device("cpu")
SPECS = Path(__file__).resolve().parents[1] / "specs"


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
    ex = Executor(art.plan, art.modules, SGD, {0: CPU}, fused=False)
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
    ex = Executor(art.plan, art.modules, SGD, {0: CPU, 1: CPU}, fused=False)
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
    ex_u = Executor(k2g2.plan, mods_u, optimizer, devices, fused=False)
    # the per-device fused step (one backward, one multi-tensor optimizer step) is bit-for-bit the unfused
    # one; sibling fusion reorders float sums and is checked within rounding in tests/test_fused.py
    ex_f = Executor(k2g2.plan, mods_f, optimizer, devices, fused=True, siblings=False)
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
# ======================================================================================

TINY = tiny_spec("tiny_gn", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 3
  optimizer: {kind: sgd, lr: 0.2, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  schedule: {kind: cosine, warmup_epochs: 0.25, warmup_start_lr: 0.02}
  augment: null
  seed: 0
  log_every: 4
""", schedule='SCHEDULE')
PARTS = ["m1.g0", "m1.g1", "m2.g0", "m2.g1", "head"]


def tiny_artifact(tmp_path, schedule: str = "parallel"):
    art = compile_spec(TINY.replace("SCHEDULE", schedule), out_dir=tmp_path / f"art-{schedule}")
    assert [p.name for p in art.plan.partitions] == PARTS
    return art.path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short parallel GN-DGL run on synthetic data: 3 epochs x 16 steps of batch 16."""
    tmp = tmp_path_factory.mktemp("run")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_artifact(tiny_artifact(tmp), TrainOptions(run_dir=str(tmp / "run"), limit_train=256,
                                                                  limit_test=64, tensorboard=False))
    finally:
        torch.set_num_threads(old)
    return tmp / "run", summary


# ======================================================================================
# 5. training lowers every partition's local loss
# ======================================================================================

def test_loss_goes_down_for_every_partition(trained_run):
    run, summary = trained_run
    assert summary["complete"] and summary["steps"] == 48 and summary["epochs_done"] == 3
    recs = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert {r["partition"] for r in recs} == set(PARTS)
    for name in PARTS:
        losses = [r["loss"] for r in recs if r["partition"] == name]
        assert len(losses) == 12  # every 4 steps
        assert losses[-1] < 0.9 * losses[0], (name, losses)


# ======================================================================================
# 7. evaluation of a finished run
# ======================================================================================

def test_evaluate_run(trained_run):
    run, summary = trained_run
    ev = evaluate_run(run)
    assert ev["n"] == 64 and ev["source"] == "final weights"
    assert 0.0 <= ev["test_acc"] <= 1.0 and 0.0 <= ev["ensemble_acc"] <= 1.0
    assert set(ev["partition_acc"]) == set(PARTS)
    assert all(0.0 <= a <= 1.0 for a in ev["partition_acc"].values())
    # the final head *is* the test accuracy, and the saved weights reproduce the last epoch's evaluation
    assert ev["test_acc"] == ev["partition_acc"]["head"]
    assert ev["test_acc"] == summary["test_acc"] and ev["ensemble_acc"] == summary["ensemble_acc"]
    last_eval = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    assert last_eval["partition_acc"] == ev["partition_acc"]
    assert ev["test_acc"] > 0.2  # above chance (10 classes) after 3 epochs on the easy synthetic task


# ======================================================================================
# 6. sequential schedule: module by module, earlier modules frozen (weights and BN stats)
# ======================================================================================

def test_sequential_schedule_trains_module_by_module(tmp_path):
    from gndgl_compiler.artifact import read_weights
    from gndgl_compiler.runtime.checkpoint import load_checkpoint
    from gndgl_compiler.runtime.checkpoint_dir import list_checkpoints

    art_dir = tiny_artifact(tmp_path, "sequential")
    init = read_weights(art_dir)
    run = tmp_path / "run"
    summary = train_artifact(art_dir, TrainOptions(run_dir=str(run), epochs=1, limit_train=64, limit_test=32,
                                                   tensorboard=False, keep_checkpoints=100,
                                                   eval_every_epoch=False))
    spe = 4
    assert summary["complete"] and summary["steps"] == 3 * spe  # 3 phases: module 1, module 2, final head
    ckpts = {load_checkpoint(run / "checkpoints", n)[1]["step"]: load_checkpoint(run / "checkpoints", n)[0]
             for n in list_checkpoints(run / "checkpoints")}
    assert {spe, 2 * spe, 3 * spe} <= set(ckpts)
    from safetensors.torch import load_file
    final = load_file(str(run / "weights.safetensors"))
    stages = [init, ckpts[spe], ckpts[2 * spe], ckpts[3 * spe], final]

    def same(a, b, prefix):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys
        return all(torch.equal(a[k], b[k]) for k in keys)

    def moved(a, b, prefix):  # every parameter tensor changed (BN counters included)
        keys = [k for k in a if k.startswith(prefix) and "running" not in k]
        return all(not torch.equal(a[k], b[k]) for k in keys)

    trains = {1: ("m1.",), 2: ("m2.",), 3: ("head.",)}
    for phase in (1, 2, 3):
        before, after = stages[phase - 1], stages[phase]
        for prefix in ("m1.", "m2.", "head."):
            if prefix in trains[phase]:
                assert moved(before, after, prefix), (phase, prefix)
            else:
                assert same(before, after, prefix), f"{prefix} changed during phase {phase}"
    assert same(ckpts[3 * spe], final, "")
    # metrics: each phase logs only its own partitions
    recs = [r for r in read_metrics(run) if r["kind"] == "train"]
    for r in recs:
        phase = (r["step"] - 1) // spe + 1
        assert r["partition"].startswith(trains[phase][0][:-1]), r


# ======================================================================================
# a start that fails on bad input must not leave a run directory behind
# ======================================================================================

def test_failed_start_leaves_no_run_directory(tmp_path):
    from gndgl_compiler.errors import GndglError

    art = tiny_artifact(tmp_path)
    run = tmp_path / "run"
    opts = dict(run_dir=str(run), epochs=1, limit_train=32, limit_test=16, tensorboard=False)
    with pytest.raises(GndglError, match="cuda:3"):
        train_artifact(art, TrainOptions(device="cuda:3", **opts))
    # the user follows the advice of the message and runs the same command on the CPU
    summary = train_artifact(art, TrainOptions(device="cpu", **opts))
    assert summary["complete"]


# ======================================================================================
# a non-finite loss stops the run, names the partition and step, keeps the last good checkpoint
# ======================================================================================

def test_non_finite_loss_stops_naming_partition_and_keeps_good_checkpoint(tmp_path):
    from gndgl_compiler.errors import TrainingError
    from gndgl_compiler.runtime.checkpoint_dir import latest_valid_checkpoint

    art = tiny_artifact(tmp_path)
    run = tmp_path / "run"
    common = dict(run_dir=str(run), limit_train=64, limit_test=16, tensorboard=False, log_every=1)
    # 4 good steps (checkpointed at step 4 by checkpoint_every), then a learning rate that blows up
    train_artifact(art, TrainOptions(max_steps=4, checkpoint_every=4, **common))
    good = latest_valid_checkpoint(run / "checkpoints")
    assert good is not None and good.state["step"] == 4
    cfg = json.loads((run / "run.json").read_text())
    cfg["config"]["optimizer"]["lr"] = 100.0  # the largest a spec allows
    (run / "run.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match=r"partition \S+ has a non-finite loss .*step \d+") as info:
        train_artifact(None, TrainOptions(resume=str(run), max_steps=12))
    assert info.value.exit_code == 1 and "last good checkpoint" in str(info.value)
    after = latest_valid_checkpoint(run / "checkpoints")
    for key, t in after.tensors.items():
        assert torch.isfinite(t.float()).all(), f"a checkpoint holds non-finite {key}"
    from safetensors.torch import load_file
    for key, t in load_file(str(run / "weights.safetensors")).items():  # the weights of the good first part
        assert torch.isfinite(t.float()).all(), f"weights.safetensors holds non-finite {key}"


def test_epochs_override_scales_warmup_and_milestones():
    """--epochs 16 on a 160-epoch recipe with 10 warm-up epochs warms up for 1 epoch (not the whole run);
    multistep milestones move with it; the same length leaves the schedule alone."""
    from gndgl_compiler.runtime.config import new_run_config
    from gndgl_compiler.runtime.optim import lr_at
    from gndgl_compiler.spec.models import Schedule
    cosine = {"epochs": 160, "optimizer": {"lr": 0.8},
              "schedule": {"kind": "cosine", "warmup_epochs": 10, "warmup_start_lr": 0.01}}
    cfg = new_run_config(cosine, TrainOptions(epochs=16)).recipe
    assert cfg.epochs == 16 and cfg.schedule.warmup_epochs == pytest.approx(1.0)
    assert lr_at(10, 10, 0.8, cfg.schedule, 16) == pytest.approx(0.8)  # peak right after one epoch
    assert new_run_config(cosine, TrainOptions(epochs=160)).recipe.schedule == Schedule(**cosine["schedule"])
    multi = {"epochs": 100, "optimizer": {"lr": 0.1}, "schedule": {"kind": "multistep", "milestones": [50, 75]}}
    cfg = new_run_config(multi, TrainOptions(epochs=20)).recipe
    assert cfg.schedule.milestones == pytest.approx([10, 15])
    assert multi["schedule"]["milestones"] == [50, 75]  # the spec's dict is not modified
