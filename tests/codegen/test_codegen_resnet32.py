"""Codegen against an independent reference (DESIGN §2, §4).

1. The compiled end-to-end ResNet-32 computes exactly what a hand-written CIFAR
   ResNet-32 ``nn.Module`` computes with the same weights.

(2., groups: ``test_codegen_groups.py``; 3., gradient isolation: ``test_codegen_gradients.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegen_helpers import BasicBlock, randomize_artifact
from gndgl_compiler import compile_spec
from gndgl_compiler.partition.plan import IMAGE
from paths import SPECS


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- 1. ResNet-32


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
