"""Bottleneck and ResNeXt modules cut by depth and width (DESIGN §2.2), trained per partition.

* a width-cut bottleneck module's G partitions together compute dense conv1 + grouped conv2 (groups = G
  for c = 1, c for c ≥ G) + grouped conv3 (groups = G), per-channel BN, a dense (first unit) or grouped
  shortcut — checked in float64 against that network written with plain torch ops;
* every head kind, with sharing and diversity, trains on bottleneck modules (the loss of every
  partition falls on a fixed batch), sibling-fused, and the fused steps equal the per-partition steps
  in float64;
* K = G = 1: one SGD step of gndgl's ResNeXt-50 equals torchvision's, loss and weights;
* ``train.init``: a torchvision state-dict file starts a run (each partition its slice).

The CLI training run of ResNet-50 K=4 G=2 on synthetic 64×64 data is ``test_imagenet_cli.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from gndgl_compiler import compile_spec
from gndgl_compiler.codegen.pretrained import from_torchvision, full_state, load_full_state, to_torchvision
from gndgl_compiler.errors import SpecError
from gndgl_compiler.runtime.step.executor import Executor
from float_compare import module_error, rel, scaled_error

CPU = torch.device("cpu")
PLAIN = {"kind": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
RTOL = 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(template: str, cuts: str = "", local: str = "", width: float = 0.25, size: int = 32, extra: str = "") -> str:
    return (f"name: t\nmodel: {{template: {template}, width: {width}, input_shape: [3, {size}, {size}]}}\n"
            + (f"cuts: {cuts}\n" if cuts else "") + (f"local: {local}\n" if local else "") + extra)


def randomize_bn(modules) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in modules:
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo in ((m.weight, 0.5), (m.running_var, 0.5)):
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + lo)
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)


# ----------------------------------------------------------------------------- width cuts


def _cat(parts, name: str, attr: str) -> torch.Tensor:
    return torch.cat([getattr(getattr(pm.body, name), attr) for pm in parts])


def _bn(h, parts, name):
    return F.batch_norm(h, _cat(parts, name, "running_mean"), _cat(parts, name, "running_var"),
                        _cat(parts, name, "weight"), _cat(parts, name, "bias"), False)


def _conv(h, parts, name, groups):
    m = getattr(parts[0].body, name)
    return F.conv2d(h, _cat(parts, name, "weight"), None, m.stride, m.padding, groups=groups)


def reference_module(x, parts, units: list[str], G: int) -> torch.Tensor:
    """Module k on one device (DESIGN §2.2): dense-in first layers, then grouped convs of the G groups."""
    for i, u in enumerate(units):
        u = u.replace(".", "_")
        dense = 1 if i == 0 else G
        h = F.relu(_bn(_conv(x, parts, f"{u}_conv1", dense), parts, f"{u}_bn1"))
        g2 = G * getattr(parts[0].body, f"{u}_conv2").groups  # G for c = 1, c for c >= G
        h = F.relu(_bn(_conv(h, parts, f"{u}_conv2", g2), parts, f"{u}_bn2"))
        h = _bn(_conv(h, parts, f"{u}_conv3", G), parts, f"{u}_bn3")
        sc = x
        if hasattr(parts[0].body, f"{u}_shortcut"):
            sc = _bn(_conv(x, parts, f"{u}_shortcut", dense), parts, f"{u}_shortcut_bn")
        x = F.relu(h + sc)
    return x


@pytest.mark.parametrize("template,G,groups2", [("resnext50_32x4d", 4, 8), ("resnet50", 2, 1)])
def test_width_cut_module_is_dense_conv1_grouped_conv2_conv3(template, G, groups2):
    art = compile_spec(spec(template, f"{{depth: [s1.b2, s3.b1], width: {G}}}", "{head: {kind: linear}}"))
    plan = art.plan
    mod2 = [p for p in plan.partitions if p.module == 2]
    assert len(mod2) == G and mod2[0].units[0] == "s2.b0" and mod2[0].units[-1] == "s3.b1"
    parts = [art.modules[p.id].double().eval() for p in mod2]
    randomize_bn(m for pm in parts for m in pm.modules())
    ir = {n.name: n for n in mod2[0].body}
    assert ir["s2_b0_conv1"].dense_in and ir["s2_b0_shortcut"].dense_in and not ir["s3_b0_shortcut"].dense_in
    assert ir["s2_b1_conv2"].attrs["groups"] == groups2
    sizes = [n.shape[0] for n in mod2[0].body if n.kind == "input"]  # module 1's groups, concatenated
    _, h, w = [n.shape for n in mod2[0].body if n.kind == "input"][0]
    x = torch.randn(2, sum(sizes), h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        got = torch.cat([pm.body(*x.split(sizes, 1)) for pm in parts], 1)
        want = reference_module(x, parts, mod2[0].units, G)
    assert rel(got, want) <= RTOL


def test_cardinality_g_rule_and_cost():
    from gndgl_compiler.api import plan_spec
    ok = plan_spec(spec("resnext50_32x4d", "{depth: 2, width: 32}", "{head: {kind: linear}}", width=1.0))
    conv2 = [n for n in ok.partitions[0].body if n.name == "s1_b0_conv2"][0]
    assert conv2.attrs["groups"] == 1 and conv2.attrs["in"] == conv2.attrs["out"] == 4  # w = 128: 4 per group
    # G = c: the 32 groups' convs are exactly the uncut grouped conv (same MACs)
    assert conv2.macs * 32 == 128 * 4 * 9 * 8 * 8
    with pytest.raises(SpecError, match=r"G=3 does not divide the cardinality 32.*valid G: 1, 2, 4, 8, 16, 32"):
        compile_spec(spec("resnext50_32x4d", "{depth: 2, width: 3, split: balanced}"))


# ----------------------------------------------------------------------------- heads, per-partition training

HEADS = {
    "1c2f-shared-diversity": "{head: {kind: 1c2f}, share_ratio: 1.0, diversity: {weight: 0.5}}",
    "linear": "{head: {kind: linear}}",
    "mlp-sr-half-shared": "{head: {kind: mlp-sr}, share_ratio: 0.5}",
    "predsim": "{head: {kind: predsim}}",
    "infopro-contrast-shared": "{head: {kind: infopro, variant: contrast}, share_ratio: 1.0}",
    "infopro-softmax-joint": "{head: {kind: infopro, variant: softmax}, final_head: {mode: joint}}",
}


@pytest.mark.parametrize("local", list(HEADS.values()), ids=list(HEADS))
def test_every_head_trains_on_bottleneck_modules_fused_as_per_partition(local):
    """Every head trains on bottleneck modules, sibling-fused (dense conv1, grouped conv2 and conv3 as one
    program); the fused steps equal the per-partition steps in float64 (losses, and each tensor's update
    against its partition's whole update)."""
    width = "[2, 2, 1]" if "joint" in local else "2"
    art = compile_spec(spec("resnet50", f"{{depth: 3, width: {width}}}", local, width=0.125))
    runs = {}
    for siblings in (True, False):
        mods = {pid: m.double() for pid, m in copy.deepcopy(art.modules).items()}
        runs[siblings] = Executor(art.plan, mods, PLAIN, {pid: CPU for pid in mods}, per_device_optim=True,
                                  siblings=siblings)
    ex, ref = runs[True], runs[False]
    grouped = [r for r in ex.fusion if len(r["partitions"]) > 1]
    assert grouped and all(r["fused"] for r in grouped), ex.fusion
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen)
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    first = ex.train_step(x, y, 0.05, seed=(0, 0))
    want = ref.train_step(x, y, 0.05, seed=(0, 0))
    assert max(rel(first[p][0], want[p][0]) for p in want) <= RTOL
    for step in range(1, 5):
        last = ex.train_step(x, y, 0.05, seed=(0, step))
        ref.train_step(x, y, 0.05, seed=(0, step))
    worst = module_error(ex.modules, ref.modules, before)
    assert worst[0] <= RTOL, worst
    assert all(torch.isfinite(last[pid][0]) for pid in last)
    assert sum(float(v[0]) for v in last.values()) < sum(float(v[0]) for v in first.values())
    for pid, m in ex.modules.items():  # every body tensor of every partition was trained (some head tensors get
        # no gradient by design: InfoPro's task head at λ_task = 0, predsim's similarity on a 1×1 map)
        assert all(not torch.equal(before[pid][f"body.{n}"], t) for n, t in m.body.named_parameters()), \
            art.plan.partitions[pid].name


