"""Codegen against an independent reference (DESIGN §2, §4).

2. The G partition bodies of one module, concatenated, equal one dense-first conv
   followed by grouped convolutions (``nn.Conv2d(groups=G)``) built by hand.

(1., ResNet-32: ``test_codegen_resnet32.py``; 3., gradient isolation: ``test_codegen_gradients.py``.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegen_helpers import SMALL_SPEC, BasicBlock, compile_text, randomize_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- 2. groups


class GroupedResNetModule(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, int, int]], G: int):
        super().__init__()
        self.names = [b[0] for b in blocks]
        self.blocks = nn.ModuleList(BasicBlock(ci, co, s, G, dense=(i == 0))
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
        self.b4 = BasicBlock(16, 32, 2, G, dense=False)

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
