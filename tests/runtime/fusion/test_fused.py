"""Sibling fusion: the fused program computes the per-partition losses and gradients.

* float64, one step, every shipped spec: per-partition losses equal to 1e-10 relative, and every
  parameter's gradient (read off a plain SGD step, lr 1, no momentum / decay) to 1e-10 relative;
* 20 steps of SGD-Nesterov: equal weights to 1e-10 in float64; float32, one step: within
  ``F32_RTOL`` (documented tolerance);
* stop-gradient isolation on the fused path: partition g's loss has exactly zero gradient on every
  other partition's parameters, and scaling it changes no other partition's gradient;
* the partitions' parameters, buffers, state_dict names and optimizer layout stay per partition,
  and a run checkpointed with fusion resumes without it (and the other way round).

The reference is the executor's per-partition path (``siblings=False``), which the bit-for-bit
tests of ``test_runtime_handwritten.py`` check against hand-written PyTorch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._python_dispatch
from safetensors.torch import load_file

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from float_compare import flat_error, module_error, rel, scaled_error
from tiny_spec import tiny_spec
from fused_helpers import CPU, F32_RTOL, F64_RTOL, PLAIN, SGD, assert_same_training, batch, executors
from paths import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")


SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_one_step_float64_equal_losses_and_gradients(name):
    art = compile_spec(SPECS / f"{name}.yaml")
    fused, ref = executors(art, PLAIN, torch.float64)
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, dtype=torch.float64)
    sf = fused.train_step(x, y, 1.0, seed=(0, 0))
    sr = ref.train_step(x, y, 1.0, seed=(0, 0))
    assert sf.keys() == sr.keys()
    for pid in sr:
        assert rel(sf[pid][0], sr[pid][0]) <= F64_RTOL, (name, pid, sf[pid][0], sr[pid][0])
        assert (sf[pid][1] is None) == (sr[pid][1] is None)
        if sr[pid][1] is not None:
            assert int(sf[pid][1]) == int(sr[pid][1])
    for pid, m in ref.modules.items():
        got = fused.modules[pid].state_dict()
        assert all(torch.equal(got[k], v) for k, v in m.state_dict().items() if not v.is_floating_point()), pid
    # lr 1, no momentum / decay: the update is minus the gradient (BN running stats: the same rule); each
    # tensor against its partition's whole update (a bias that a BatchNorm follows has a zero gradient)
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, (name, worst)
    fusable = [r for r in fused.fusion if r["fused"]]
    if name in ("resnet32_k8g4", "resnet32_k4g4", "resnet32_k2g2", "resnet32x2_k8g4", "quickstart_fmnist",
                "vit_cifar_k4g4", "vit_tiny_fmnist_k2g2", "vgg6a_g6", "vgg6a_g6_sg_div"):
        assert len(fusable) == len([r for r in fused.fusion if len(r["partitions"]) > 1]) > 0, fused.fusion


@pytest.mark.parametrize("dtype,steps,rtol", [(torch.float64, 20, F64_RTOL), (torch.float32, 1, F32_RTOL)],
                         ids=["float64-20-steps", "float32-1-step"])
def test_steps_give_the_same_weights(dtype, steps, rtol):
    art = compile_spec(SPECS / "resnet32_k2g2.yaml")
    fused, ref = executors(art, SGD, dtype)
    assert [r["fused"] for r in fused.fusion] == [True, True, False]
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    for step in range(steps):
        x, y = batch(art, n=8, seed=step, dtype=dtype)
        lr = SGD["lr"] * (1 - step / 40)
        fused.train_step(x, y, lr)
        ref.train_step(x, y, lr)
    worst = module_error(fused.modules, ref.modules, before)  # the training's updates, not the init they sit on
    assert worst[0] <= rtol, worst


def test_stop_gradient_isolation_on_the_fused_path():
    art = compile_spec(SPECS / "resnet32_k4g4.yaml")
    fused, _ = executors(art, PLAIN, torch.float64)
    stage = 1  # module 2: its input comes from module 1, its heads share all four groups
    fs = fused.fused_stages[stage]
    for m in fs.mods:
        m.train()
    x, y = batch(art, n=4, dtype=torch.float64)
    inp = fused.modules[0].body(x)  # any upstream tensor of the right shape (module 1, group 0 x 4)
    inputs = [inp.detach().requires_grad_(True) for _ in fs.parts[0].inputs]
    leaves = [t.fused for t in fs.tensors if t.grads is not None]
    grads = []
    for g in range(fs.G):
        _, _, losses, _ = fs.forward(inputs, None, y)
        grads.append(torch.autograd.grad(losses[g], leaves + inputs, allow_unused=True))
    for g, gs in enumerate(grads):
        for leaf_grad, _t in zip(gs, [t for t in fs.tensors if t.grads is not None]):
            if leaf_grad is None:
                continue
            rows = leaf_grad.shape[0] // fs.G
            for h in range(fs.G):
                part = leaf_grad.narrow(0, h * rows, rows)
                if h != g:
                    assert torch.count_nonzero(part) == 0, f"loss of group {g} reaches group {h}"
        assert all(gi is None or torch.count_nonzero(gi) == 0 for gi in gs[len(leaves):]), "gradient left the module"
    # scaling one partition's loss changes only that partition's gradient (and scales it)
    scale = torch.ones(fs.G, dtype=torch.float64)
    scale[2] = 3.0
    _, _, losses, _ = fs.forward(inputs, None, y)
    base = torch.autograd.grad(losses.sum(), leaves)
    _, _, losses, _ = fs.forward(inputs, None, y)
    scaled = torch.autograd.grad((losses * scale).sum(), leaves)
    tripled: tuple[dict, dict] = ({}, {})
    for i, (a, b) in enumerate(zip(base, scaled)):
        rows = a.shape[0] // fs.G
        for h in range(fs.G):
            pa, pb = a.narrow(0, h * rows, rows), b.narrow(0, h * rows, rows)
            if h == 2:
                tripled[0][i], tripled[1][i] = pb, 3 * pa
            else:
                assert torch.equal(pa, pb)
    assert scaled_error(*tripled)[0] <= 1e-12  # against the norm of partition 2's whole gradient


def test_parameters_stay_per_partition():
    art = compile_spec(SPECS / "resnet32_k2g2.yaml")
    mods = copy.deepcopy(art.modules)
    names = {pid: [n for n, _ in m.named_parameters()] for pid, m in mods.items()}
    objects = {pid: [id(p) for p in m.parameters()] for pid, m in mods.items()}
    values = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in mods.items()}
    ex = Executor(art.plan, mods, SGD, {pid: CPU for pid in mods}, per_device_optim=True)
    assert "sibling-fused modules: 1, 2" in ex.fusion_summary()
    for pid, m in mods.items():
        assert [n for n, _ in m.named_parameters()] == names[pid]
        assert [id(p) for p in m.parameters()] == objects[pid]
        sd = m.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in values[pid].items())
    groups = ex.optimizers["cpu"].param_groups
    assert [g["pid"] for g in groups] == [p.id for p in art.plan.partitions]
    # moving a module after the executor fused it is caught, not silently trained on stale storage
    mods[0].double()
    with pytest.raises(RuntimeError, match="moved or replaced"):
        ex.train_step(*batch(art), 0.1)


def test_unfusable_modules_are_reported():
    # an unequal split of a ViT: token ops (patch embedding, layer norm over the channels, attention) have
    # no padded form (a layer norm's statistics would read the padded channels)
    art = compile_spec(SPECS / "vit_tiny_fmnist_k2g2.yaml", overrides=["cuts.width=3", "cuts.split=balanced"])
    mods = copy.deepcopy(art.modules)
    ex = Executor(art.plan, mods, SGD, {pid: CPU for pid in mods}, per_device_optim=True)
    multi = [r for r in ex.fusion if len(r["partitions"]) > 1]
    assert multi and not any(r["fused"] for r in multi)
    assert all(r["reason"] for r in multi)
    assert all("unequal split" in r["reason"] and "token op" in r["reason"] for r in multi), multi
    assert "per partition (" in ex.fusion_summary()


TINY = tiny_spec("tiny_fused", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 2
  optimizer: {kind: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  schedule: {kind: cosine, warmup_epochs: 0.5, warmup_start_lr: 0.01}
  augment: null
  seed: 1
  log_every: 2
""")


