"""MAN / MAN++ (DESIGN §2.3) against independent computations, in float64.

A 3-module net (stem | block1 | block2, stride 2 with a 1×1 shortcut) with a separate final head; the aux nets
of modules 1 and 2 follow block1 and block2 (U). Checked:

* one step: every partition's loss and every parameter's gradient against a hand-written reference of §2.3
  (LB, EMA, mix, 1c2f / InfoPro head, loss; BatchNorm with batch statistics), for ``mix: sum`` and
  ``mix: learned``; the EMA parameters get no gradient;
* the EMA after N steps equals the closed form m^N·θ₀ + Σ (1−m)·m^{N−1−t}·θ_U(t) from the recorded U weights,
  θ₀ = U's initial parameters (the EMA starts as a copy of U);
* isolation: scaling one partition's loss changes no other partition's gradient, and no loss reaches U's
  parameters through the EMA edge;
* the per-device updater (one backward per stage, one step at the end) equals the per-partition updater,
  and G = 2 with sibling fusion requested (MAN modules fused: ``tests/runtime/fusion/test_man_fused.py``) equals the
  per-partition path;
* the plan: the weight edge (no per-sample bytes, bytes per step in the costs), validation, plan.json
  round trip, refusals; a killed and resumed run ends with the uninterrupted weights; export holds no aux
  net; the sequential schedule and bf16. Distributed == one process: ``tests/distributed/test_man_distributed.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from float_compare import rel, scaled_error
from gndgl_compiler import compile_spec
from gndgl_compiler.api import plan_spec
from gndgl_compiler.errors import PartitionError, SpecError
from gndgl_compiler.export import export_run
from gndgl_compiler.partition.plan import PartitionPlan
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from fused_helpers import CPU, PLAIN, SGD
from man_helpers import INFOPRO, batch, spec
from paths import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")
def executor(art, optimizer=PLAIN, **kw) -> Executor:
    mods = copy.deepcopy(art.modules)
    for m in mods.values():
        m.double()
    return Executor(art.plan, mods, optimizer, {pid: CPU for pid in mods}, **kw)


# ----------------------------------------------------------------------------------- the reference of §2.3

def bn(x, P, name):
    return F.batch_norm(x, None, None, P[f"{name}.weight"], P[f"{name}.bias"], training=True, eps=1e-5)


def conv(x, P, name, stride, pad):
    return F.conv2d(x, P[f"{name}.weight"], P.get(f"{name}.bias"), stride, pad)


def block(x, P, pre, stride):
    """BasicBlock: conv3×3(stride)-BN-ReLU-conv3×3-BN + (identity | 1×1 conv(stride)-BN), ReLU."""
    h = F.relu(bn(conv(x, P, f"{pre}conv1", stride, 1), P, f"{pre}bn1"))
    h = bn(conv(h, P, f"{pre}conv2", 1, 1), P, f"{pre}bn2")
    sc = bn(conv(x, P, f"{pre}shortcut", stride, 0), P, f"{pre}shortcut_bn") if f"{pre}shortcut.weight" in P else x
    return F.relu(h + sc)


def head_1c2f(y, P, tag=""):
    """Conv3×3(C→2C, stride 2)-BN-ReLU, global pool, Linear-ReLU-Linear."""
    h = F.relu(bn(conv(y, P, f"{tag}conv", 2, 1), P, f"{tag}bn")).mean((2, 3))
    return F.linear(F.relu(F.linear(h, P[f"{tag}fc1.weight"], P[f"{tag}fc1.bias"])),
                    P[f"{tag}fc2.weight"], P[f"{tag}fc2.bias"])


def aux_loss(y, P, labels, x, k, infopro):
    """The module's head on y and its loss (CE, or InfoPro softmax with λ by module index k of 3)."""
    if not infopro:
        return F.cross_entropy(head_1c2f(y, P), labels)
    t = k / 2
    lr, lt = 1.0 + t * (0.5 - 1.0), 0.5 + t * (2.0 - 0.5)
    r = F.interpolate(y, size=(16, 16), mode="bilinear", align_corners=False)
    r = F.relu(bn(conv(r, P, "dec_conv1", 1, 1), P, "dec_bn"))
    r = torch.sigmoid(conv(r, P, "dec_conv2", 1, 1))
    target = x.float().clamp(0, 1).double()  # the executor's image01 (identity de-normalisation)
    return lr * F.binary_cross_entropy(r, target) + lt * F.cross_entropy(head_1c2f(y, P, "cls_"), labels)


