"""bf16 autocast on the sibling-fused path (``train.amp: bf16``), checked on the CPU.

bf16 keeps 8 bits of mantissa, so no two bf16 programs agree to float32 tolerance; what must hold
is that the fused program is a bf16 version of the *same* step. One step of SGD (lr 1, no
momentum / decay: the update is minus the gradient), from the same weights and batch:

* every per-partition loss of the fused bf16 step is within ``LOSS_RTOL`` of the per-partition bf16
  step's, and the correct-prediction counts are the same to one sample;
* the fused and per-partition bf16 updates differ by at most ``UPDATE_RTOL`` (relative norm of each
  partition's whole update; each tensor's error against that norm too), and their median difference
  over partitions is no larger than twice the median difference between the per-partition bf16
  update and the float32 one: fusing adds no more error than bf16 itself has;
* autocast really ran (the bf16 and float32 steps differ), on every module of the spec fused.

The same executor code runs under CUDA autocast on a GPU (``benchmarks/gpu_check_correctness.py``).
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import pytest
import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from float_compare import rel, scaled_error

SPECS = Path(__file__).resolve().parents[1] / "specs"
CPU = torch.device("cpu")
PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
LOSS_RTOL = 0.02
UPDATE_RTOL = 0.05
"""bf16: fused vs per-partition, relative to each partition's whole update."""

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("name", ["resnet32_k2g2", "vgg6a_g2", "vit_tiny_fmnist_k2g2"])
def test_fused_bf16_step_is_a_bf16_version_of_the_same_step(name):
    art = compile_spec(SPECS / f"{name}.yaml")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *art.plan.input_shape, generator=g)
    y = torch.randint(0, art.plan.num_classes, (8,), generator=g)
    s_fused, u_fused, fused = one_step(art, True, True, x, y)
    s_ref, u_ref, _ = one_step(art, False, True, x, y)
    _, u_f32, _ = one_step(art, False, False, x, y)
    assert fused and all(fused), "every multi-group module of the spec runs fused"
    for pid, (loss, correct) in s_ref.items():
        assert rel(s_fused[pid][0].float(), loss.float()) <= LOSS_RTOL, (pid, s_fused[pid][0], loss)
        if correct is not None:
            assert abs(int(s_fused[pid][1]) - int(correct)) <= 1, pid
    worst = max(scaled_error(u_fused, p) for p in by_partition(u_ref).values())  # per tensor, partition scale
    assert worst[0] <= UPDATE_RTOL, worst
    diffs = partition_errors(u_fused, u_ref)
    assert max(diffs.values()) <= UPDATE_RTOL, diffs
    bf16_err = statistics.median(partition_errors(u_ref, u_f32).values())
    assert bf16_err > 1e-4, "autocast did not run (the bf16 and float32 steps agree)"
    assert statistics.median(diffs.values()) <= 2 * bf16_err, (statistics.median(diffs.values()), bf16_err)
