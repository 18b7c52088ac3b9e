"""Sibling-fused modules on both sides of a rank boundary, across real processes (gloo, 2 CPU ranks).

The tiny K=2 x G=2 network (``tests/tiny_spec.py`` without its third block) is placed for 2 ranks
contiguously, ``m1.g0 m1.g1 | m2.g0 m2.g1 head``: rank 0 runs m1 sibling-fused and sends each
partition's slice of the fused output to rank 1 (``SiblingFusedRunner._send_outputs``); rank 1
runs m2 sibling-fused on the inputs it receives from rank 0 (``_recv_inputs``), both through
``PeerComm``. The in-memory version of this is ``tests/runtime/step/test_executor_seams.py``. Checked: each
rank reports its module fused, rank 0 sends exactly the cross-rank bytes of the plan, and the run,
stopped after 2 of its 4 steps and resumed, logs the losses and ends with the weights of the
single-process run that fuses both modules, bit for bit.
"""

from __future__ import annotations

import json

import pytest

from dist_helpers import (DIST, assert_same_weights, captured, launch_run, resume_run, run_metrics, run_weights,
                          train_single)
from tiny_spec import tiny_spec

pytestmark = DIST

NAME = "tiny_k2g2_dist_fused"
SPEC = tiny_spec(NAME, "train:\n  dataset: synthetic\n  batch_size: 32\n  log_every: 1\n", deep=False)
BATCH, STEPS, STOP = 32, 4, 2  # 128 training images; the first launch stops after STOP steps


def _losses(run) -> dict[tuple[int, str], float]:
    """``(step, partition) -> loss`` of a run's train records (one per step: ``log_every: 1``)."""
    return {(r["step"], r["partition"]): r["loss"] for r in run_metrics(run) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(art, tmp_path_factory):
    """The single-process run (every module fused) and a 2-rank run stopped after 2 of its 4 steps
    (committing every step; what its ranks printed and its ``--json`` summary), then resumed.
    Two launches, not three: steps 1-2 (their logged losses) are the uninterrupted distributed run."""
    path, base = art(NAME, SPEC), tmp_path_factory.mktemp("dist_fused")
    run = base / "dist"
    train_single(path, base / "single", BATCH, split=frozenset())
    first = captured(lambda: launch_run(path, run, 2, BATCH, "--max-steps", str(STOP), "--checkpoint-every", "1",
                                        "--json"))
    assert first.returncode == 0, first.out[-4000:]
    summary = json.loads(next(ln for ln in first.out.splitlines() if ln.startswith("{")))
    stopped = _losses(run)
    again = captured(lambda: resume_run(run, 2))
    assert again.returncode == 0, again.out[-4000:]
    return {"art": path, "single": base / "single", "dist": run, "out": first.out, "summary": summary,
            "stopped": stopped, "resumed_out": again.out}


def test_placement_puts_each_grouped_module_whole_on_one_rank(art):
    from gndgl_compiler import load_artifact
    from gndgl_compiler.partition.placement import place

    plan = load_artifact(art(NAME, SPEC), verify=False).plan
    place(plan, plan.devices, 2)
    assert [(p.name, p.worker) for p in plan.partitions] == [
        ("m1.g0", 0), ("m1.g1", 0), ("m2.g0", 1), ("m2.g1", 1), ("head", 1)]
    m2 = [p for p in plan.partitions if p.module == 2]
    assert all(i.source in {0, 1} for p in m2 for i in p.inputs)  # m2 reads m1's outputs: across ranks


def test_each_rank_runs_its_module_fused(runs):
    """(a) rank 0 fuses m1 (it sends), rank 1 fuses m2 (it receives); nothing runs per partition."""
    out = runs["out"].splitlines()
    for line in ["rank 0: sibling-fused modules: 1", "rank 1: sibling-fused modules: 2"]:
        assert line in out, out[-40:]
    resumed = runs["resumed_out"].splitlines()
    assert "rank 1: sibling-fused modules: 2" in resumed, resumed[-40:]


def test_fused_sender_sends_the_plans_cross_rank_bytes(runs):
    """Each of m1's partitions sends its slice of the fused output once per step, as unfused."""
    from gndgl_compiler import load_artifact
    from gndgl_compiler.partition.placement import cross_worker_bytes, place

    plan = load_artifact(runs["art"], verify=False).plan
    place(plan, plan.devices, 2)
    s = runs["summary"]
    assert s["steps"] == STOP and not s["complete"]
    assert s["bytes_sent"] == STOP * BATCH * cross_worker_bytes(plan) > 0


def test_matches_single_process_bit_for_bit(runs):
    """(b) the losses of the steps before the stop equal the fused single-process run's."""
    want = _losses(runs["single"])
    assert len(want) == STEPS * 5
    assert runs["stopped"] == {k: v for k, v in want.items() if k[0] <= STOP}


def test_stop_and_resume_matches_single_process(runs):
    """(b, c) resumed on the same placement: every logged loss and the final weights are the
    single-process run's."""
    assert json.loads((runs["dist"] / "summary.json").read_text())["complete"]
    assert_same_weights(run_weights(runs["dist"]), run_weights(runs["single"]))
    assert _losses(runs["dist"]) == _losses(runs["single"])
