"""Data-parallel replicas of the partition pipeline (gloo, local worker processes; ``runtime/dist/replicas.py``).

R replicas × N stages on R·N processes; replica r trains rows r::R of every global batch and each partition's
gradients are averaged over its R copies. On a net without BatchNorm and with batch-mean losses that is one
process with the global batch up to float rounding (the mean of R shard means is the batch mean). Replica 0
writes the checkpoints; a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess

import torch

from dist_helpers import DIST, PY, REPLICA_TRAIN, gndgl, replica_net, run_weights, train_replica_net
from float_compare import scaled_error
from paths import REPO

pytestmark = DIST

def _train(art, run, *extra: str):
    return train_replica_net(art, False, run, *extra)


def test_two_replicas_equal_one_process_with_the_global_batch(art, tmp_path):
    _train(art, tmp_path / "one", "--replicas", "1", "--no-fuse-siblings")
    out = _train(art, tmp_path / "two", "--no-fuse-siblings").out  # placement.replicas: 2 from the spec
    assert "launching 2 replicas × 1 workers" in out and "replica 1 rank 0:" in out
    one, two = run_weights(tmp_path / "one"), run_weights(tmp_path / "two")
    start = {k: v for k, v in run_weights(art("nobn", replica_net(False))).items() if k in one}
    moved, _ = scaled_error(start, one)
    assert moved > 1e-2  # 20 steps moved the weights: the comparison below is not trivially met
    err, name = scaled_error(two, one)
    assert err < 1e-5, f"{name}: {err:.3g}"
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["complete"]


def test_replicas_with_sibling_fusion_and_two_stages(art, tmp_path):
    """2 replicas × 2 stages (4 processes, activations within a replica) with the fused step: as one process."""
    _train(art, tmp_path / "four", "--workers", "2", "--max-steps", "8")
    _train(art, tmp_path / "one8", "--replicas", "1", "--max-steps", "8")
    err, name = scaled_error(run_weights(tmp_path / "four"), run_weights(tmp_path / "one8"))
    assert err < 1e-5, f"{name}: {err:.3g}"


def test_checkpoint_by_replica_0_and_resume_equal_uninterrupted(art, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    _train(art, ref, "--no-fuse-siblings", "--max-steps", "9")
    first = gndgl("train", str(art("nobn", replica_net(False))), "--run-dir", str(run), *REPLICA_TRAIN,
                  "--no-fuse-siblings", "--max-steps", "5", "--checkpoint-every", "2")
    assert first.returncode == 0, first.out[-4000:]
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["rank0"]  # replica 0's files only
    assert json.loads((root / "commit-000000005.json").read_text()) == {"step": 5, "world": 1}
    second = gndgl("train", "--resume", str(run), "--max-steps", "9")
    assert second.returncode == 0, second.out[-4000:]
    assert "resuming from step 5" in second.out
    a, b = run_weights(run), run_weights(ref)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_compile_json_reports_allreduce_bytes(art):
    from gndgl_compiler import load_artifact

    loaded = load_artifact(art("nobn", replica_net(False)))
    params = sum(p.numel() for m in loaded.modules.values() for p in m.parameters())
    s = loaded.plan.summary
    assert s["replicas"] == 2 and s["allreduce_bytes_per_step"] == 4 * params
    assert s["allreduce_ring_bytes_per_rank"] == 4 * params  # 2·(R−1)/R = 1 for R = 2


def test_replicas_not_dividing_the_batch_exit_2(art, tmp_path):
    res = gndgl("train", str(art("nobn", replica_net(False))), "--run-dir", str(tmp_path / "r"), *REPLICA_TRAIN,
                "--batch-size", "15")
    assert res.returncode == 2, res.out[-3000:]
    assert "2 replicas do not divide the batch size 15" in res.out and "Traceback" not in res.out


def test_replicas_beyond_the_started_processes_exit_2(art, tmp_path):
    """torchrun started 3 processes for 2 replicas (R·N would need a multiple of 2): every rank refuses."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               OMP_NUM_THREADS="1")
    net = str(art("nobn", replica_net(False)))
    r = subprocess.run([PY, "-m", "gndgl_compiler.worker", net, "--run-dir", str(tmp_path / "r"), *REPLICA_TRAIN,
                        "--replicas", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "2 replicas need R·N processes (N workers each), but 3 were started" in r.stderr
