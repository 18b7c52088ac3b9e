"""Helpers of the sibling-fusion tests (``tests/runtime/fusion/``) that other folders use too (AugLocal in
``tests/partition/``, MAN in ``tests/runtime/step/``): optimizer settings, the (sibling-fused, per-partition)
executor pair, seeded batches, the float64 / float32 / bf16 tolerances and comparisons, a tiny ViT."""

from __future__ import annotations

import copy

import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from float_compare import module_error, rel, scaled_error

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


def assert_group_isolation(fs, inputs: list, y, image, *, check_inputs: bool, skip_unreached: bool = False) -> None:
    """On the sibling-fused stage ``fs`` (float64, modules in train mode): group g's loss reaches no other group's
    rows of any fused parameter and (``check_inputs``) none of the stage's ``inputs``; scaling group 1's loss by 3
    changes no other group's gradient and triples group 1's (to 1e-12 of its whole gradient's norm).
    ``skip_unreached``: a fused parameter that no loss reaches has no gradient to compare."""
    tensors = [t for t in fs.tensors if t.grads is not None]
    leaves = [t.fused for t in tensors]

    def grads(scale: torch.Tensor, wrt: list) -> tuple:
        _, _, losses, _ = fs.forward(inputs, None, y, image)
        return torch.autograd.grad((losses * scale).sum(), wrt, allow_unused=True)

    def rows(t, a: torch.Tensor, h: int) -> torch.Tensor:
        return a[h] if t.linear else a.narrow(0, h * (a.shape[0] // fs.G), a.shape[0] // fs.G)

    for g in range(fs.G):
        only = torch.zeros(fs.G, dtype=torch.float64)
        only[g] = 1.0
        gs = grads(only, leaves + inputs)
        for t, a in zip(tensors, gs):
            for h in range(fs.G):
                if a is not None and h != g:
                    assert torch.count_nonzero(rows(t, a, h)) == 0, f"loss of group {g} reaches group {h}"
        if check_inputs:
            assert all(a is None or torch.count_nonzero(a) == 0 for a in gs[len(leaves):]), "gradient left the module"
    scale = torch.ones(fs.G, dtype=torch.float64)
    scale[1] = 3.0
    tol = 1e-12  # float64 throughout (InfoPro's BCE and SupCon too: losses.py keeps a float64 program in float64)
    tripled: tuple[dict, dict] = ({}, {})
    for i, (t, a, b) in enumerate(zip(tensors, grads(torch.ones(fs.G, dtype=torch.float64), leaves),
                                      grads(scale, leaves))):
        for h in range(fs.G):
            if a is None and skip_unreached:
                continue
            pa, pb = rows(t, a, h), rows(t, b, h)
            if h == 1:
                tripled[0][i], tripled[1][i] = pb, 3 * pa
            else:
                assert torch.equal(pa, pb), h
    worst = scaled_error(*tripled)  # against the norm of partition 1's whole gradient
    assert worst[0] <= tol, worst


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


def bf16_steps(art) -> tuple:
    """One plain SGD step of ``art`` on 8 seeded inputs, three ways: sibling-fused and per-partition under bf16
    autocast, and per-partition in float32 — ``(fused, per_partition, float32)``, each what :func:`one_step` gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *art.plan.input_shape, generator=g)
    y = torch.randint(0, art.plan.num_classes, (8,), generator=g)
    return one_step(art, True, True, x, y), one_step(art, False, True, x, y), one_step(art, False, False, x, y)
