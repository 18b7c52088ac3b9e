"""Codegen against independent references (DESIGN §2, §4).

1. The compiled end-to-end ResNet-32 computes exactly what a hand-written CIFAR
   ResNet-32 ``nn.Module`` computes with the same weights.
2. The G partition bodies of one module, concatenated, equal one dense-first conv
   followed by grouped convolutions (``nn.Conv2d(groups=G)``) built by hand.
3. Gradient isolation: the loss of one partition never changes, and never
   reaches, the gradients of another partition.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gndgl_compiler import compile_spec
from gndgl_compiler.losses import diversity_probs
from gndgl_compiler.partition.plan import IMAGE

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
HEAD_KEYS = ("logits", "sim", "recon", "proj")


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter and BN buffer with seeded random values.

    Freshly initialised BN layers are identities in eval mode (mean 0, var 1, weight
    1, bias 0), which would hide a mis-wired BN; random values do not.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN weight
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


def randomize_artifact(art, seed: int = 0) -> None:
    for pid, m in art.modules.items():
        randomize_(m, seed * 1000 + pid)


def compile_text(text: str):
    return compile_spec(text)


# ----------------------------------------------------------------------------- 1. ResNet-32


class BasicBlock(nn.Module):
    """CIFAR basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.has_shortcut = stride != 1 or c_in != c_out
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = self.shortcut_bn(self.shortcut(x)) if self.has_shortcut else x
        return F.relu(out + sc)


class ResNet32(nn.Module):
    """He et al. (2016) CIFAR ResNet-32, written by hand."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        stages = []
        c_in = 16
        for c, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for j in range(5):
                blocks.append(BasicBlock(c_in, c, stride if j == 0 else 1))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _artifact_key(hand_key: str) -> str:
    """Hand-written ResNet-32 state key -> key in the e2e partition's state dict."""
    parts = hand_key.split(".")
    if parts[0] in ("stem", "stem_bn"):
        return "body." + hand_key
    if parts[0] == "fc":
        return "aux." + hand_key
    assert parts[0] == "stages", hand_key
    s, b, layer, rest = int(parts[1]) + 1, int(parts[2]), parts[3], ".".join(parts[4:])
    return f"body.s{s}_b{b}_{layer}.{rest}"


@pytest.fixture(scope="module")
def e2e_art():
    art = compile_spec(SPECS / "resnet32_e2e.yaml")
    randomize_artifact(art, seed=1)
    return art


def _load_hand_resnet(art) -> ResNet32:
    sd = art.modules[0].state_dict()
    hand = ResNet32()
    mapped = {k: sd[_artifact_key(k)] for k in hand.state_dict()}
    # the mapping is a bijection: no artifact tensor is left over
    assert sorted(_artifact_key(k) for k in hand.state_dict()) == sorted(sd)
    hand.load_state_dict(mapped, strict=True)
    return hand


def test_e2e_plan_is_one_partition(e2e_art):
    plan = e2e_art.plan
    assert len(plan.partitions) == 1
    p = plan.partitions[0]
    assert p.kind == "e2e" and p.name == "e2e"
    assert [i.source for i in p.inputs] == [IMAGE]
    assert e2e_art.summary["training_speedup"] == 1.0
    assert e2e_art.summary["inference_speedup"] == 1.0


def test_resnet32_matches_hand_written_eval(e2e_art):
    hand = _load_hand_resnet(e2e_art).eval()
    net = e2e_art.assembled().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hand(x), net(x)
    assert got.shape == (2, 10)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # parameter counts agree with the analytic cost model and with the paper's ResNet-32
    n_hand = sum(p.numel() for p in hand.parameters())
    assert n_hand == e2e_art.summary["params"] == e2e_art.summary["inference_params"]


