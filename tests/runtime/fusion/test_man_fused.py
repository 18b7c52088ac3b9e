"""MAN / MAN++ modules sibling-fused (DESIGN §2.3, ``runtime/fusion/``): the G aux nets of a module — LB unit,
EMA unit (frozen parameters in fused storage), the mix (``add`` for MAN, ``man_mix`` with one s per group for
MAN++), the head — run as one program, and the EMA step moves the fused storage.

Against the per-partition path (an independent program: one GraphModule per partition), in float64:

* every fused module's losses and every parameter's gradient (LB, s, head; none for the EMA unit), for MAN sum
  and MAN++ learned, 1c2f and InfoPro heads, G = 2 and 4;
* the weights after several training steps, EMA units, s and BatchNorm statistics included, G = 1, 2, 4, an
  unequal split fused padded, G changing between modules (the EMA step of a fused module over whole fused
  storages where U's module is fused alike, per partition else), and on a ViT (U a transformer block);
* isolation on the fused path: group g's loss reaches no other group's rows of any fused parameter (the EMA
  unit's storage gets no gradient at all);
* a killed and resumed run with fused MAN modules ends with the uninterrupted weights.
Distributed == one process with fusion on: ``tests/distributed/test_man_distributed.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from float_compare import rel, scaled_error
from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from fused_helpers import PLAIN, SGD
from man_helpers import INFOPRO, batch, spec

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
HEADS = {"1c2f": "{kind: 1c2f, hidden: 8}", "infopro": INFOPRO}
F64 = 1e-12


def pair(art, optimizer):
    """(sibling-fused executor, per-partition executor) on identical float64 copies of the modules."""
    mods = copy.deepcopy(art.modules)
    for m in mods.values():
        m.double()
    ref = copy.deepcopy(mods)
    fused = Executor(art.plan, mods, optimizer, {pid: CPU for pid in mods}, per_device_optim=True, siblings=True)
    plain = Executor(art.plan, ref, optimizer, {pid: CPU for pid in ref}, per_device_optim=False)
    return fused, plain


def bodies(ex, x):
    """Every partition's body output (the fused modules' inputs), from the per-partition modules."""
    h = {-1: x}
    for p in ex.plan.partitions:
        h[p.id] = ex.modules[p.id].body(*[h[i.source].detach() for i in p.inputs])
    return h


@pytest.mark.parametrize("mix,head,width", [("sum", "1c2f", 2), ("learned", "1c2f", 2), ("learned", "infopro", 2),
                                            ("sum", "infopro", 2), ("learned", "1c2f", 4)])
def test_fused_losses_and_gradients_equal_per_partition(mix, head, width):
    art = compile_spec(spec(mix, HEADS[head], width=width))
    fused, plain = pair(art, PLAIN)
    assert [r["fused"] for r in fused.fusion] == [True, True, True, False], fused.fusion
    man = [i for i, fs in fused.fused_stages.items() if fs.parts[0].man is not None]
    assert man == [0, 1]
    x, y = batch()
    for m in list(fused.modules.values()) + list(plain.modules.values()):
        m.train()
    _, want = plain.forward(x, y)
    for loss in want.values():
        loss.backward()
    h = bodies(plain, x)
    for i in man:
        fs = fused.fused_stages[i]
        fs.attach_grads()
        _, _, losses, total = fs.forward([h[s] for s in fused.runners[i].srcs], None, y, fused.env.image01(x))
        total.backward()
        for g, pid in enumerate(fs.pids):
            assert rel(losses[g].detach(), want[pid].detach()) <= F64, (pid, float(losses[g]), float(want[pid]))
            got = {k: p.grad for k, p in fused.modules[pid].named_parameters() if p.requires_grad}
            ref = {k: p.grad for k, p in plain.modules[pid].named_parameters() if p.requires_grad}
            assert got.keys() == ref.keys() and any("lb_" in k for k in got), pid
            assert (mix == "learned") == any("man_mix.s" in k for k in got)
            assert scaled_error(got, ref)[0] <= 1e-10, (pid, scaled_error(got, ref))
            assert all(p.grad is None for k, p in fused.modules[pid].named_parameters() if ".ema_" in k)


@pytest.mark.parametrize("mix,head,width", [("sum", "1c2f", 1), ("learned", "1c2f", 1), ("sum", "1c2f", 2),
                                            ("learned", "1c2f", 2), ("learned", "infopro", 2),
                                            ("learned", "1c2f", 4), ("sum", "infopro", 4)])
def test_fused_training_equals_per_partition(mix, head, width):
    """Weights after 4 steps (momentum SGD, weight decay): bodies, LB, EMA units, s, BatchNorm statistics."""
    art = compile_spec(spec(mix, HEADS[head], width=width, momentum=0.8))
    fused, plain = pair(art, SGD)
    if width > 1:
        assert all(fused.ema.merged.get(tuple(fused.stages[i])) for i in (0, 1))  # the EMA over fused storage
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in plain.modules.items()}
    for t in range(4):
        x, y = batch(seed=t)
        got, want = fused.train_step(x, y, SGD["lr"]), plain.train_step(x, y, SGD["lr"])
        assert max(rel(got[p][0], want[p][0]) for p in want) <= F64, t
    for pid, m in plain.modules.items():
        sf, sp = fused.modules[pid].state_dict(), m.state_dict()
        assert scaled_error(sf, sp)[0] <= F64, (pid, scaled_error(sf, sp))
        moved = [k for k in sp if (".ema_" in k or "man_mix.s" in k) and not torch.equal(sp[k], before[pid][k])]
        if m.part.man is not None:
            assert any(".ema_" in k for k in moved) and (mix == "sum" or any("man_mix.s" in k for k in moved))


@pytest.mark.parametrize("mix", ["sum", "learned"])
def test_unequal_split_fuses_padded(mix):
    """G = 3 over 4 channels (widths 2, 1, 1): LB / EMA units, their own-channel shortcut and s run padded."""
    text = spec(mix, width=3).replace("width: 3}", "width: 3, split: balanced}")
    fused, plain = pair(compile_spec(text), SGD)
    assert [r["fused"] for r in fused.fusion] == [True, True, True, False], fused.fusion
    assert fused.fused_stages[0].padded
    for t in range(3):
        x, y = batch(seed=t)
        got, want = fused.train_step(x, y, SGD["lr"]), plain.train_step(x, y, SGD["lr"])
        assert max(rel(got[p][0], want[p][0]) for p in want) <= F64, t
    for pid, m in plain.modules.items():
        assert scaled_error(fused.modules[pid].state_dict(), m.state_dict())[0] <= F64, pid


@pytest.mark.parametrize("widths,fused_modules,reason", [
    ("[2, 4, 4]", [True, True, True, False], ""),
    ("[4, 2, 2]", [False, True, True, False], "slice lb_block1_add_slice of a head input that is not each head's own"),
])
def test_groups_changing_between_modules(widths, fused_modules, reason):
    """G_k ≠ G_{k+1}: (k, g) follows (k+1, ⌊g·G_{k+1}/G_k⌋). With G_{k+1} > G_k the copied identity shortcut reads
    part of head g's own channels (gathered); with G_{k+1} < G_k it reads a sibling's, so that module runs per
    partition and the step plan says why. Either way the weights equal the per-partition run's."""
    fused, plain = pair(compile_spec(spec("learned", width=2).replace("width: 2}", f"width: {widths}}}")), SGD)
    assert [r["fused"] for r in fused.fusion] == fused_modules, fused.fusion
    assert fused.fusion[0]["reason"].startswith(reason)
    for t in range(3):
        x, y = batch(seed=t)
        fused.train_step(x, y, SGD["lr"]), plain.train_step(x, y, SGD["lr"])
    for pid, m in plain.modules.items():
        assert scaled_error(fused.modules[pid].state_dict(), m.state_dict())[0] <= F64, pid


