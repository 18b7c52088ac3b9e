"""A killed replica under ``torchrun --max-restarts 1``: the whole job restarts, every replica resumes from replica
0's last committed checkpoint, and the run ends with the weights of an uninterrupted run with the same replicas —
the global batch never silently shrinks to the surviving replicas' rows (``runtime/dist/replicas.py``,
``runtime/dist/elastic.py``)."""

from __future__ import annotations

import json
import os
import pytest

from dist_helpers import DATA, DIST, PY, assert_same_weights, run_weights, torchrun
from paths import TESTS

pytestmark = DIST

JOB = [*DATA, "--batch-size", "32", "--replicas", "2", "--threads", "1", "--checkpoint-every", "1", "--timeout", "120"]
"""2 replicas × 1 stage, 4 steps of the global batch 32 (each replica 16 rows), a checkpoint every step."""


def test_killed_replica_restarts_the_whole_job_and_finishes_like_uninterrupted(art, tmp_path):
    pytest.importorskip("torch.distributed.run")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))

    def job(run, fault: str):
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
               "--monitor-interval", "0.5", "-m", "fault_worker", str(art("resnet32_k2g1")), "--run-dir", str(run),
               *JOB, "--json"]
        env = dict(os.environ, GNDGL_BACKEND="gloo", OMP_NUM_THREADS="1", GNDGL_TEST_FAULT=fault, PYTHONPATH=path)
        return torchrun(cmd, env, run, timeout=300)

    run = tmp_path / "run"
    r = job(run, "kill:1:2")  # global rank 1 = replica 1 (stage 0) SIGKILLs itself when step 2 begins
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "exitcode: -9" in r.stderr  # replica 1 was killed, torchrun saw it
    assert "elastic restart 1 of 1" in r.stdout and "resuming from step 2 of 4" in r.stdout, r.stdout
    assert "replica 1 rank 0:" in r.stdout  # the restart runs both replicas again
    summary = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert summary["complete"] and summary["steps"] == 4
    ref = job(tmp_path / "ref", "")  # the same job, uninterrupted
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]
    assert_same_weights(run_weights(run), run_weights(tmp_path / "ref"))