def test_resnet32_matches_hand_written_train_mode(e2e_art):
    """Training-mode BN (batch statistics) and the partition's own body+aux agree too."""
    hand = _load_hand_resnet(e2e_art).train()
    part = copy.deepcopy(e2e_art.modules[0]).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = hand(x)
    got = part.aux(part.body(x))["logits"]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 2. groups


class GroupedBlock(nn.Module):
    """A basic block of one module as a single network: the first layers that read the
    module input are dense (``dense=True``), every other conv is ``groups=G``."""

    def __init__(self, c_in: int, c_out: int, stride: int, G: int, dense: bool):
        super().__init__()
        g_in = 1 if dense else G
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False, groups=g_in)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, groups=G)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.has_shortcut = stride != 1 or c_in != c_out
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False, groups=g_in)
            self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = self.shortcut_bn(self.shortcut(x)) if self.has_shortcut else x
        return F.relu(out + sc)


class GroupedResNetModule(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, int, int]], G: int):
        super().__init__()
        self.names = [b[0] for b in blocks]
        self.blocks = nn.ModuleList(GroupedBlock(ci, co, s, G, dense=(i == 0))
                                    for i, (_, ci, co, s) in enumerate(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x

    def artifact_key(self, key: str) -> str:
        _, i, rest = key.split(".", 2)
        layer, param = rest.split(".", 1)
        return f"body.{self.names[int(i)].replace('.', '_')}_{layer}.{param}"


class SmallGroupedModule(nn.Module):
    """Module 2 of the small explicit spec below: dense conv, then grouped layers."""

    def __init__(self, G: int):
        super().__init__()
        self.c2 = nn.Conv2d(8, 16, 3, 1, 1, bias=False)          # dense in
        self.bn2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 5, 1, 2, bias=True, groups=G)
        self.bn3 = nn.BatchNorm2d(16)
        self.b4 = GroupedBlock(16, 32, 2, G, dense=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn2(self.c2(x))), 2)
        x = F.relu(self.bn3(self.c3(x)))
        return self.b4(x)

    @staticmethod
    def artifact_key(key: str) -> str:
        if key.startswith("b4."):
            layer, param = key[3:].split(".", 1)
            return f"body.b4_{layer}.{param}"
        return "body." + key


SMALL_SPEC = """
name: small_groups
model:
  input_shape: [3, 16, 16]
  num_classes: 10
  layers:
    - {{op: conv, name: c1, out: 8}}
    - {{op: bn, name: bn1}}
    - {{op: relu, name: r1}}
    - {{op: conv, name: c2, out: 16}}
    - {{op: bn, name: bn2}}
    - {{op: relu, name: r2}}
    - {{op: maxpool, name: p2}}
    - {{op: conv, name: c3, out: 16, kernel: 5, bias: true}}
    - {{op: bn, name: bn3}}
    - {{op: relu, name: r3}}
    - {{op: block, name: b4, out: 32, stride: 2}}
    - {{op: adaptive_avgpool, name: gap}}
    - {{op: flatten, name: fl}}
    - {{op: linear, name: fc, out: 10}}
cuts: {{depth: [c1], width: {width}}}
local: {{share_ratio: 1.0}}
"""


def _copy_grouped_weights(ref: nn.Module, parts: list, key_of) -> None:
    """Every tensor of the single grouped network is the concatenation (dim 0, in group
    order) of the partitions' tensors: output-channel slice g belongs to group g."""
    sds = [p.state_dict() for p in parts]
    new = {}
    for key, t in ref.state_dict().items():
        akey = key_of(key)
        if key.endswith("num_batches_tracked"):
            new[key] = t
            continue
        pieces = [sd[akey] for sd in sds]
        new[key] = torch.cat(pieces, dim=0)
        assert new[key].shape == t.shape, (key, new[key].shape, t.shape)
    used = {key_of(k) for k in ref.state_dict()}
    for sd in sds:  # nothing of the partitions' bodies is left unmatched
        assert {k for k in sd if k.startswith("body.")} == used
    ref.load_state_dict(new, strict=True)


