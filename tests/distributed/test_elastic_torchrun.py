"""Elastic restarts under torchrun (``runtime/dist/elastic.py``): a restarted job continues its run by itself.

``torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m fault_worker ART --run-dir RUN ...`` with
rank 1 SIGKILLed when step 3 begins (``tests/fault_worker.py``; a restart runs without the fault):
torchrun restarts both ranks with the same arguments, they resume from the committed step 2 without
``--resume``, say so, and finish with the weights of an uninterrupted one-process run (bit for bit:
resnet32_k2g1, one thread per rank). A restart on fewer ranks (elastic ``--nnodes MIN:MAX``) is the
launcher's ranks started again with the job's arguments and torchrun's restart count: it re-places the
partitions. How a restart finds and continues the run is checked on its own.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest

from dist_helpers import (DATA, DIST, PY, assert_same_weights, captured, faulty_workers, run_weights, torchrun,
                          worker_env)
from paths import TESTS

pytestmark = DIST


def test_killed_rank_restarts_and_finishes_like_uninterrupted_run(art, single, tmp_path):
    pytest.importorskip("torch.distributed.run")
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.5", "-m", "fault_worker", str(art("resnet32_k2g1")), "--run-dir", str(run), *DATA,
           "--batch-size", "32", "--threads", "1", "--timeout", "120", "--checkpoint-every", "1", "--json"]
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, GNDGL_BACKEND="gloo", OMP_NUM_THREADS="1", GNDGL_TEST_FAULT="kill:1:2", PYTHONPATH=path)
    # --timeout 120: the restarted ranks join the group in time on a loaded machine (the kill itself is seen
    # by torchrun at once, not by a timeout)
    r = torchrun(cmd, env, run, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "exitcode: -9" in r.stderr  # rank 1 was killed, torchrun saw it
    assert f"elastic restart 1 of 1: continuing {run} from its last committed checkpoint" in r.stdout, r.stdout
    assert "resuming from step 2 of 4" in r.stdout, r.stdout
    summary = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert summary["complete"] and summary["steps"] == 4
    assert_same_weights(run_weights(run), single("resnet32_k2g1", 32))


def test_restart_on_fewer_ranks_replaces_partitions(art, single, tmp_path):
    from gndgl_compiler.errors import DistributedError
    from gndgl_compiler.runtime.dist.launch import launch_local

    run = tmp_path / "run"
    job = [str(art("resnet32_k2g2")), "--run-dir", str(run), *DATA, "--batch-size", "32", "--no-fuse-siblings",
           "--checkpoint-every", "1", "--timeout", "30"]

    def first() -> None:
        with faulty_workers("kill:1:2"):
            launch_local(2, job, threads=1)

    r = captured(first)
    assert r.returncode == 1 and DistributedError.__name__ in r.out and "exited with code" in r.out, r.out[-3000:]
    with worker_env(TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_MAX_RESTARTS="1"):
        r = captured(lambda: launch_local(1, job, threads=1))
    assert r.returncode == 0, r.out[-4000:]
    assert "elastic restart 1 of 1" in r.out and "re-placed from 2 process(es) onto 1" in r.out, r.out[-3000:]
    assert json.loads((run / "run.json").read_text())["world"] == 1
    assert_same_weights(run_weights(run), single("resnet32_k2g2", 32))


def _args(**kw) -> argparse.Namespace:
    base = {"artifact": "compiled/x", "resume": None, "run_dir": None, "dataset": "synthetic", "batch_size": 32,
            "seed": None, "fused": None, "amp": None, "channels_last": None, "limit_train": 128, "limit_test": None,
            "overrides": ["train.epochs=2"], "lr": 0.1, "epochs": 1, "max_steps": None}
    return argparse.Namespace(**{**base, **kw})


def test_restart_continues_the_run_of_its_run_dir(tmp_path):
    from gndgl_compiler.runtime.dist.elastic import elastic_resume

    (tmp_path / "run.json").write_text("{}")
    args = _args(run_dir=str(tmp_path))
    note = elastic_resume(args, "net", {"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_MAX_RESTARTS": "3"})
    assert note.startswith(f"elastic restart 2 of 3: continuing {tmp_path}")
    assert args.resume == str(tmp_path) and args.artifact == str(tmp_path / "artifact") and args.run_dir is None
    assert (args.dataset, args.batch_size, args.limit_train, args.overrides, args.lr) == (None,) * 5
    assert args.epochs == 1  # the length stays what the job asked (the recorded one)


def test_first_attempt_and_plain_workers_start_as_usual(tmp_path):
    from gndgl_compiler.runtime.dist.elastic import elastic_resume

    args = _args()
    assert elastic_resume(args, "net", {}) is None and args.run_dir is None  # not under torchrun
    env = {"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "abc-123"}
    assert elastic_resume(args, "net", env) is None and args.run_dir == os.path.join("runs", "net-abc-123")
    assert args.resume is None and args.dataset == "synthetic"


def test_restart_without_a_run_to_find(tmp_path):
    from gndgl_compiler.runtime.dist.elastic import elastic_resume

    args = _args()
    note = elastic_resume(args, "net", {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "none"})
    assert "cannot be found" in note and "--run-dir" in note and args.resume is None
    args = _args(run_dir=str(tmp_path / "new"))
    note = elastic_resume(args, "net", {"TORCHELASTIC_RESTART_COUNT": "1"})
    assert "holds no run yet" in note and args.resume is None and args.dataset == "synthetic"
