"""torchvision's ResNets / ResNeXts as templates (DESIGN §2.2): the same nets, the same MACs.

* every template at K = G = 1, given torchvision's weights through ``from_torchvision``, computes
  torchvision's logits in float64 to 1e-10 relative (to the norm of the whole logits tensor) at 64²,
  and resnet18 / resnet50 at 224²;
* ``from_torchvision`` / ``to_torchvision`` round-trip every template's state dict and name exactly
  the tensors the gndgl network has;
* the cost model's forward MACs equal ``FlopCounterMode`` (FLOPs = 2 × MACs) on the assembled net and
  on every partition of a width-cut ResNeXt; ResNet-50 at 224² is torchvision's 4.09 GMACs and 25.6M
  parameters;
* segment names ``stem``, ``s1.b0`` .. ``s4.b<n-1>``, ``fc``, and ``stem: cifar``.

The nets are built on the meta device (no weights initialised) and then filled from torchvision's
state dict, so the big templates cost one torchvision construction and two float64 forwards each.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from gndgl_compiler.api import plan_spec
from gndgl_compiler.codegen.modules import PartitionModule, build_assembled
from gndgl_compiler.codegen.pretrained import from_torchvision, load_full_state, to_torchvision
from gndgl_compiler.graph.build import build_graph
from gndgl_compiler.partition.plan import IMAGE
from gndgl_compiler.spec.imagenet import IMAGENET_CONFIGS
from gndgl_compiler.spec.load import load_spec

TEMPLATES = list(IMAGENET_CONFIGS)
HEAVY = {"resnet101", "resnet152", "resnext101_32x8d", "wide_resnet50_2"}
RTOL = 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_text(name: str, size: int, extra: str = "", classes: int = 1000) -> str:
    return (f"name: t\nmodel: {{template: {name}, num_classes: {classes}, input_shape: [3, {size}, {size}]{extra}}}\n")


def meta_parts(plan) -> dict[int, PartitionModule]:
    """The partitions of ``plan`` with no storage (for FlopCounterMode) — as build_partitions, minus init."""
    with torch.device("meta"):
        return {p.id: PartitionModule(p, plan.num_classes) for p in plan.partitions}


def torchvision_net(name: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` in float64 with random BN affine parameters and running statistics (so that a
    BN mapped to the wrong place shows)."""
    net = getattr(torchvision.models, name)(weights=None).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
    return net


def gndgl_net(name: str, size: int, state: dict) -> torch.nn.Module:
    """The template at K = G = 1 in float64, every tensor from ``state`` (gndgl's names)."""
    plan = plan_spec(spec_text(name, size))
    parts = meta_parts(plan)
    for pm in parts.values():
        pm.to_empty(device="cpu")
        pm.double()
    n = load_full_state(plan, parts, state)
    assert n == len(state)  # every tensor of the state dict, and no other, was loaded
    return build_assembled(plan, parts).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_equal_logits(name: str, size: int, batch: int = 2) -> float:
    tv = torchvision_net(name)
    net = gndgl_net(name, size, from_torchvision(name, tv.state_dict()))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = tv(x), net(x)
    assert want.shape == got.shape == (batch, 1000)
    err = relative(got, want)
    assert err <= RTOL, (name, size, err)
    return err


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in HEAVY else [])
                                  for n in TEMPLATES])
