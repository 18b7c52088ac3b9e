"""AugLocal aux nets (DESIGN §2.3) against independent computations.

* the unit choice of the literature's CIFAR settings (ResNet-32 d=2, ResNet-110 d=3, τ=0.5, a cut after every unit
  up to the 13th / 51st, joint final head) written out as tables, in the §2.3 unit numbering (0 = stem);
* one partition's aux net and loss in float64, written here with plain torch from §2.3 (fresh basic blocks,
  stride 2 and 1×1 conv + BN shortcut where the rule says, GAP, BatchNorm1d only when dᵢ ≤ 1, Linear, CE; G = 2
  with r = 1: the head input is own slice live + sibling detached) against gndgl's loss and gradients;
* isolation: scaling one partition's loss changes no other partition's gradient;
* sibling-fused == per partition in float64 (basic blocks, bottlenecks, transformer blocks; BatchNorm1d and the
  per-token linear shortcut on the shared head input), and isolation on the fused path;
* costs include the aux nets; export and the assembled network exclude them; bottleneck and transformer copies.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

from float_compare import module_error, rel, scaled_error
from gndgl_compiler import compile_spec
from gndgl_compiler.api import plan_spec
from gndgl_compiler.partition.auglocal import aux_depth, choose_units
from gndgl_compiler.viz.dot import plan_to_dot
from fused_helpers import PLAIN, SGD, assert_group_isolation, batch, executors, tiny_vit
from tiny_spec import tiny_spec
from paths import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")
F64_RTOL = 1e-10

# module i ends after unit i; each row: the units its aux net copies (§2.3 numbering; ResNet-32 L = 16, ResNet-110
# L = 55; the stem row is the official code's 8, 15 and 18, 36, 54)
RESNET32_D2 = [(8, 15), (8, 15), (8, 15), (9, 15), (10, 15), (10, 15), (10, 15), (11, 15), (12, 15), (12, 15),
               (12, 15), (13, 15), (14, 15)]
RESNET110_D3 = [
    (18, 36, 54), (19, 36, 54), (19, 37, 54), (20, 37, 54), (21, 37, 54), (21, 38, 54), (22, 38, 54), (23, 38, 54),
    (23, 39, 54), (24, 39, 54), (25, 39, 54), (25, 40, 54), (26, 40, 54), (27, 40, 54), (27, 41, 54), (28, 41, 54),
    (29, 41, 54), (29, 42, 54), (30, 42, 54), (31, 42, 54), (31, 43, 54), (32, 43, 54), (33, 43, 54), (33, 44, 54),
    (34, 44, 54),  # i = 24: d = round(3 − 2·24/100) = 3
    (40, 54), (40, 54), (40, 54),  # i = 25: d = round(2.5) = 2 (half to even); (54 + 25)/2 = 39.5 → 40
    (41, 54), (42, 54), (42, 54), (42, 54), (43, 54), (44, 54), (44, 54), (44, 54), (45, 54), (46, 54), (46, 54),
    (46, 54), (47, 54), (48, 54), (48, 54), (48, 54), (49, 54), (50, 54), (50, 54), (50, 54), (51, 54), (52, 54),
    (52, 54)]


def unit_names(blocks: int) -> list[str]:
    """Body units of a CIFAR ResNet in §2.3 numbering: stem, s1.b0, ..."""
    return ["stem"] + [f"s{s}.b{b}" for s in (1, 2, 3) for b in range(blocks)]


def cifar_spec(template: str, blocks: int, cuts: int, d: int) -> str:
    cut = ", ".join(unit_names(blocks)[:cuts])
    return (f"name: aug\nmodel: {{template: {template}}}\ncuts: {{depth: [{cut}]}}\n"
            f"local: {{head: {{kind: auglocal, depth: {d}, pyramid: 0.5}}, final_head: {{mode: joint}}}}\n")


@pytest.mark.parametrize("template,blocks,cuts,d,table", [("resnet32", 5, 13, 2, RESNET32_D2),
                                                          ("resnet110", 18, 51, 3, RESNET110_D3)])
def test_unit_choice_of_the_cifar_settings(template, blocks, cuts, d, table):
    names = unit_names(blocks)
    assert [tuple(c) for c in choose_units(list(range(cuts)), len(names) - 1, d, 0.5)] == table
    plan = plan_spec(cifar_spec(template, blocks, cuts, d))
    assert plan.num_modules == cuts + 1
    got = [p.aux_units for p in plan.partitions]
    assert got == [[names[j] for j in row] for row in table] + [[]]  # the joint last module keeps its classifier
    first = plan.partitions[0]
    assert [n.kind for n in first.head].count("conv") == 2 * d + 2  # two 3×3 each, two 1×1 shortcuts (16→32→64)
    assert not any(n.kind == "bn" and len(n.shape) == 1 for n in first.head)  # dᵢ ≥ 2: no BatchNorm1d


def test_depth_rule():
    assert [aux_depth(3, 0.5, i, 51) for i in (0, 24, 25, 50)] == [3, 3, 2, 2]
    assert aux_depth(4, 1.0, 4, 5) == 1 and aux_depth(2, 0.0, 7, 9) == 2 and aux_depth(5, 1.0, 0, 1) == 5
    assert aux_depth(1, 1.0, 3, 4) == 1  # never below 1


# ----------------------------------------------------------------------------- float64 reference

def spec_text(depth: int, *, share: float = 1.0, diversity: float = 0.0, deep: bool = True) -> str:
    """The tiny GN-DGL net (conv1 | block1 ‖ block2 [block3]) with auglocal heads."""
    text = tiny_spec("aug", "train:\n  dataset: synthetic\n  batch_size: 8\n", deep=deep)
    return (text.replace("head: {kind: 1c2f, hidden: 32}\n  share_ratio: 1.0",
                         f"head: {{kind: auglocal, depth: {depth}, pyramid: 0.5}}\n  share_ratio: {share}")
            .replace("weight: 0.5", f"weight: {diversity}"))


def bn(x: torch.Tensor, p: dict, key: str) -> torch.Tensor:
    """Training-mode batch norm with batch statistics (biased variance), by hand."""
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{key}.weight"].view(shape) + p[f"{key}.bias"].view(shape)


def fresh_block(x: torch.Tensor, p: dict, tag: str, stride: int) -> torch.Tensor:
    """§2.3's fresh basic block: conv3×3 (stride) BN ReLU conv3×3 BN + (1×1 conv + BN | identity), add, ReLU."""
    h = F.relu(bn(F.conv2d(x, p[f"{tag}conv1.weight"], stride=stride, padding=1), p, f"{tag}bn1"))
    h = bn(F.conv2d(h, p[f"{tag}conv2.weight"], padding=1), p, f"{tag}bn2")
    w = p.get(f"{tag}shortcut.weight")
    sc = x if w is None else bn(F.conv2d(x, w, stride=stride), p, f"{tag}shortcut_bn")
    return F.relu(h + sc)