def _module_bodies_output(art, module: int, x: torch.Tensor) -> torch.Tensor:
    """Run the bodies of ``module`` on ``x`` split into the upstream groups' tensors."""
    plan = art.plan
    parts = [p for p in plan.partitions if p.module == module]
    parts.sort(key=lambda p: p.group)
    outs = []
    for p in parts:
        pieces = []
        for inp in p.inputs:
            start, end = plan.partitions[inp.source].channels
            piece = x[:, start:end]
            assert list(piece.shape[1:]) == inp.shape
            pieces.append(piece)
        outs.append(art.modules[p.id].body(*pieces))
    # groups own consecutive channel slices, in group order
    bounds = [p.channels for p in parts]
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    return torch.cat(outs, dim=1)


RESNET32_K2_MODULE2 = ([(f"s2.b{j}", 32, 32, 1) for j in (2, 3, 4)] + [("s3.b0", 32, 64, 2)]
                       + [(f"s3.b{j}", 64, 64, 1) for j in (1, 2, 3, 4)])
RESNET32_K8_MODULE4 = [("s2.b0", 16, 32, 2), ("s2.b1", 32, 32, 1)]


@pytest.mark.parametrize("G", [2, 4])
def test_resnet32_module2_groups_equal_grouped_conv(G):
    art = compile_text(f"name: g\nmodel: {{template: resnet32}}\ncuts: {{depth: 2, width: {G}}}\n"
                       "local: {share_ratio: 1.0, diversity: {weight: 0.5}}\n")
    randomize_artifact(art, seed=G)
    parts = sorted((p for p in art.plan.partitions if p.module == 2), key=lambda p: p.group)
    assert len(parts) == G
    assert all(p.units == [b[0] for b in RESNET32_K2_MODULE2] for p in parts)
    assert all(len(p.inputs) == G for p in parts)  # one input per upstream group
    ref = GroupedResNetModule(RESNET32_K2_MODULE2, G)
    _copy_grouped_weights(ref, [art.modules[p.id] for p in parts], ref.artifact_key)
    for m in art.modules.values():
        m.eval()
    ref.eval()
    x = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(5))  # module 1's full output
    with torch.no_grad():
        got = _module_bodies_output(art, 2, x)
        want = ref(x)
    assert got.shape == want.shape == (2, 64, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resnet32_dense_shortcut_module_equals_grouped_conv():
    """K=8: module 4 opens with s2.b0, whose 1x1 shortcut also reads the full input."""
    art = compile_text("name: g\nmodel: {template: resnet32}\ncuts: {depth: 8, width: 4}\n")
    randomize_artifact(art, seed=7)
    parts = sorted((p for p in art.plan.partitions if p.module == 4), key=lambda p: p.group)
    assert [len(parts)] + parts[0].units == [4, "s2.b0", "s2.b1"]
    ref = GroupedResNetModule(RESNET32_K8_MODULE4, 4)
    _copy_grouped_weights(ref, [art.modules[p.id] for p in parts], ref.artifact_key)
    for m in art.modules.values():
        m.eval()
    ref.eval()
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = _module_bodies_output(art, 4, x)
        want = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", ["4", "2", "[2, 4]", "[4, 2]"])
def test_small_explicit_spec_groups_equal_grouped_conv(width):
    art = compile_text(SMALL_SPEC.format(width=width))
    G = art.plan.groups[1]
    randomize_artifact(art, seed=11)
    parts = sorted((p for p in art.plan.partitions if p.module == 2), key=lambda p: p.group)
    assert len(parts) == G
    assert len(parts[0].inputs) == art.plan.groups[0]
    ref = SmallGroupedModule(G)
    _copy_grouped_weights(ref, [art.modules[p.id] for p in parts], ref.artifact_key)
    for m in art.modules.values():
        m.eval()
    ref.eval()
    x = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = _module_bodies_output(art, 2, x)
        want = ref(x)
    assert got.shape == (3, 32, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the whole assembled network is the same thing as module 1 then the grouped module
    with torch.no_grad():
        img = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
        m1 = torch.cat([art.modules[p.id].body(img) for p in art.plan.partitions if p.module == 1], dim=1)
        full = art.assembled()(img)
        final = art.plan.final
        want_logits = art.modules[final.id].aux(ref(m1))["logits"]
    torch.testing.assert_close(full, want_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 3. gradients

GRAD_SPECS = {
    "resnet32_k2g2_share_div": ("name: iso\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 2}\n"
                                "local: {share_ratio: 1.0, diversity: {weight: 0.5, temperature: 3.0}}\n"),
    "small_g4_half_share_div": SMALL_SPEC.format(width="[2, 4]").replace(
        "local: {share_ratio: 1.0}", "local: {share_ratio: 0.5, diversity: {weight: 1.0}, head: {hidden: 16}}"),
    "small_predsim": SMALL_SPEC.format(width="2").replace(
        "local: {share_ratio: 1.0}", "local: {share_ratio: 1.0, head: {kind: predsim}, diversity: {weight: 0.3}}"),
    "small_infopro": SMALL_SPEC.format(width="1").replace(
        "local: {share_ratio: 1.0}", "local: {head: {kind: infopro, variant: softmax, hidden: 16}}"),
}


def local_pass(art, x, y, *, detach: bool = True, scale: dict | None = None, extra: dict | None = None):
    """One training-like pass by hand; returns ``{pid: loss}``.

    ``detach=False`` feeds live upstream / sibling tensors so that only the
    detaches inside the generated code stand between partitions.
    """
    plan = art.plan
    sg = (lambda t: t.detach()) if detach else (lambda t: t)
    h = {IMAGE: x}
    for p in plan.partitions:
        h[p.id] = art.modules[p.id].body(*[sg(h[i.source]) for i in p.inputs])
    outs = {}
    for p in plan.partitions:
        shares = [sg(h[s.source][:, :s.channels]) for s in p.shares]
        outs[p.id] = art.modules[p.id].aux(h[p.id], *shares)
    losses = {}
    for p in plan.partitions:
        args = [outs[p.id][k] for k in HEAD_KEYS if k in p.head_outputs] + [y]
        if p.loss.kind == "infopro":
            args.append(x.clamp(0, 1))
        if p.loss.diversity_weight > 0:
            args += [sg(diversity_probs(outs[s]["logits"], y, p.loss.diversity_temperature)) for s in p.siblings]
        loss = art.modules[p.id].loss(*args)
        if scale and p.id in scale:
            loss = loss * scale[p.id]
        if extra and p.id in extra:
            loss = loss + extra[p.id] * h[p.id].pow(2).mean()
        losses[p.id] = loss
    return losses


def _params(art):
    return [(pid, n, q) for pid, m in sorted(art.modules.items()) for n, q in m.named_parameters()]


def _grads(art, loss):
    """``{(pid, name): grad or None}`` of ``loss`` w.r.t. every parameter of every partition."""
    ps = _params(art)
    gs = torch.autograd.grad(loss, [q for _, _, q in ps], retain_graph=True, allow_unused=True)
    return {(pid, n): g for (pid, n, _), g in zip(ps, gs)}


@pytest.fixture(scope="module", params=sorted(GRAD_SPECS))
def grad_setup(request):
    art = compile_text(GRAD_SPECS[request.param])
    for m in art.modules.values():
        m.train()
    shape = art.plan.input_shape
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, *shape, generator=gen)
    y = torch.tensor([0, 1, 1])
    state = {pid: copy.deepcopy(m.state_dict()) for pid, m in art.modules.items()}

    def run(**kw):
        for pid, m in art.modules.items():  # same BN running stats for every run
            m.load_state_dict(state[pid])
        return local_pass(art, x, y, **kw)

    return request.param, art, run


def test_plan_has_sharing_and_diversity(grad_setup):
    name, art, _ = grad_setup
    parts = art.plan.partitions
    if "share" in name:
        assert any(p.shares for p in parts)
        for p in parts:
            for s in p.shares:
                assert s.source in p.siblings
    if "div" in name:
        assert any(p.loss.diversity_weight > 0 for p in parts)
        assert "diversity" in {e.kind for e in art.plan.edges}


def test_every_boundary_input_is_detached_in_generated_code(grad_setup):
    _, art, _ = grad_setup
    for p in art.plan.partitions:
        m = art.modules[p.id]
        body_ph = [n for n in m.body.graph.nodes if n.op == "placeholder"]
        assert len(body_ph) == len(p.inputs)
        for ph in body_ph:
            users = list(ph.users)
            assert len(users) == 1 and users[0].op == "call_method" and users[0].target == "detach", (p.name, ph)
        aux_ph = [n for n in m.aux.graph.nodes if n.op == "placeholder"]
        assert [n.name for n in aux_ph][0] == "h"
        assert len(aux_ph) == 1 + len(p.shares)
        for ph in aux_ph[1:]:
            assert [u.target for u in ph.users] == ["detach"], (p.name, ph)


@pytest.mark.parametrize("detach", [True, False], ids=["detached-inputs", "live-inputs"])
def test_changing_one_loss_leaves_other_gradients_bitwise_equal(grad_setup, detach):
    _, art, run = grad_setup
    base = _grads(art, sum(run(detach=detach).values()))
    pids = sorted(art.modules)
    for pid in pids:  # every partition receives some gradient from its own loss
        assert any(g is not None and g.abs().sum() > 0 for (q, _), g in base.items() if q == pid), pid
    local = [p.id for p in art.plan.partitions if p.kind == "local"]
    for j, kw in ((local[0], {"scale": {local[0]: 3.0}}), (local[-1], {"extra": {local[-1]: 0.7}}),
                  (pids[-1], {"scale": {pids[-1]: 3.0}})):
        now = _grads(art, sum(run(detach=detach, **kw).values()))
        changed = False
        for (pid, n), g in base.items():
            h = now[(pid, n)]
            if pid == j:
                if g is not None and "scale" in kw:
                    torch.testing.assert_close(h, 3.0 * g, rtol=1e-4, atol=1e-6)
                changed = changed or (g is not None and not torch.equal(g, h))
                continue
            assert (g is None) == (h is None), (pid, n)
            if g is not None:
                assert torch.equal(g, h), f"partition {pid} param {n} changed when the loss of {j} changed"
        assert changed, f"changing the loss of partition {j} did not change its own gradients"


@pytest.mark.parametrize("detach", [True, False], ids=["detached-inputs", "live-inputs"])
def test_one_loss_reaches_only_its_own_partition(grad_setup, detach):
    _, art, run = grad_setup
    losses = run(detach=detach)
    for j, loss in losses.items():
        grads = _grads(art, loss)
        assert any(g is not None and g.abs().sum() > 0 for (pid, _), g in grads.items() if pid == j)
        for (pid, n), g in grads.items():
            if pid != j:
                assert g is None or not g.any(), f"loss of partition {j} reached partition {pid} ({n})"


def test_assembled_network_is_the_bodies_and_final_head(grad_setup):
    """The assembled inference graph shares weights with the partitions and skips aux heads."""
    _, art, _ = grad_setup
    net = art.assembled()
    own = {id(t) for m in art.modules.values() for t in m.parameters()}
    assert all(id(t) in own for t in net.parameters())
    aux_ids = {id(t) for p in art.plan.partitions if p.id != art.plan.final.id
               for t in art.modules[p.id].aux.parameters()}
    assert not any(id(t) in aux_ids for t in net.parameters())
    n_params = sum(t.numel() for t in net.parameters())
    assert n_params == art.summary["inference_params"]
