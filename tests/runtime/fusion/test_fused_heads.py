"""Sibling fusion of the head and loss variants: share_ratio 0 < r < 1, predsim, InfoPro (softmax and contrast), ViT.

On the tiny GN-DGL spec (K=2 × G=2) and a tiny ViT (K=2 × G=2, token heads, with and without a CLS token), float64,
against the per-partition path (``siblings=False``):

* one step: per-partition losses and every parameter's gradient (a plain SGD step, lr 1) to 1e-10 relative;
* 20 steps of SGD-Nesterov: equal weights to 1e-10 relative;
* stop-gradient isolation on the fused path: partition g's loss reaches no other group's parameters and
  none of the module's inputs, and scaling it changes no other partition's gradient;
"""

from __future__ import annotations

import pytest
import torch

from gndgl_compiler import compile_spec
from float_compare import module_error, rel
from fused_helpers import F64_RTOL, PLAIN, SGD, assert_group_isolation, batch, executors, tiny_vit
from tiny_spec import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

INFOPRO = "{kind: infopro, variant: softmax, recon_weight: [1.0, 0.5], task_weight: [1.0, 2.0], hidden: 16}"
VARIANTS = {  # id: (head, share_ratio, diversity weight)
    "1c2f-r0.5": ("{kind: 1c2f, hidden: 16}", 0.5, 0.5),
    "linear-r0.5": ("{kind: linear}", 0.5, 0.0),
    "mlp-sr-r0.25": ("{kind: mlp-sr, hidden: 16}", 0.25, 0.5),
    "predsim-r1": ("{kind: predsim, beta: 0.99}", 1.0, 0.5),
    "predsim-r0.5": ("{kind: predsim, beta: 0.9}", 0.5, 0.0),
    "predsim-r0": ("{kind: predsim, beta: 0.99}", 0.0, 0.0),
    "infopro-r1": (INFOPRO, 1.0, 0.5),
    "infopro-r0.5": (INFOPRO, 0.5, 0.0),
    "infopro-contrast-r1": (INFOPRO.replace("softmax", "contrast"), 1.0, 0.0),
}


VIT = {  # id: (head, share_ratio, diversity weight, cls token)
    "vit-token-linear-r1": ("{kind: token-linear}", 1.0, 0.5, False),
    "vit-token-linear-r0.5-cls": ("{kind: token-linear}", 0.5, 0.0, True),
    "vit-token-mlp-r0": ("{kind: token-mlp, hidden: 16}", 0.0, 0.5, False),
}
VARIANTS.update({k: v[:3] for k, v in VIT.items()})


def variant(head: str, share: float, diversity: float):
    vit = next((v for v in VIT.values() if v[:3] == (head, share, diversity)), None)
    if vit is not None:
        return tiny_vit(*vit)
    text = tiny_spec("variant", "train:\n  dataset: synthetic\n  batch_size: 8\n", deep=False)
    text = text.replace("head: {kind: 1c2f, hidden: 32}\n  share_ratio: 1.0", f"head: {head}\n  share_ratio: {share}")
    return compile_spec(text.replace("weight: 0.5", f"weight: {diversity}"))


@pytest.mark.parametrize("key", list(VARIANTS))
def test_variant_one_step_float64(key):
    art = variant(*VARIANTS[key])
    fused, ref = executors(art, PLAIN, torch.float64)
    assert [r["fused"] for r in fused.fusion] == [True, True, False], fused.fusion
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = batch(art, dtype=torch.float64)
    sf, sr = fused.train_step(x, y, 1.0), ref.train_step(x, y, 1.0)
    assert max(rel(sf[p][0], sr[p][0]) for p in sr) <= F64_RTOL, (sf, sr)
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, worst


@pytest.mark.parametrize("key", ["1c2f-r0.5", "predsim-r0.5", "infopro-r1", "vit-token-linear-r0.5-cls"])
def test_variant_20_steps_float64(key):
    art = variant(*VARIANTS[key])
    fused, ref = executors(art, SGD, torch.float64)
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    for step in range(20):
        x, y = batch(art, n=4, seed=step, dtype=torch.float64)
        fused.train_step(x, y, SGD["lr"])
        ref.train_step(x, y, SGD["lr"])
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, worst


@pytest.mark.parametrize("key", ["1c2f-r0.5", "predsim-r0.5", "infopro-r0.5", "infopro-contrast-r1",
                                 "vit-token-linear-r1", "vit-token-linear-r0.5-cls"])
def test_variant_stop_gradient_isolation(key):
    art = variant(*VARIANTS[key])
    fused, _ = executors(art, PLAIN, torch.float64)
    fs = fused.fused_stages[1]  # module 2
    for m in fs.mods:
        m.train()
    x, y = batch(art, n=4, dtype=torch.float64)
    inp = fused.modules[0].body(x)
    inputs = [inp.detach().requires_grad_(True) for _ in fs.parts[0].inputs]
    image = fused.env.image01(x).double()
    assert_group_isolation(fs, inputs, y, image, check_inputs=True)