def man_y(h, P, U, stride, mix):
    """y = LB(h) + EMA(h) (sum) or s·LB(h) + (2 − s)·EMA(h) (learned); EMA parameters are constants."""
    lb = block(h, {k[3:]: v for k, v in P.items() if k.startswith("lb_")}, f"{U}_", stride)
    ema = block(h, {k[4:]: v.detach() for k, v in P.items() if k.startswith("ema_")}, f"{U}_", stride)
    return lb + ema if mix == "sum" else P["man_mix.s"] * lb + (2 - P["man_mix.s"]) * ema


def reference(mods, x, labels, mix, infopro):
    """Losses and gradients of the 4 partitions, written from DESIGN §2 / §2.3."""
    params = {pid: {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
              for pid, m in mods.items()}
    body = {pid: {k[5:]: v for k, v in P.items() if k.startswith("body.")} for pid, P in params.items()}
    aux = {pid: {k[4:]: v for k, v in P.items() if k.startswith("aux.")} for pid, P in params.items()}
    h0 = F.relu(bn(conv(x, body[0], "conv1", 1, 1), body[0], "bn0"))
    h1 = block(h0.detach(), body[1], "block1_", 1)
    h2 = block(h1.detach(), body[2], "block2_", 2)
    losses = {
        0: aux_loss(man_y(h0, aux[0], "block1", 1, mix), aux[0], labels, x, 0, infopro),
        1: aux_loss(man_y(h1, aux[1], "block2", 2, mix), aux[1], labels, x, 1, infopro),
        2: aux_loss(h2, aux[2], labels, x, 2, infopro),
        3: F.cross_entropy(head_1c2f(h2.detach(), aux[3]), labels),
    }
    grads = {}
    for pid, loss in losses.items():
        live = {k: v for k, v in params[pid].items() if ".ema_" not in k}
        grads[pid] = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
    return losses, grads


@pytest.mark.parametrize("mix,head", [("sum", "1c2f"), ("learned", "1c2f"), ("learned", "infopro")])
def test_one_step_matches_the_reference(mix, head):
    infopro = head == "infopro"
    art = compile_spec(spec(mix, INFOPRO if infopro else "{kind: 1c2f, hidden: 8}"))
    assert [p.man.source if p.man else None for p in art.plan.partitions] == [1, 2, None, None]
    ex = executor(art)
    x, y = batch()
    for m in ex.modules.values():
        m.train()
    _, losses = ex.forward(x, y)
    want_l, want_g = reference(ex.modules, x, y, mix, infopro)
    for pid, loss in losses.items():
        assert rel(loss.detach(), want_l[pid].detach()) <= 1e-12, (pid, float(loss), float(want_l[pid]))
        loss.backward()
    for pid, m in ex.modules.items():
        got = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
        assert got.keys() == want_g[pid].keys(), pid
        err = scaled_error(got, want_g[pid])
        assert err[0] <= 1e-10, (pid, err)
        assert all(p.grad is None for k, p in m.named_parameters() if ".ema_" in k)
    assert any(".ema_" in k for k in dict(ex.modules[0].named_parameters()))


def test_ema_after_n_steps_is_the_closed_form():
    m, steps = 0.9, 6
    art = compile_spec(spec("learned", momentum=m))
    ex = executor(art, SGD)
    links = {pid: ex.modules[pid].part.man for pid in (0, 1)}
    u_of = {pid: {ema: ex.modules[link.source].body.get_submodule(u) for ema, u in link.ema.items()}
            for pid, link in links.items()}

    def u_params(pid):
        return {f"{e}.{k}": p.detach().clone() for e, mod in u_of[pid].items() for k, p in mod.named_parameters()}

    def ema_params(pid):
        return {f"{e}.{k}": ex.modules[pid].aux.get_submodule(e).get_parameter(k).detach().clone()
                for e in u_of[pid] for k, _ in u_of[pid][e].named_parameters()}

    theta0 = {pid: ema_params(pid) for pid in links}
    for pid in links:  # the EMA starts as a copy of U's initial parameters
        assert all(torch.equal(theta0[pid][k], v) for k, v in u_params(pid).items())
    recorded = {pid: [] for pid in links}
    for t in range(steps):
        for pid in links:
            recorded[pid].append(u_params(pid))  # θ_U(t): before step t's update
        x, y = batch(seed=t)
        ex.train_step(x, y, SGD["lr"])
    for pid in links:
        want = {k: m ** steps * v + sum((1 - m) * m ** (steps - 1 - t) * recorded[pid][t][k] for t in range(steps))
                for k, v in theta0[pid].items()}
        assert scaled_error(ema_params(pid), want)[0] <= 1e-13
        assert scaled_error(ema_params(pid), theta0[pid])[0] > 1e-4  # it moved


def test_isolation_including_the_weight_edge():
    art = compile_spec(spec("learned"))
    ex = executor(art)
    x, y = batch()

    def grads(scale_pid: int | None) -> dict:
        for m in ex.modules.values():
            m.zero_grad(set_to_none=True)
        _, losses = ex.forward(x, y)
        sum((3.0 if pid == scale_pid else 1.0) * loss for pid, loss in losses.items()).backward()
        return {pid: {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
                for pid, m in ex.modules.items()}

    base = grads(None)
    for pid in base:
        scaled = grads(pid)
        for other in base:
            if other != pid:
                assert all(torch.equal(scaled[other][k], v) for k, v in base[other].items()), (pid, other)
    # partition 0's loss reaches no parameter of U (partition 1) through its EMA copy
    _, losses = ex.forward(x, y)
    u = [p for p in ex.modules[1].body.parameters()]
    assert u and all(p.requires_grad for p in u)
    assert all(g is None for g in torch.autograd.grad(losses[0], u, allow_unused=True))


def _train(ex, steps):
    for t in range(steps):
        x, y = batch(seed=t)
        ex.train_step(x, y, SGD["lr"])
    return {pid: m.state_dict() for pid, m in ex.modules.items()}


@pytest.mark.parametrize("width", [1, 2])
def test_updaters_and_fusion_request_agree(width):
    art = compile_spec(spec("learned", width=width))
    a = executor(art, SGD, per_device_optim=True, siblings=True)
    b = executor(art, SGD, per_device_optim=False)
    if width == 2:  # MAN modules fuse like the others (tests/runtime/fusion/test_man_fused.py)
        assert [r["fused"] for r in a.fusion] == [True, True, True, False], a.fusion
    sa, sb = _train(a, 5), _train(b, 5)
    for pid in sa:
        assert scaled_error(sa[pid], sb[pid])[0] <= 1e-12, pid


def test_groups_follow_u_of_the_matching_group():
    plan = plan_spec(spec(width=2))
    parts = plan.partitions
    by = {(p.module, p.group): p for p in parts}
    for p in parts:
        if p.man is not None:
            src = parts[p.man.source]
            assert (src.module, src.group) == (p.module + 1, p.group * src.groups // p.groups)
    assert by[(1, 1)].man.source == by[(2, 1)].id
    weight = [e for e in plan.edges if e.kind == "weight"]
    assert sorted((e.src, e.dst) for e in weight) == sorted((p.man.source, p.id) for p in parts if p.man)
    assert all(e.bytes_per_sample == 0 and e.bytes_per_step > 0 for e in weight)
    p0 = by[(1, 0)]
    n_u = sum(n.params for n in parts[p0.man.source].body if n.name in p0.man.ema.values())
    assert p0.costs["weight_bytes_in_per_step"] == 4 * n_u
    assert plan.summary["weight_bytes_per_step"] == sum(e.bytes_per_step for e in weight)
    again = PartitionPlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict() and again.partitions[0].man == p0.man


def test_refusals():
    with pytest.raises(SpecError) as err:
        plan_spec(spec(width=2).replace("share_ratio: 1.0", "share_ratio: 0.5"))
    assert err.value.path == "local.share_ratio" and "share_ratio 1" in str(err.value)
    with pytest.raises(SpecError) as err:
        plan_spec(spec().replace("cuts: {depth: [relu0, block1], width: 1}", "cuts: {depth: 1, width: 1}"))
    assert err.value.path == "local.man" and "one module" in str(err.value)


def test_validation_catches_a_wrong_link():
    from gndgl_compiler.graph.build import build_graph
    from gndgl_compiler.partition.validate import validate_plan
    from gndgl_compiler.spec.load import load_spec

    s = load_spec(spec())
    plan = plan_spec(s)
    og = build_graph(s)
    validate_plan(plan, og)
    bad = PartitionPlan.from_dict(plan.to_dict())
    bad.partitions[0].man = dataclasses.replace(bad.partitions[0].man, source=2)
    with pytest.raises(PartitionError, match="MAN link"):
        validate_plan(bad, og)
    bad = PartitionPlan.from_dict(plan.to_dict())
    bad.edges = [e for e in bad.edges if e.kind != "weight"]
    with pytest.raises(PartitionError, match="weight edges"):
        validate_plan(bad, og)


def test_resume_equals_uninterrupted_and_export_has_no_aux(tmp_path):
    train = "{dataset: synthetic, batch_size: 16, epochs: 2, optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}, seed: 1}"
    art = compile_spec(spec("learned", train=train), out_dir=tmp_path / "art").path
    common = dict(limit_train=64, limit_test=16, checkpoint_every=3, tensorboard=False)
    full = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "full"), **common))
    assert full["complete"] and full["steps"] == 8
    train_artifact(art, TrainOptions(run_dir=str(tmp_path / "part"), max_steps=3, **common))
    resumed = train_artifact(None, TrainOptions(resume=str(tmp_path / "part")))
    assert resumed["complete"] and resumed["steps"] == 8
    wa, wb = load_file(str(tmp_path / "full" / "weights.safetensors")), load_file(
        str(tmp_path / "part" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and any(".ema_" in k for k in wa) and any("man_mix.s" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    export_run(str(tmp_path / "full"), tmp_path / "net.safetensors")
    exported = load_file(str(tmp_path / "net.safetensors"))
    assert exported and not any("ema_" in k or "lb_" in k or "man_mix" in k for k in exported)


SPEC_K = {"resnet32_dgl_man_k8": 8, "resnet32_infopro_man_k8": 8, "resnet32_dgl_man_k16": 16,
          "resnet32_infopro_man_k16": 16, "resnet110_dgl_man_k32": 32, "resnet110_infopro_man_k32": 32,
          "resnet110_dgl_man_k55": 55, "resnet110_infopro_man_k55": 55, "resnet32_gndgl_man_k8g4": 8}


@pytest.mark.parametrize("name", sorted(SPEC_K))
def test_shipped_man_specs(name):
    path = SPECS / "man" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# Reproduces:") and "8.42 %" in text.splitlines()[0]
    assert "epochs: 400" in text and "momentum: 0.995" in text and "lr: 0.8" in text and "nesterov: true" in text
    plan = plan_spec(path)
    assert plan.num_modules == SPEC_K[name]
    local = [p for p in plan.partitions if p.module < plan.num_modules]
    assert local and all(p.man is not None and p.man.momentum == 0.995 for p in local)
    assert all(p.man is None for p in plan.partitions if p.module >= plan.num_modules)


def test_sequential_schedule_and_bf16():
    """Only active partitions take their EMA step; under bf16 autocast the EMA stays float32 and moves."""
    art = compile_spec(spec("learned", width=2))
    mods = copy.deepcopy(art.modules)
    ex = Executor(art.plan, mods, SGD, {pid: CPU for pid in mods}, amp=True)

    def ema(pid):
        link = mods[pid].part.man
        return torch.cat([mods[pid].aux.get_submodule(e).weight.detach().reshape(-1) for e in link.ema
                          if "conv" in e]).clone()

    before = {pid: ema(pid) for pid in (0, 1, 2, 3)}
    x, y = batch()
    losses = ex.train_step(x.float(), y, SGD["lr"], active={0, 1})
    assert set(losses) == {0, 1} and all(torch.isfinite(v[0]) for v in losses.values())
    after = {pid: ema(pid) for pid in before}
    assert all(after[pid].dtype == torch.float32 for pid in after)
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])  # module 2 is not training


@pytest.mark.parametrize("level,heads", [("partitions", False), ("ops", False), ("ops", True)])
def test_viz_draws_the_weight_edges(level, heads):
    from gndgl_compiler.viz.dot import plan_to_dot
    from gndgl_compiler.viz.style import EDGE_STYLES

    plan = plan_spec(spec(width=2))
    dot = plan_to_dot(plan, level=level, heads=heads)
    color = EDGE_STYLES["weight"]["color"]
    drawn = [line for line in dot.splitlines() if "->" in line and color in line and "legend" not in line]
    assert len(drawn) == sum(e.kind == "weight" for e in plan.edges) == 4
    assert "MAN weight edge" in dot and "/step" in dot


def test_costs_count_the_aux_net():
    """Aux-net MACs are in the partition's figures; the EMA unit costs no weight-gradient MACs."""
    man, plain = plan_spec(spec()), plan_spec(spec().replace("  man: {momentum: 0.9, mix: sum}\n", ""))
    for p, q in zip(man.partitions, plain.partitions):
        if p.man is None:
            assert p.costs["fwd_macs"] == q.costs["fwd_macs"]
            continue
        ema = sum(n.macs for n in p.head if n.name in p.man.ema)
        lb = sum(n.macs for n in p.head if n.name in p.man.lb)
        u = sum(n.macs for n in man.partitions[p.man.source].body if n.name in p.man.ema.values())
        assert ema == lb == u > 0
        assert p.costs["head_macs"] > q.costs["head_macs"] + 2 * u - 1  # LB + EMA (+ a head on U's output)
        assert p.costs["bwd_macs"] == 2 * p.costs["fwd_macs"] - ema - sum(n.macs for n in p.body if n.dense_in)
    assert man.summary["training_speedup"] < plain.summary["training_speedup"]