@pytest.mark.parametrize("first,second", [(True, False), (False, True)], ids=["fused-then-per-partition",
                                                                           "per-partition-then-fused"])
def test_checkpoint_resumes_in_the_other_path(tmp_path, first, second):
    art = compile_spec(TINY, out_dir=tmp_path / "art")
    opts = dict(limit_train=64, limit_test=32, tensorboard=False)
    setups: list[str] = []
    full = train_artifact(art.path, TrainOptions(run_dir=str(tmp_path / "full"), fuse_siblings=second, **opts))
    part = tmp_path / "part"
    train_artifact(art.path, TrainOptions(run_dir=str(part), fuse_siblings=first, max_steps=3,
                                          on_log=lambda r: setups.append(r.get("text", "")) if r["kind"] == "setup"
                                          else None, **opts))
    assert any(("sibling-fused modules: 1" in s) == first for s in setups), setups
    resumed = train_artifact(art.path, TrainOptions(resume=str(part), fuse_siblings=second))
    assert resumed["complete"] and full["complete"]
    wa, wb = load_file(str(part / "weights.safetensors")), load_file(str(tmp_path / "full" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    worst = flat_error(wa, wb)
    assert worst[0] <= F32_RTOL, worst


HEAD_VARIANTS = [("{kind: linear}", 1.0, 0.5, True), ("{kind: mlp-sr}", 1.0, 0.5, True),
                 ("{kind: 1c2f, hidden: 32}", 0.0, 0.5, True), ("{kind: 1c2f, hidden: 32}", 1.0, 0.0, True),
                 ("{kind: 1c2f, hidden: 32}", 0.5, 0.5, True)]


@pytest.mark.parametrize("head,share,diversity,fusable", HEAD_VARIANTS,
                         ids=["linear", "mlp-sr", "r0", "no-diversity", "r0.5"])
def test_head_variants_float64(head, share, diversity, fusable):
    text = tiny_spec("variant", "train:\n  dataset: synthetic\n  batch_size: 8\n")
    text = text.replace("head: {kind: 1c2f, hidden: 32}\n  share_ratio: 1.0", f"head: {head}\n  share_ratio: {share}")
    art = compile_spec(text.replace("weight: 0.5", f"weight: {diversity}"))
    fused, ref = executors(art, PLAIN, torch.float64)
    assert [r["fused"] for r in fused.fusion] == [fusable, fusable, False]
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, dtype=torch.float64)
    sf, sr = fused.train_step(x, y, 1.0), ref.train_step(x, y, 1.0)
    assert max(rel(sf[p][0], sr[p][0]) for p in sr) <= F64_RTOL
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, worst


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: the op behind ``.item()``, ``bool(t)``, ``int(t)`` (a host sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["resnet32_k8g4", "resnet32_k8g1", "resnet32_e2e", "vgg6a_g6", "vit_tiny_fmnist_k2g2"])
@pytest.mark.parametrize("siblings", [True, False], ids=["fused", "per-partition"])
def test_train_step_reads_no_device_scalar(name, siblings):
    """Capture-readiness: a training step (forward, losses, backward, optimizer, metrics) reads no
    tensor value on the host."""
    art = compile_spec(SPECS / f"{name}.yaml")
    mods = copy.deepcopy(art.modules)
    ex = Executor(art.plan, mods, SGD, {pid: CPU for pid in mods}, per_device_optim=True, siblings=siblings)
    x, y = batch(art)
    ex.train_step(x, y, 0.1)
    with _ScalarReads() as reads:
        ex.train_step(x, y, 0.1)
    assert reads.n == 0


def test_dropout_fuses_exactly_float64_20_steps():
    """Dropout under sibling fusion: each group's mask comes from its own partition's generator
    (``runtime/step/streams.py``), so fused and per-partition losses and weights agree over 20 steps."""
    art = compile_spec(SPECS / "vgg6a_g2.yaml", overrides=["local.head.kind=linear", "model.dropout=0.3",
                                                           "model.width=0.25"])
    fused, ref = executors(art, SGD, torch.float64)
    assert fused.random and all(r["fused"] for r in fused.fusion if len(r["partitions"]) > 1), fused.fusion
    assert any(r["fused"] for r in fused.fusion)
    assert_same_training(fused, ref, art, n=4, seed=3)
