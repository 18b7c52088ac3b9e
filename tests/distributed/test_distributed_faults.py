"""Faults in a distributed run (gloo, 2 local worker processes).

A fault-injecting Transport (``tests/fault_worker.py``: kill|hang|raise at RANK:STEP, installed
as the launcher's worker module): bounded exit, a message naming the rank and its partitions, no
orphan worker, a loadable committed checkpoint; resumable (the uninterrupted run's weights),
evaluable, and resumable in one process (the partitions re-placed).
"""

from __future__ import annotations

import re
import shutil

import pytest

from dist_helpers import DIST, TRAIN2, assert_same_weights, gndgl, orphans, run_metrics, run_weights

pytestmark = DIST


@pytest.fixture(scope="module")
def fault_runs(art, tmp_path_factory):
    """``fault_runs(kind)``: ``gndgl train --workers 2 --timeout 5``, rank 1 faulting at step 3 (cached)."""
    base = tmp_path_factory.mktemp("faults")
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            run = base / kind
            r = gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2, "--checkpoint-every", "1",
                      "--timeout", "5", fault=f"{kind}:1:3")
            cache[kind] = {"run": run, "result": r, "orphans": orphans(str(run))}
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["kill", "hang", "raise"])
def test_fault_stops_all_ranks_and_keeps_committed_checkpoint(fault_runs, kind):
    from gndgl_compiler.runtime.checkpoint.ranks import committed_checkpoint

    f = fault_runs(kind)
    r, run = f["result"], f["run"]
    assert r.returncode != 0, r.out[-3000:]
    assert r.wall < 5 + 30, f"took {r.wall:.1f}s with --timeout 5"
    assert re.search(r"error: rank [01] \(partitions m[12]\.g0\) exited with code", r.out), r.out[-3000:]
    assert "rank 1 (partitions m2.g0" in r.out  # the faulty rank is named (by the launcher or by its peer)
    assert "Traceback" not in r.out, r.out[-3000:]
    assert not f["orphans"], f"orphan workers: {f['orphans']}"
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("commit-*.json"))[-1] == "commit-000000003.json"
    for rank in (0, 1):
        ck = committed_checkpoint(root, rank)
        assert ck is not None and ck.state["step"] == 3, rank
    assert not (run / "weights.safetensors").exists()


def test_resume_after_killed_rank_matches_uninterrupted_run(fault_runs, reference_run, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(fault_runs("kill")["run"], run)
    r = gndgl("train", "--resume", str(run), "--workers", "2")
    assert r.returncode == 0, r.out[-4000:]
    assert_same_weights(run_weights(run), run_weights(reference_run))


def test_eval_of_interrupted_distributed_run(fault_runs):
    r = gndgl("eval", str(fault_runs("raise")["run"]), "--json")
    assert r.returncode == 0, r.out[-2000:]
    assert "000000003" in r.out


def test_single_process_resume_of_distributed_run(fault_runs, tmp_path):
    run = tmp_path / "hung"
    shutil.copytree(fault_runs("hang")["run"], run)
    r = gndgl("train", "--resume", str(run), "--max-steps", "4")
    assert r.returncode == 0 and "re-placed from 2 process(es) onto 1" in r.out, r.out[-2000:]
    steps = [(x["step"], x["partition"]) for x in run_metrics(run) if x["kind"] == "train"]
    assert len(steps) == len(set(steps)), "steps 1..3 were trained twice"
