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

import statistics

import pytest

from gndgl_compiler import compile_spec
from float_compare import rel, scaled_error
from fused_helpers import LOSS_RTOL, UPDATE_RTOL, bf16_steps, by_partition, partition_errors
from paths import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["resnet32_k2g2", "vgg6a_g2", "vit_tiny_fmnist_k2g2"])
def test_fused_bf16_step_is_a_bf16_version_of_the_same_step(name):
    art = compile_spec(SPECS / f"{name}.yaml")
    (s_fused, u_fused, fused), (s_ref, u_ref, _), (_, u_f32, _) = bf16_steps(art)
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