def test_k1g1_sgd_step_equals_torchvision():
    name = "resnext50_32x4d"
    tv = getattr(torchvision.models, name)(weights=None).double().train()
    randomize_bn(tv.modules())
    art = compile_spec(spec(name, width=1.0).replace("width: 1.0,", "num_classes: 1000,"))
    mods = {pid: m.double() for pid, m in art.modules.items()}
    load_full_state(art.plan, mods, from_torchvision(name, tv.state_dict()))
    ex = Executor(art.plan, mods, PLAIN, {pid: CPU for pid in mods}, per_device_optim=True, siblings=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 1000, (4,), generator=gen)
    start = {k: v.clone() for k, v in tv.state_dict().items() if v.is_floating_point()}
    got = ex.train_step(x, y, PLAIN["lr"])
    loss = F.cross_entropy(tv(x), y)
    loss.backward()
    with torch.no_grad():
        for p in tv.parameters():
            p -= PLAIN["lr"] * p.grad
    assert rel(got[0][0], loss.detach()) <= RTOL
    ours = to_torchvision(name, full_state(art.plan, mods))
    want = tv.state_dict()
    assert ours.keys() == want.keys()
    assert all(torch.equal(ours[k], v) for k, v in want.items() if not v.is_floating_point())
    # the step's updates (BN running stats too), each tensor against the norm of the whole update
    worst = scaled_error({k: ours[k] - v for k, v in start.items()}, {k: want[k] - v for k, v in start.items()})
    assert worst[0] <= RTOL, worst


