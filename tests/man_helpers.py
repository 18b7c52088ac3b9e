"""Helpers of the MAN / MAN++ tests (``tests/runtime/step/test_man.py``) that the sibling-fused and distributed
MAN tests share: the tiny 3-module MAN net as a spec, its InfoPro head and its seeded float64 batches."""

from __future__ import annotations

import torch

INFOPRO = "{kind: infopro, variant: softmax, recon_weight: [1.0, 0.5], task_weight: [0.5, 2.0], hidden: 8}"


def spec(mix: str = "sum", head: str = "{kind: 1c2f, hidden: 8}", width: int = 1, momentum: float = 0.9,
         train: str = "{dataset: synthetic, batch_size: 8}") -> str:
    share = "1.0" if width > 1 else "0.0"
    return f"""name: man_tiny
model:
  input_shape: [3, 16, 16]
  num_classes: 5
  layers:
    - {{op: conv, name: conv1, out: 4}}
    - {{op: bn, name: bn0}}
    - {{op: relu, name: relu0}}
    - {{op: block, name: block1, out: 4}}
    - {{op: block, name: block2, out: 8, stride: 2}}
    - {{op: adaptive_avgpool, size: 1}}
    - {{op: flatten}}
    - {{op: linear, name: fc, out: 5}}
cuts: {{depth: [relu0, block1], width: {width}}}
local:
  head: {head}
  share_ratio: {share}
  man: {{momentum: {momentum}, mix: {mix}}}
  final_head: {{kind: 1c2f, mode: separate, hidden: 8}}
train: {train}
"""


def batch(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)
