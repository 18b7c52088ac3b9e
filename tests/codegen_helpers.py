"""Helpers of the codegen tests (``tests/codegen/``): seeded random weights for a compiled
artifact (so that a mis-wired BN cannot hide behind identity statistics), the small explicit
spec whose grouped modules and gradients they check, and the hand-written CIFAR basic block (dense or grouped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gndgl_compiler import compile_spec


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


class BasicBlock(nn.Module):
    """CIFAR basic block, written by hand: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. With ``G`` > 1 it is one
    module's G partitions as a single network: the layers that read the module input are dense (``dense=True``,
    else ``groups=G``), every other conv is ``groups=G``."""

    def __init__(self, c_in: int, c_out: int, stride: int, G: int = 1, dense: bool = True):
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