def reference_loss(h: torch.Tensor, p: dict, y: torch.Tensor, strides: list[int], bn1d: bool) -> torch.Tensor:
    for m, s in enumerate(strides):
        h = fresh_block(h, p, f"aux{m + 1}_", s)
    z = h.mean(dim=(2, 3))
    if bn1d:
        z = bn(z, p, "bn1d")
    return F.cross_entropy(z @ p["fc.weight"].T + p["fc.bias"], y)


@pytest.mark.parametrize("depth,units,strides,bn1d", [(2, ["block2", "block3"], [2, 1], False),
                                                      (1, ["block3"], [2], True)])
def test_aux_net_against_a_float64_reference(depth, units, strides, bn1d):
    """Module 1 (conv1, block1; 8 channels 16×16) of G=2, r=1: its aux net reads cat(own 4 live, sibling 4
    detached); block2/block3 are 16 channels at 8×8, so the first fresh block has stride 2 and a 1×1 shortcut
    (8 → 16/G = 8 channels: the width does not change, the stride does)."""
    art = compile_spec(spec_text(depth))
    mods = {pid: copy.deepcopy(m).double() for pid, m in art.modules.items()}
    part = art.plan.partitions[0]
    assert part.aux_units == units and part.head_kind == "auglocal"
    x, y = batch(art, n=6, dtype=torch.float64)
    h_own, h_sib = mods[0].body(x), mods[1].body(x).detach()
    out = mods[0].aux(h_own, h_sib[:, :part.shares[0].channels])
    loss = mods[0].loss(out["logits"], y)
    params = dict(mods[0].aux.named_parameters())
    want = reference_loss(torch.cat([h_own, h_sib], 1), params, y, strides, bn1d)
    assert ("bn1d.weight" in params) == bn1d
    assert rel(loss.detach(), want.detach()) <= F64_RTOL
    leaves = list(params.values()) + list(mods[0].body.parameters())
    got_g = torch.autograd.grad(loss, leaves, retain_graph=True)
    want_g = torch.autograd.grad(want, leaves)
    names = list(params) + [f"body.{k}" for k, _ in mods[0].body.named_parameters()]
    worst = scaled_error(dict(zip(names, got_g)), dict(zip(names, want_g)))
    assert worst[0] <= F64_RTOL, worst


