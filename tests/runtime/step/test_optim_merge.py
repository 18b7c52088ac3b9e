"""``optim.step_all``: the per-device optimizer's param groups (one per partition) stepped by one
multi-tensor call per set of equal hyper-parameters, bit for bit ``opt.step()``.

Checked against torch's own ``step()`` on two copies of the same parameters, over several steps
(Adam's bias correction depends on each parameter's step count), with groups that differ in
hyper-parameters, a parameter without a gradient in one step, and a state_dict round trip; and the
number of aten ops, which is what merging is for (one foreach call instead of one per group).
"""

from __future__ import annotations

import copy

import pytest
import torch

from gndgl_compiler.profiling import OpCounter
from gndgl_compiler.runtime.step.optim import make_optimizer, step_all

KINDS = {
    "sgd": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "adam": {"kind": "adam", "lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 1e-4},
    "adamw": {"kind": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05},
}


def groups(seed: int = 0) -> list[dict]:
    """Eight 'partitions' of three parameters each; partition 5 has its own weight decay."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for pid in range(8):
        ps = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((16, 8, 3, 3), (16,), (10, 16))]
        out.append({"params": ps, "pid": pid, **({"weight_decay": 0.3} if pid == 5 else {})})
    return out


def set_grads(opt, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for grp in opt.param_groups:
        for i, p in enumerate(grp["params"]):
            p.grad = None if (step == 1 and grp["pid"] == 2 and i == 0) else torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merged_step_is_bit_for_bit_torch_step(kind):
    ref = make_optimizer(groups(), KINDS[kind], foreach=True)
    got = make_optimizer(groups(), KINDS[kind], foreach=True)
    for step in range(4):
        for grp in ref.param_groups + got.param_groups:
            grp["lr"] = KINDS[kind]["lr"] * (1 - step / 8)
        set_grads(ref, step)
        set_grads(got, step)
        ref.step()
        step_all(got)
        if step == 1:  # a round trip through state_dict keeps the merged path exact
            got.load_state_dict(copy.deepcopy(got.state_dict()))
    for ga, gb in zip(ref.param_groups, got.param_groups):
        for a, b in zip(ga["params"], gb["params"]):
            assert torch.equal(a, b)
            for k, v in ref.state[a].items():
                assert torch.equal(v, got.state[b][k]), k
    assert ref.state_dict()["param_groups"] == got.state_dict()["param_groups"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merged_step_dispatches_fewer_ops(kind):
    counts = {}
    for name, step in (("torch", lambda o: o.step()), ("merged", step_all)):
        opt = make_optimizer(groups(), KINDS[kind], foreach=True)
        for _ in range(2):
            set_grads(opt, 0)
            with OpCounter() as c:
                step(opt)
        counts[name] = c.n
    # eight groups with two sets of hyper-parameters: two sets of multi-tensor calls instead of eight
    # (Adam also reads each parameter's step count on the host, one op per parameter either way)
    print(kind, counts)
    assert counts["merged"] <= 0.6 * counts["torch"], counts
