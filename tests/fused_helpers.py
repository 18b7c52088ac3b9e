"""Helpers of the sibling-fusion tests (``tests/runtime/fusion/``) that other folders use too (AugLocal in
``tests/partition/``, MAN in ``tests/runtime/step/``): optimizer settings, the (sibling-fused, per-partition)
executor pair, seeded batches, the float64 / float32 / bf16 tolerances and comparisons, a tiny ViT."""

from __future__ import annotations

import copy

import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from float_compare import module_error, rel

CPU = torch.device("cpu")
PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
SGD = {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "betas": (0.9, 0.999)}
F64_RTOL = 1e-10
F32_RTOL = 1e-4
"""float32, one step: fused and per-partition updates agree to this error, each tensor against the norm of
its partition's whole update (different summation orders). Over many float32 steps the two drift
apart like any two float32 implementations do (small-batch BatchNorm amplifies rounding about 2x per
step here), so multi-step equality is checked in float64, where 20 steps stay within 1e-14."""
LOSS_RTOL = 0.02
UPDATE_RTOL = 0.05
"""bf16: fused vs per-partition, relative to each partition's whole update."""


def executors(art, optimizer, dtype=torch.float32):
    """(sibling-fused, per-partition) executors over copies of the artifact's modules."""
    out = []
    for siblings in (True, False):
        mods = copy.deepcopy(art.modules)
        for m in mods.values():
            m.to(dtype)
        out.append(Executor(art.plan, mods, optimizer, {pid: CPU for pid in mods}, per_device_optim=True,
                            siblings=siblings))
    return out


def batch(art, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *art.plan.input_shape, generator=g).to(dtype)
    return x, torch.randint(0, art.plan.num_classes, (n,), generator=g)


def assert_same_training(fused, ref, art, *, n: int, seed: int, steps: int = 20, lr: float = 0.05) -> None:
    """``steps`` float64 steps of both executors on the same batches (dropout seeded by ``(seed, step)``):
    equal losses at every step and equal updates of the weights, to ``F64_RTOL``."""
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    for step in range(steps):
        x, y = batch(art, n=n, seed=step, dtype=torch.float64)
        sf, sr = fused.train_step(x, y, lr, seed=(seed, step)), ref.train_step(x, y, lr, seed=(seed, step))
        assert max(rel(sf[p][0], sr[p][0]) for p in sr) <= F64_RTOL, step
    worst = module_error(fused.modules, ref.modules, before)
    assert worst[0] <= F64_RTOL, worst


def tiny_vit(head: str, share: float, diversity: float, cls: bool = False):
    """A 2-module × G=2 ViT (D = 16, 4 heads, 16 tokens) on 1×16×16 inputs."""
    return compile_spec(f"""name: tiny_vit
model:
  template: vit_tiny
  vit: {{dim: 16, depth: 2, heads: 4, patch: 4, mlp_ratio: 2.0, cls: {str(cls).lower()}}}
  input_shape: [1, 16, 16]
  num_classes: 10
cuts: {{depth: [b0], width: 2}}
local:
  head: {head}
  share_ratio: {share}
  diversity: {{weight: {diversity}, temperature: 3.0}}
  final_head: {{kind: model, mode: separate}}
train: {{dataset: synthetic, batch_size: 8}}
""")


def one_step(art, siblings: bool, amp: bool, x, y):
    """Losses, counts, and ``{name: update}`` of one plain SGD step (lr 1) from the artifact's weights."""
    mods = copy.deepcopy(art.modules)
    before = {f"{pid}.{k}": v.detach().clone() for pid, m in mods.items() for k, v in m.named_parameters()}
    ex = Executor(art.plan, mods, PLAIN, {pid: CPU for pid in mods}, per_device_optim=True, siblings=siblings, amp=amp)
    stats = ex.train_step(x, y, 1.0, seed=(0, 0))
    after = {f"{pid}.{k}": v.detach() for pid, m in mods.items() for k, v in m.named_parameters()}
    fused = [r["fused"] for r in ex.fusion if len(r["partitions"]) > 1]
    return stats, {k: after[k] - before[k] for k in after}, fused


def by_partition(updates: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in updates.items():
        out.setdefault(k.split(".", 1)[0], {})[k] = v
    return out


def partition_errors(got: dict, want: dict) -> dict[str, float]:
    """``{pid: ‖got − want‖ / ‖want‖}`` over each partition's whole update (not per tensor: a bias that a
    BatchNorm follows has a zero gradient, so its own relative error is noise over noise)."""
    return {pid: rel(torch.cat([got[k].reshape(-1) for k in w]), torch.cat([v.reshape(-1) for v in w.values()]))
            for pid, w in by_partition(want).items()}