def test_template_equals_torchvision_at_64(name):
    check_equal_logits(name, 64, batch=1 if name in HEAVY else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_template_equals_torchvision_at_224(name):
    check_equal_logits(name, 224, batch=1)


@pytest.mark.parametrize("name", TEMPLATES)
def test_state_dict_names_round_trip(name):
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)(weights=None).state_dict()
    ours = from_torchvision(name, tv)
    back = to_torchvision(name, ours)
    assert list(back) == list(tv)
    assert all(back[k] is tv[k] for k in tv)
    # exactly the tensors of gndgl's network, with the same shapes
    plan = plan_spec(spec_text(name, 32))
    need = {f"{n.source}.{leaf}": t.shape for p, pm in meta_parts(plan).items()
            for gm, nodes in ((pm.body, plan.partitions[p].body), (pm.aux, plan.partitions[p].head))
            for n in nodes if n.source and hasattr(gm, n.name) for leaf, t in getattr(gm, n.name).state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == need


def test_unknown_names_are_refused():
    from gndgl_compiler.codegen.pretrained import InitError
    with pytest.raises(InitError, match="not a torchvision template; valid: resnet18"):
        from_torchvision("resnet20", {})
    with pytest.raises(InitError, match="stage 2 block 4 is not in this network"):
        from_torchvision("resnet18", {"layer2.4.conv1.weight": torch.zeros(1)})
    with pytest.raises(InitError, match="'head.weight' is not one of the network's"):
        from_torchvision("resnet18", {"head.weight": torch.zeros(1)})


def flop_macs(module, *inputs) -> int:
    with FlopCounterMode(display=False) as fc:
        module(*inputs)
    flops = fc.get_total_flops()
    assert flops % (2 * inputs[0].shape[0]) == 0
    return flops // (2 * inputs[0].shape[0])


@pytest.mark.parametrize("name,size", [(n, 64) for n in TEMPLATES] + [("resnet50", 224), ("resnext101_32x8d", 224)])
def test_macs_equal_flop_counter_on_the_assembled_net(name, size):
    plan = plan_spec(spec_text(name, size))
    net = build_assembled(plan, meta_parts(plan))
    got = flop_macs(net, torch.empty(1, 3, size, size, device="meta"))
    want = plan.summary["e2e_macs"]
    assert abs(got - want) <= 0.01 * want, (got, want)
    assert got == want  # conv and linear MACs, counted the same way


def test_templates_are_the_models_list():
    from gndgl_compiler.spec.models import IMAGENET_TEMPLATES
    assert tuple(TEMPLATES) == IMAGENET_TEMPLATES


def test_resnet50_is_torchvisions_published_size():
    plan = plan_spec(spec_text("resnet50", 224))
    assert round(plan.summary["e2e_macs"] / 1e9, 2) == 4.09  # torchvision: 4.09 GFLOPS (multiply-adds)
    assert plan.summary["params"] == 25_557_032  # torchvision: 25,557,032 (25.6M)
    default = load_spec("name: t\nmodel: {template: resnet50}\n")
    assert default.model.input_shape == (3, 224, 224) and default.model.stem is None


def test_every_partition_of_a_width_cut_resnext_matches_flop_counter():
    plan = plan_spec(spec_text("resnext50_32x4d", 64, classes=10)
                     + "cuts: {depth: 4, width: 4}\nlocal: {head: {kind: 1c2f}, share_ratio: 1.0}\n")
    parts = meta_parts(plan)
    outs = {IMAGE: torch.empty(2, 3, 64, 64, device="meta")}
    for p in plan.partitions:
        ins = [outs[i.source] for i in p.inputs]
        outs[p.id] = parts[p.id].body(*ins)
        assert flop_macs(parts[p.id].body, *ins) == p.costs["body_macs"], p.name
    for p in plan.partitions:
        args = [outs[p.id]] + [outs[s.source] for s in p.shares]
        assert flop_macs(parts[p.id].aux, *args) == p.costs["head_macs"], p.name


def test_segment_names_and_stems():
    og = build_graph(load_spec(spec_text("resnet50", 64)))
    assert [s.name for s in og.segments] == (["stem"] + [f"s{s}.b{j}" for s, n in enumerate((3, 4, 6, 3), 1)
                                                          for j in range(n)] + ["fc"])
    assert og.segments[0].units == ["stem", "stem_bn", "stem_relu", "stem_pool"]
    assert og.node(og.segments[0].output)["shape"] == (64, 16, 16)
    cifar = build_graph(load_spec(spec_text("resnet18", 32, extra=", stem: cifar")))
    assert cifar.segments[0].units == ["stem", "stem_bn", "stem_relu"]
    assert cifar.node(cifar.segments[0].output)["shape"] == (64, 32, 32)
    assert cifar.node(cifar.segments[-2].output)["shape"] == (512, 4, 4)
    # any input of at least 32×32, not only squares of a power of two
    odd = build_graph(load_spec(spec_text("resnext50_32x4d", 32).replace("[3, 32, 32]", "[3, 33, 47]")))
    assert odd.node(odd.segments[-2].output)["shape"] == (2048, 2, 2)
