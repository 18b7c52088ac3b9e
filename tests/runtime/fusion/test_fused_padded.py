"""Sibling fusion of an unequal (balanced) split, padded (``runtime/fusion/padded.py``), against the per-partition path.

A small VGG-like spec (10 → 4, 3, 3 and 14 → 5, 5, 4 channels, 11 → 4, 4, 3 features in G=3 groups; a flat
module with a batch-normed linear layer, or a convolutional one for InfoPro), float64:

* one step, every head kind and share ratio: per-partition losses and every parameter's gradient to 1e-10;
* 20 steps of SGD-Nesterov with weight decay and dropout: equal weights, and the padded entries of the
  fused storage still exact zeros;
* stop-gradient isolation on the padded fused path;
* state_dict names and shapes as per partition, and a fused run's checkpoint resumes per partition;
* a small unequal-split ResNet (a stride-2 block with a 1×1 conv shortcut, an identity-shortcut block whose
  residual slices are gathered into the padded layout): one step per head kind, 20 steps, isolation; and
  ``resnet32_k8g4`` at ``cuts.width=3``, balanced: every module fuses, one step exact.

The shipped unequal splits (``vgg6a_g6``, ``vgg6a_g6_sg_div``) are checked, one step, in ``test_fused.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.fusion.padded import shortcut_gather
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from float_compare import flat_error, module_error, rel, scaled_error
from fused_helpers import CPU, F32_RTOL, F64_RTOL, PLAIN, SGD, assert_same_training, batch, executors
from paths import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = "train: {dataset: synthetic, batch_size: 8}"


def unequal(head: str = "{kind: 1c2f, hidden: 8}", share: float = 1.0, diversity: float = 0.5,
            dropout: float = 0.0, flat: bool = True, train: str = TRAIN, features: int = 11) -> str:
    """YAML of the small unequal-split spec (K=2 × G=3, split balanced; a model final head)."""
    last = f"{{op: flatten}}\n    - {{op: linear, name: fc1, out: {features}, bias: false}}" if flat \
        else "{op: conv, name: conv3, out: 11}"
    fc = f"    - {last}\n    - {{op: bn}}\n    - {{op: relu}}\n" + ("" if flat else "    - {op: flatten}\n")
    return f"""name: tiny_unequal