VIT = """name: tiny_vit_man
model:
  template: vit_tiny
  vit: {dim: 16, depth: 3, heads: 4, patch: 4, mlp_ratio: 2.0, cls: false}
  input_shape: [1, 16, 16]
  num_classes: 10
cuts: {depth: [b0, b1], width: 2}
local:
  head: {kind: token-linear}
  share_ratio: 1.0
  man: {momentum: 0.9, mix: learned}
  final_head: {kind: model, mode: separate}
train: {dataset: synthetic, batch_size: 8}
"""


def test_transformer_blocks_fuse():
    """U a transformer block (LB / EMA copies over the tokens of both groups, man_mix on group-major tokens)."""
    fused, plain = pair(compile_spec(VIT), SGD)
    assert [r["fused"] for r in fused.fusion] == [True, True, True, False], fused.fusion
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
        got, want = fused.train_step(x, y, SGD["lr"]), plain.train_step(x, y, SGD["lr"])
        assert max(rel(got[p][0], want[p][0]) for p in want) <= F64
    for pid, m in plain.modules.items():
        assert scaled_error(fused.modules[pid].state_dict(), m.state_dict())[0] <= F64, pid


def test_fused_path_isolation():
    """Group g's loss reaches only group g's rows of each fused parameter of a MAN module; the EMA storage none."""
    art = compile_spec(spec("learned", width=2))
    fused, plain = pair(art, PLAIN)
    x, y = batch(n=4)
    for m in plain.modules.values():
        m.train()
    h = bodies(plain, x)
    for i in (0, 1):
        fs = fused.fused_stages[i]
        for m in fs.mods:
            m.train()
        live = [t for t in fs.tensors if t.grads is not None]
        frozen = [t for t in fs.tensors if t.fused.requires_grad is False and t.grads is None]
        assert frozen and all(t.fused.grad is None for t in frozen)
        inputs = [h[s] for s in fused.runners[i].srcs]

        def grads(scale: torch.Tensor) -> tuple:
            _, _, losses, _ = fs.forward(inputs, None, y)  # noqa: B023 - evaluated in this iteration
            return torch.autograd.grad((losses * scale).sum(), [t.fused for t in live], allow_unused=True)  # noqa: B023

        def rows(t, a: torch.Tensor, g: int) -> torch.Tensor:
            return a[g] if t.linear else a.narrow(0, g * (a.shape[0] // fs.G), a.shape[0] // fs.G)  # noqa: B023

        base = grads(torch.ones(fs.G, dtype=torch.float64))
        for g in range(fs.G):
            only = torch.zeros(fs.G, dtype=torch.float64)
            only[g] = 1.0
            scaled = torch.ones(fs.G, dtype=torch.float64)
            scaled[g] = 3.0
            for t, a, b, c in zip(live, grads(only), base, grads(scaled)):
                for o in range(fs.G):
                    if o != g:
                        assert a is None or not rows(t, a, o).any(), (i, g, o)
                        assert torch.equal(rows(t, c, o), rows(t, b, o)), (i, g, o)


def test_resume_equals_uninterrupted_with_fusion(tmp_path):
    train = "{dataset: synthetic, batch_size: 16, epochs: 2, optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}, seed: 1}"
    art = compile_spec(spec("learned", width=2, train=train), out_dir=tmp_path / "art").path
    setups: list[str] = []

    def log(rec: dict) -> None:
        if rec["kind"] == "setup":
            setups.append(rec["text"])

    common = dict(limit_train=64, limit_test=16, checkpoint_every=3, tensorboard=False, fuse_siblings=True, on_log=log)
    full = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "full"), **common))
    assert full["complete"] and full["steps"] == 8
    train_artifact(art, TrainOptions(run_dir=str(tmp_path / "part"), max_steps=3, **common))
    resumed = train_artifact(None, TrainOptions(resume=str(tmp_path / "part"), on_log=log))
    assert len(setups) == 3 and all(t.startswith("sibling-fused modules: 1, 2, 3") for t in setups), setups
    assert resumed["complete"] and resumed["steps"] == 8
    wa, wb = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("full", "part"))
    assert wa.keys() == wb.keys() and any(".ema_" in k for k in wa) and any("man_mix.s" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