# ----------------------------------------------------------------------------- train.init


def test_train_init_from_a_torchvision_file(tmp_path):
    tv = torchvision.models.resnet18(weights=None).eval()
    randomize_bn(tv.modules())
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    text = spec("resnet18", width=1.0, extra=f"train: {{init: {tmp_path / 'r18.pt'}}}\n")
    art = compile_spec(text.replace("width: 1.0,", "num_classes: 1000,"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(art.assembled().eval()(x), tv(x)) <= 1e-6  # float32, the same kernels
    # a width cut: each partition its slice; a layer that reads its group's slice keeps the diagonal block
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}  # fc: fresh (10 classes)
    from safetensors.torch import save_file
    save_file(sd, tmp_path / "r18_nofc.safetensors")
    cut = compile_spec(spec("resnet18", "{depth: 2, width: 2}", width=1.0,
                            extra=f"train: {{init: {tmp_path / 'r18_nofc.safetensors'}}}\n"))
    g1 = cut.modules[1].body  # m1.g1
    assert torch.equal(g1.stem.weight, sd["conv1.weight"][32:])
    assert torch.equal(g1.s1_b0_conv2.weight, sd["layer1.0.conv2.weight"][32:, 32:])
    assert torch.equal(g1.stem_bn.running_var, sd["bn1.running_var"][32:])
    m2 = cut.modules[2].body  # m2.g0: its first conv reads the full module input
    first = [n for n in cut.plan.partitions[2].body if n.dense_in][0]
    key = to_torchvision("resnet18", {f"{first.source}.weight": 0}).popitem()[0]
    assert torch.equal(getattr(m2, first.name).weight, sd[key][: sd[key].shape[0] // 2])
    with pytest.raises(SpecError, match=r"field 'train.init'.*'fc.weight' has shape \[1000, 512\]"):
        compile_spec(spec("resnet18", width=1.0, extra=f"train: {{init: {tmp_path / 'r18.pt'}}}\n"))


def test_train_init_with_gndgl_names_and_bad_files(tmp_path):
    src = compile_spec(spec("resnet50", "{depth: 2}", "{final_head: {mode: joint}}", width=0.125))
    torch.save(full_state(src.plan, src.modules), tmp_path / "w.pt")
    art = compile_spec(spec("resnet50", "{depth: 3}", "{final_head: {mode: joint}}", width=0.125,
                            extra=f"train: {{init: {tmp_path / 'w.pt'}, seed: 5}}\n"))
    a, b = full_state(src.plan, src.modules), full_state(art.plan, art.modules)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.save({"s9.b0.conv1.weight": torch.zeros(1), **a}, tmp_path / "extra.pt")
    with pytest.raises(SpecError, match="not in this network, e.g. s9.b0.conv1.weight"):
        compile_spec(spec("resnet50", width=0.125, extra=f"train: {{init: {tmp_path / 'extra.pt'}}}\n"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(SpecError, match="cannot read initial weights"):
        compile_spec(spec("resnet50", width=0.125, extra=f"train: {{init: {tmp_path / 'junk.pt'}}}\n"))
    with pytest.raises(SpecError, match="not a torchvision template"):
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pt")
        compile_spec(f"name: t\nmodel: {{template: resnet20}}\ntrain: {{init: {tmp_path / 'tv.pt'}}}\n")