def test_isolation_one_partitions_loss_changes_no_other_gradient():
    art = compile_spec(spec_text(2, diversity=0.5))
    _, ref = executors(art, PLAIN, torch.float64)
    x, y = batch(art, n=4, dtype=torch.float64)
    plan = art.plan

    def grads(scale: dict) -> dict:
        mods = {pid: copy.deepcopy(m) for pid, m in ref.modules.items()}
        h, out = {}, {}
        for p in plan.partitions:
            h[p.id] = mods[p.id].body(*[(x if i.source < 0 else h[i.source]).detach() for i in p.inputs])
        for p in plan.partitions:
            shares = [h[s.source][:, :s.channels].detach() for s in p.shares]
            out[p.id] = mods[p.id].aux(h[p.id], *shares)
        total = 0
        for p in plan.partitions:
            div = [torch.softmax(out[s]["logits"] / 3.0, 1).detach() for s in p.siblings
                   if p.loss.diversity_weight > 0]
            loss = mods[p.id].loss(out[p.id]["logits"], y, *div) if div else mods[p.id].loss(out[p.id]["logits"], y)
            total = total + scale.get(p.id, 1.0) * loss
        total.backward()
        return {(pid, k): v.grad.clone() for pid, m in mods.items() for k, v in m.named_parameters()
                if v.grad is not None}

    base, scaled = grads({}), grads({1: 3.0})
    for (pid, k), g in base.items():
        if pid == 1:
            assert rel(scaled[pid, k], 3 * g) <= 1e-12, k
        else:
            assert torch.equal(scaled[pid, k], g), (pid, k)


# ----------------------------------------------------------------------------- fused == per partition

@pytest.mark.parametrize("depth,share,diversity", [(2, 1.0, 0.5), (2, 0.5, 0.0), (2, 0.0, 0.5), (1, 1.0, 0.5),
                                                    (1, 0.5, 0.0)])
def test_fused_equals_per_partition_float64(depth, share, diversity):
    """depth 1: module 2's aux net pools the shared head input and BatchNorm1d normalises each head's
    own-live / siblings-detached features (``fusion/unmix.py``)."""
    art = compile_spec(spec_text(depth, share=share, diversity=diversity))
    fused, ref = executors(art, SGD, torch.float64)
    assert [r["fused"] for r in fused.fusion] == [True, True, False], fused.fusion
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    for step in range(5):
        x, y = batch(art, n=4, seed=step, dtype=torch.float64)
        sf, sr = fused.train_step(x, y, SGD["lr"]), ref.train_step(x, y, SGD["lr"])
        assert max(rel(sf[p][0], sr[p][0]) for p in sr) <= F64_RTOL, step
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, worst