model:
  input_shape: [3, 16, 16]
  num_classes: 10
  layers:
    - {{op: conv, name: conv1, out: 10}}
    - {{op: bn}}
    - {{op: relu}}
    - {{op: maxpool, kernel: 2}}
    - {{op: conv, name: conv2, out: 14}}
    - {{op: bn}}
    - {{op: relu}}
    - {{op: dropout, p: {dropout}}}
    - {{op: maxpool, kernel: 2}}
{fc}    - {{op: linear, name: fc, out: 10}}
cuts: {{depth: [conv2], width: 3, split: balanced}}
local:
  head: {head}
  share_ratio: {share}
  diversity: {{weight: {diversity}, temperature: 3.0}}
  final_head: {{kind: model, mode: separate}}
  schedule: parallel
{train}
"""


INFOPRO = "{kind: infopro, variant: softmax, recon_weight: [1.0, 0.5], task_weight: [1.0, 2.0], hidden: 8}"
VARIANTS = {  # id: (head, share_ratio, diversity weight, flat second module (or its width), modules fused)
    "1c2f-r1": ("{kind: 1c2f, hidden: 8}", 1.0, 0.5, True, [True, True]),
    "1c2f-r0.5": ("{kind: 1c2f, hidden: 8}", 0.5, 0.0, True, [True, True]),
    "linear-r0.5": ("{kind: linear}", 0.5, 0.5, True, [True, True]),
    "mlp-sr-r0.5": ("{kind: mlp-sr, hidden: 8}", 0.5, 0.0, True, [True, True]),
    "predsim-r0-flat": ("{kind: predsim, beta: 0.9}", 0.0, 0.5, True, [True, True]),
    "predsim-r1": ("{kind: predsim, beta: 0.99}", 1.0, 0.5, False, [True, True]),
    "predsim-flat-equal": ("{kind: predsim, beta: 0.9}", 0.0, 0.0, 12, [True, True]),  # flat sim used as is
    "infopro-r1": (INFOPRO, 1.0, 0.0, False, [True, True]),
    "infopro-contrast-r0.5": (INFOPRO.replace("softmax", "contrast"), 0.5, 0.0, False, [True, True]),
}


def one_step(art, modules: int = 2, n: int = 4) -> tuple[float, tuple[float, str]]:
    """(worst loss error, (worst gradient error, where)) of one plain SGD step, fused vs per partition;
    every one of the ``modules`` multi-group modules must fuse."""
    fused, ref = executors(art, PLAIN, torch.float64)
    assert [r["fused"] for r in fused.fusion if len(r["partitions"]) > 1] == [True] * modules, fused.fusion
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, n=n, dtype=torch.float64)
    sf, sr = fused.train_step(x, y, 1.0, seed=(0, 0)), ref.train_step(x, y, 1.0, seed=(0, 0))
    loss = max(rel(sf[p][0], sr[p][0]) for p in sr)
    return loss, module_error(fused.modules, ref.modules, before)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_padded_one_step_float64(key):
    head, share, diversity, flat, _ = VARIANTS[key]
    width = {"features": flat} if flat not in (True, False) else {}
    loss, grad = one_step(compile_spec(unequal(head, share, diversity, dropout=0.2, flat=bool(flat), **width)))
    assert loss <= F64_RTOL and grad[0] <= F64_RTOL, (loss, grad)


def padded_entries(fs) -> list[torch.Tensor]:
    """The fused storage's entries outside every partition's block (the padding), of each parameter."""
    out = []
    for t in fs.tensors:
        if t.index is not None and t.grads is not None:
            keep = torch.ones_like(t.fused, dtype=torch.bool)
            for ix in t.index:
                keep[ix] = False
            out.append(t.fused.detach()[keep])
    return out


def assert_padding_untouched(ex) -> None:
    """Every padded entry of every fused stage is still exactly zero."""
    pads = [p for fs in ex.fused_stages.values() for p in padded_entries(fs)]
    assert pads and all(torch.count_nonzero(p) == 0 for p in pads), "a padded weight moved"


def test_padded_steps_give_the_same_weights():
    art = compile_spec(unequal("{kind: 1c2f, hidden: 8}", 0.5, 0.5, dropout=0.2))
    fused, ref = executors(art, SGD, torch.float64)
    assert all(fs.padded for fs in fused.fused_stages.values()) and len(fused.fused_stages) == 2
    assert_same_training(fused, ref, art, n=6, seed=1)
    assert_padding_untouched(fused)


def test_padded_stop_gradient_isolation():
    art = compile_spec(unequal("{kind: predsim, beta: 0.99}", 1.0, 0.5, flat=False))
    fused, _ = executors(art, PLAIN, torch.float64)
    fs = fused.fused_stages[1]  # module 2: inputs from module 1, heads sharing all three groups
    assert fs.padded and fs.widths == [4, 4, 3]  # conv3: 11 channels
    assert_isolated(fs)


def assert_isolated(fs) -> None:
    """Partition g's loss reaches only partition g's block of every fused parameter, never the module's
    inputs, and scaling it changes no other partition's gradient."""
    for m in fs.mods:
        m.train()
    g = torch.Generator().manual_seed(0)
    shapes = [n.shape for n in fs.parts[0].body if n.kind == "input"]
    inputs = [torch.randn(4, *s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]
    y = torch.randint(0, 10, (4,), generator=g)
    live = [t for t in fs.tensors if t.grads is not None]
    leaves = [t.fused for t in live]
    for grp in range(fs.G):
        _, _, losses, _ = fs.forward(inputs, None, y)
        gs = torch.autograd.grad(losses[grp], leaves + inputs, allow_unused=True)
        for leaf_grad in gs[:len(leaves)]:
            rows = leaf_grad.shape[0] // fs.G
            for h in range(fs.G):
                assert h == grp or torch.count_nonzero(leaf_grad.narrow(0, h * rows, rows)) == 0, (grp, h)
        assert all(gi is None or torch.count_nonzero(gi) == 0 for gi in gs[len(leaves):]), "gradient left the module"
    scale = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    base = torch.autograd.grad(fs.forward(inputs, None, y)[2].sum(), leaves)
    scaled = torch.autograd.grad((fs.forward(inputs, None, y)[2] * scale).sum(), leaves)
    tripled: tuple[dict, dict] = ({}, {})
    for i, (t, a, b) in enumerate(zip(live, base, scaled)):
        for h, ix in enumerate(t.index or [None] * fs.G):
            pa, pb = (a.narrow(0, h * (a.shape[0] // fs.G), a.shape[0] // fs.G), b.narrow(0, h * (b.shape[0] // fs.G),
                      b.shape[0] // fs.G)) if ix is None else (a[ix], b[ix])
            if h == 1:
                tripled[0][i], tripled[1][i] = pb, 3 * pa
            else:
                assert torch.equal(pa, pb), h
    assert scaled_error(*tripled)[0] <= 1e-12  # against the norm of partition 1's whole gradient


def test_padded_state_stays_per_partition():
    art = compile_spec(unequal())
    mods = copy.deepcopy(art.modules)
    shapes = {pid: {k: v.shape for k, v in m.state_dict().items()} for pid, m in mods.items()}
    ex = Executor(art.plan, mods, SGD, {pid: CPU for pid in mods}, per_device_optim=True)
    assert "sibling-fused modules: 1, 2" in ex.fusion_summary()
    assert {pid: {k: v.shape for k, v in m.state_dict().items()} for pid, m in mods.items()} == shapes
    ex.train_step(*batch(art), 0.1)
    ref = copy.deepcopy(mods)  # load_state_dict writes in place, through the views into the padded storage
    for m in ref.values():
        for p in m.parameters():
            p.data = p.data.clone().normal_()
    for pid, m in mods.items():
        m.load_state_dict(ref[pid].state_dict())
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref[pid].state_dict().values()))
    assert all(fs.intact() for fs in ex.fused_stages.values())
    assert all(torch.count_nonzero(p) == 0 for fs in ex.fused_stages.values() for p in padded_entries(fs))


def test_padded_checkpoint_resumes_per_partition(tmp_path):
    train = """train:
  dataset: synthetic
  batch_size: 16
  epochs: 2
  optimizer: {kind: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  augment: null
  seed: 1
  log_every: 2"""
    art = compile_spec(unequal(dropout=0.1, train=train), out_dir=tmp_path / "art")
    opts = dict(limit_train=64, limit_test=32, tensorboard=False)
    setups: list[str] = []
    full = train_artifact(art.path, TrainOptions(run_dir=str(tmp_path / "full"), fuse_siblings=False, **opts))
    part = tmp_path / "part"
    train_artifact(art.path, TrainOptions(run_dir=str(part), fuse_siblings=True, max_steps=3, **opts,
                                          on_log=lambda r: setups.append(r.get("text", "")) if r["kind"] == "setup"
                                          else None))
    assert any("sibling-fused modules: 1, 2" in s for s in setups), setups
    resumed = train_artifact(art.path, TrainOptions(resume=str(part), fuse_siblings=False))
    assert resumed["complete"] and full["complete"]
    wa, wb = load_file(str(part / "weights.safetensors")), load_file(str(tmp_path / "full" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wb)
    worst = flat_error(wa, wb)
    assert worst[0] <= F32_RTOL, worst


def residual(head: str = "{kind: 1c2f, hidden: 8}", share: float = 0.5, diversity: float = 0.5) -> str:
    """YAML of a small unequal-split ResNet (K=3 × G=3, split balanced): module 2 is a stride-2 block with a
    1×1 conv shortcut (10 → 14 = 5 + 5 + 4 channels, dense over the shared input), module 3 an identity-shortcut
    block whose residual slices 0..5, 5..10, 10..14 of the shared input (gathered into the padded layout)."""
    return f"""name: tiny_residual_unequal
model:
  input_shape: [3, 16, 16]
  num_classes: 10
  layers:
    - {{op: conv, name: conv1, out: 10}}
    - {{op: bn}}
    - {{op: relu}}
    - {{op: block, name: block1, out: 10}}
    - {{op: block, name: block2, out: 10}}
    - {{op: block, name: block3, out: 14, stride: 2}}
    - {{op: block, name: block4, out: 14}}
    - {{op: adaptive_avgpool, size: 1}}
    - {{op: flatten}}
    - {{op: linear, name: fc, out: 10}}
cuts: {{depth: [block2, block3], width: 3, split: balanced}}
local:
  head: {head}
  share_ratio: {share}
  diversity: {{weight: {diversity}, temperature: 3.0}}
  final_head: {{kind: model, mode: separate}}
  schedule: parallel
{TRAIN}
"""


RESIDUAL = {  # id: (head, share_ratio, diversity weight)
    "1c2f-r0.5": ("{kind: 1c2f, hidden: 8}", 0.5, 0.5),
    "linear-r1": ("{kind: linear}", 1.0, 0.0),
    "predsim-r1": ("{kind: predsim, beta: 0.99}", 1.0, 0.5),
}


@pytest.mark.parametrize("key", list(RESIDUAL))
def test_padded_residual_one_step_float64(key):
    loss, grad = one_step(compile_spec(residual(*RESIDUAL[key])), modules=3)
    assert loss <= F64_RTOL and grad[0] <= F64_RTOL, (loss, grad)


def test_padded_residual_steps_and_isolation():
    art = compile_spec(residual())
    fused, ref = executors(art, SGD, torch.float64)
    slices = [n for fs in fused.fused_stages.values() for n in fs.parts[0].body if n.kind == "slice"]
    assert [fs.widths for fs in fused.fused_stages.values()] == [[4, 3, 3], [5, 5, 4], [5, 5, 4]] and slices
    assert_same_training(fused, ref, art, n=6, seed=1)
    assert_padding_untouched(fused)
    for fs in list(fused.fused_stages.values())[1:]:  # the conv shortcut, the identity slice
        assert_isolated(fs)


def test_shortcut_gather_pads_each_slice_with_zeros():
    x = torch.randn(2, 7, 3, 3, dtype=torch.float64)
    starts, lengths = [4, 0, 2], [3, 2, 1]  # not tiling x: gathered through an index_select
    env = {"x": x}
    shortcut_gather("s", "x", starts, lengths, 7, x.device)(env)
    for g, (s, n) in enumerate(zip(starts, lengths)):
        assert torch.equal(env["s"][:, g * 3:g * 3 + n], x[:, s:s + n])
        assert torch.count_nonzero(env["s"][:, g * 3 + n:(g + 1) * 3]) == 0


def test_resnet32_unequal_split_fuses_every_module():
    art = compile_spec(SPECS / "resnet32_k8g4.yaml", overrides=["cuts.width=3", "cuts.split=balanced"])
    loss, grad = one_step(art, modules=8)
    assert loss <= F64_RTOL and grad[0] <= F64_RTOL, (loss, grad)
