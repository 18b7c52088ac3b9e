"""Committed checkpoints of a distributed run (gloo, local worker processes).

Stop mid-epoch, resume with ``--workers 2``: the same weights as an uninterrupted run, a loadable
committed checkpoint, ``gndgl eval`` and merged ``metrics.jsonl`` (each record once) afterwards;
resuming with another worker count re-places the partitions
(``test_elastic_resume.py`` checks the weights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from dist_helpers import DIST, PY, TRAIN2, assert_same_weights, gndgl, run_metrics, run_weights
from paths import REPO

pytestmark = DIST


@pytest.fixture(scope="module")
def resumed_run(art, tmp_path_factory):
    """The same run stopped after 5 steps (checkpoints every 2), then ``gndgl train --resume RUN --workers 2``."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    first = gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2, "--max-steps", "5",
                  "--checkpoint-every", "2")
    assert first.returncode == 0, first.out[-4000:]
    stopped = json.loads((run / "summary.json").read_text())
    commits = sorted(p.name for p in (run / "checkpoints").glob("commit-*.json"))
    second = gndgl("train", "--resume", str(run), "--workers", "2")
    assert second.returncode == 0, second.out[-4000:]
    return {"run": run, "stopped": stopped, "commits": commits}


def test_resume_matches_uninterrupted_run(resumed_run, reference_run):
    assert resumed_run["stopped"]["steps"] == 5 and not resumed_run["stopped"]["complete"]
    assert resumed_run["commits"] == ["commit-000000004.json", "commit-000000005.json"]
    run = resumed_run["run"]
    assert json.loads((run / "summary.json").read_text())["complete"]
    for r in (0, 1):
        assert list((run / "checkpoints" / f"rank{r}").glob("ckpt-*.safetensors"))
    assert_same_weights(run_weights(run), run_weights(reference_run))


def test_committed_checkpoint_is_loadable(resumed_run):
    from gndgl_compiler.runtime.checkpoint.ranks import committed_checkpoint

    root = resumed_run["run"] / "checkpoints"
    assert sorted(root.glob("commit-*.json"))
    for r in (0, 1):
        ck = committed_checkpoint(root, r)
        assert ck is not None and ck.state["step"] == 8 and ck.tensors


def test_eval_and_merged_metrics_after_distributed_run(resumed_run):
    run = resumed_run["run"]
    r = subprocess.run([PY, "-m", "gndgl_cli.main", "eval", str(run), "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(r.stdout)
    assert set(ev["partition_acc"]) == {"m1.g0", "m2.g0"} and ev["source"] == "final weights"
    assert ev["test_acc"] == json.loads((run / "summary.json").read_text())["test_acc"]
    recs = run_metrics(run)
    train = [x for x in recs if x["kind"] == "train"]
    assert {x["partition"] for x in train} == {"m1.g0", "m2.g0"}  # rank 0's and rank 1's partitions
    assert {x["step"] for x in train if x["partition"] == "m2.g0"} == set(range(1, 9))
    assert [x["step"] for x in recs] == sorted(x["step"] for x in recs)
    assert any(x["kind"] == "eval" for x in recs)


def test_metrics_have_no_duplicates_after_resume(resumed_run):
    seen = [(x["kind"], x["step"], x.get("partition")) for x in run_metrics(resumed_run["run"])]
    dup = sorted({k for k in seen if seen.count(k) > 1})
    assert not dup, f"duplicated records: {dup[:6]}"


def test_resume_with_other_worker_count_works(dist_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dist_run("resnet32_k2g2", 3, None), run)
    r = gndgl("train", "--resume", str(run), "--workers", "2", "--epochs", "2", "--timeout", "10")
    assert r.returncode == 0, r.out[-2000:]
    assert "workers: 3 → 2" in r.out and "re-placed from 3 process(es) onto 2" in r.out, r.out[-2000:]
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2