def isolation_case(key: str):
    """(artifact, fused stage index, its inputs): module 2 of the conv net at depth 1 (BatchNorm1d on the shared
    head input), module 1 of the ViT at r = 1 (the per-token linear shortcut on the shared head input)."""
    if key == "conv-d1-r0.5":
        return compile_spec(spec_text(1, share=0.5, diversity=0.5)), 1
    return tiny_vit("{kind: auglocal, depth: 1}", 1.0, 0.5), 0


@pytest.mark.parametrize("key", ["conv-d1-r0.5", "vit-d1-r1"])
def test_fused_path_isolation(key):
    """On the sibling-fused path: group g's loss reaches no other group's rows of any fused parameter and none
    of the module's inputs, and scaling it changes no other group's gradient."""
    art, stage = isolation_case(key)
    fused, _ = executors(art, PLAIN, torch.float64)
    fs = fused.fused_stages[stage]
    for m in fs.mods:
        m.train()
    x, y = batch(art, n=4, dtype=torch.float64)
    src = x if stage == 0 else fused.modules[0].body(x)
    inputs = [src.detach().requires_grad_(True) for _ in fs.parts[0].inputs]
    assert_group_isolation(fs, inputs, y, fused.env.image01(x).double(), check_inputs=stage > 0, skip_unreached=True)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_transformer_aux_units(share):
    """Fresh transformer blocks at D/G with H/G heads; with r > 0 the head input is wider than D/G, so the first
    fresh block has a per-token linear shortcut, which the fused path runs on each head's own-live /
    siblings-detached channels; the last module's aux net pools the shared input itself."""
    art = tiny_vit("{kind: auglocal, depth: 1}", share, 0.0)
    first = art.plan.partitions[0]
    assert first.aux_units == ["b1"]
    kinds = [n.kind for n in first.head]
    assert ("token_linear" in kinds) == (share > 0) and kinds.count("attention") == 1
    attn = next(n for n in first.head if n.kind == "attention")
    assert attn.attrs["out"] == 8 and attn.attrs["heads"] == 2  # D/G, H/G
    fused, ref = executors(art, PLAIN, torch.float64)
    assert [r["fused"] for r in fused.fusion] == [True, True, False], fused.fusion
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, dtype=torch.float64)
    fused.train_step(x, y, 1.0), ref.train_step(x, y, 1.0)
    assert module_error(fused.modules, ref.modules, before)[0] <= F64_RTOL


def test_bottleneck_aux_units():
    text = """name: aug_bneck
model:
  input_shape: [3, 16, 16]
  num_classes: 10
  layers:
    - {op: conv, name: stem, out: 16}
    - {op: bn}
    - {op: relu}
    - {op: bottleneck, name: u1, planes: 4}
    - {op: bottleneck, name: u2, planes: 8, stride: 2, cardinality: 2, base_width: 64}
    - {op: adaptive_avgpool, size: 1}
    - {op: flatten}
    - {op: linear, name: fc, out: 10}
cuts: {depth: [stem, u1], width: 2}
local: {head: {kind: auglocal, depth: 2}, share_ratio: 1.0}
train: {dataset: synthetic, batch_size: 8}
"""
    art = compile_spec(text)
    first = art.plan.partitions[0]
    assert first.aux_units == ["u1", "u2"]
    convs = {n.name: n.attrs for n in first.head if n.kind in ("conv", "gconv")}
    assert convs["aux1_conv3"]["out"] == 8 and convs["aux2_conv3"]["out"] == 16  # 4p / G
    assert convs["aux2_conv2"]["stride"] == 2 and convs["aux2_conv2"].get("groups", 1) == 1  # cardinality 2 / G
    assert convs["aux1_conv1"]["in"] == 16  # the shared input: all of the module output
    fused, ref = executors(art, PLAIN, torch.float64)
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, dtype=torch.float64)
    fused.train_step(x, y, 1.0), ref.train_step(x, y, 1.0)
    assert module_error(fused.modules, ref.modules, before)[0] <= F64_RTOL


# ----------------------------------------------------------------------------- costs, export

def test_costs_count_the_aux_net_and_inference_excludes_it():
    art = compile_spec(spec_text(2))
    first = art.plan.partitions[0]
    assert first.costs["head_macs"] == sum(n.macs for n in first.head) > 0
    assert first.costs["params"] == sum(n.params for n in first.body + first.head)
    assert first.costs["act_bytes"] > 0 and art.plan.summary["max_partition_macs"] >= first.costs["fwd_macs"]
    net = art.assembled()
    assert not any("aux1" in k for k in net.state_dict())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plan = art.plan.to_dict()
    assert plan["partitions"][0]["aux_units"] == ["block2", "block3"] and "aux_units" not in plan["partitions"][-1]
    for level in ("ops", "partitions"):  # gndgl viz names the copied units
        assert "auglocal ← block2, block3" in plan_to_dot(art.plan, level=level)


# ----------------------------------------------------------------------------- shipped specs

AUGLOCAL_SPECS = sorted((SPECS / "auglocal").glob("*.yaml"))
CHOICE = {"resnet32_auglocal_d2": (5, RESNET32_D2), "resnet110_auglocal_d3": (18, RESNET110_D3)}


@pytest.mark.parametrize("path", AUGLOCAL_SPECS, ids=lambda p: p.stem)
def test_shipped_specs_compile_and_follow_the_tables(path):
    """Each spec under ``specs/auglocal/`` says what it reproduces, compiles (codegen included), uses the issue's
    recipe, and the CIFAR settings choose the units of the tables above."""
    assert path.read_text().startswith("# Reproduces:")
    art = compile_spec(path)
    train = art.spec["train"]
    assert (train["epochs"], train["batch_size"], train["optimizer"]["lr"], train["optimizer"]["nesterov"],
            train["optimizer"]["weight_decay"], train["schedule"]["warmup_epochs"]) == (400, 1024, 0.8, True,
                                                                                     1e-4, 10)
    assert art.spec["local"]["head"]["kind"] == "auglocal"
    if path.stem in CHOICE:
        blocks, table = CHOICE[path.stem]
        names = unit_names(blocks)
        assert [p.aux_units for p in art.plan.partitions] == [[names[j] for j in row] for row in table] + [[]]


@pytest.mark.parametrize("key", ["conv-d2-r1", "vit-d1-r1"])
def test_fused_bf16_step_is_a_bf16_version_of_the_same_step(key):
    """bf16 autocast (``train.amp: bf16``) on the fused path, as ``test_fused_bf16.py`` checks the other heads:
    fused and per-partition bf16 updates agree to bf16's own error against float32."""
    from fused_helpers import LOSS_RTOL, UPDATE_RTOL, bf16_steps, partition_errors

    art = (compile_spec(spec_text(2, diversity=0.5)) if key.startswith("conv")
           else tiny_vit("{kind: auglocal, depth: 1}", 1.0, 0.5))
    (s_fused, u_fused, fused), (s_ref, u_ref, _), (_, u_f32, _) = bf16_steps(art)
    assert fused and all(fused)
    assert max(rel(s_fused[p][0].float(), s_ref[p][0].float()) for p in s_ref) <= LOSS_RTOL
    diffs = partition_errors(u_fused, u_ref)
    bf16_err = statistics.median(partition_errors(u_ref, u_f32).values())
    assert bf16_err > 1e-4 and max(diffs.values()) <= UPDATE_RTOL, (diffs, bf16_err)
    assert statistics.median(diffs.values()) <= 2 * bf16_err, (statistics.median(diffs.values()), bf16_err)
