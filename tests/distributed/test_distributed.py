"""Distributed training on CPU (gloo, 2-3 local worker processes) equals one process, bit for bit.

N workers end with weights ``torch.equal`` to one process (same seed, same intra-op thread count:
1 everywhere; CPU conv kernels round differently with 2) that runs sibling-fused exactly the
modules whose siblings sit whole on one rank; each rank prints which of its modules run fused;
the torchrun entry point (``python -m torch.distributed.run ... -m gndgl_compiler.worker``) too.

Every run is small (synthetic data, 128 training images, batches of 32). Resume:
``test_distributed_resume.py``; faults: ``test_distributed_faults.py``; bad input:
``test_distributed_cli.py``; fused stages across ranks: ``test_distributed_fused.py``. Helpers and
fixtures: ``tests/dist_helpers.py``, ``tests/dist_fixtures.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from dist_helpers import (DATA, DIST, PY, assert_same_weights, launch_run, run_weights, split_modules, torchrun,
                          train_single)
from paths import SPECS

pytestmark = DIST


@pytest.mark.parametrize("name,workers,fused", [
    ("resnet32_k2g1", 2, None),    # DGL, joint final head, spec default (fused)
    ("resnet32_k2g2", 2, False),   # GN-DGL, sharing + diversity, unfused per-partition steps
    ("resnet32_k2g2", 3, None),    # 5 partitions on 3 ranks: m1 fused on rank 0, m2.g0 | m2.g1 share, exchange;
                                   # stopped after 2 steps and resumed (dist_run)
    ("vit_tiny_fmnist_k2g2", 2, None),  # a width-cut ViT: group-wise placement, token slices and diversity travel
], ids=["k2g1-2w-fused", "k2g2-2w-unfused", "k2g2-3w-fused", "vit-k2g2-2w-fused"])
def test_distributed_matches_single_process(art, single, dist_run, name, workers, fused):
    from gndgl_compiler import load_artifact
    from gndgl_compiler.partition.placement import place

    a = load_artifact(art(name), verify=False)
    assert a.spec["train"]["fused"] is True  # the single process' default, so fused=None means fused
    place(a.plan, a.plan.devices, workers)
    assert len({p.worker for p in a.plan.partitions}) == workers
    if workers > 2 or name.startswith("vit"):  # siblings on different ranks: shared slices and diversity travel
        owner = {p.id: p.worker for p in a.plan.partitions}
        assert any(owner[s.source] != owner[p.id] for p in a.plan.partitions for s in p.shares)
        assert any(owner[s] != owner[p.id] for p in a.plan.partitions for s in p.siblings
                   if p.loss.diversity_weight > 0)

    # a module whose siblings all sit on one rank runs sibling-fused there, as in one process
    split = split_modules(a.plan, workers)
    whole = {p.module for p in a.plan.partitions if p.groups > 1} - split
    assert bool(whole) == (name == "resnet32_k2g2" and workers == 3)
    run = dist_run(name, workers, fused)
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["world"] == workers and cfg["config"]["fused"] is (fused is not False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 4
    assert_same_weights(run_weights(run), single(name, 32, fused, split if whole and fused is not False else None))


def test_distributed_matches_single_process_with_dropout(art, tmp_path):
    spec = yaml.safe_load((SPECS / "vgg6a_dgl.yaml").read_text())
    spec["model"]["width"] = 0.125
    assert spec["model"]["dropout"] > 0
    path = art("vgg6a_dgl_w0125", spec)
    ref = train_single(path, tmp_path / "single", 32)
    launch_run(path, tmp_path / "dist", 2, 32)
    assert_same_weights(run_weights(tmp_path / "dist"), ref)


def test_ranks_print_which_modules_run_fused(dist_run):
    """resnet32_k2g2 on 3 ranks: m1's siblings sit whole on rank 0 and run fused there (each partition's
    slice goes to rank 1 or 2), m2's are split over ranks 1 and 2; rank 0 prints every rank's line."""
    dist_run("resnet32_k2g2", 3, None)
    out = dist_run.printed[("resnet32_k2g2", 3, None)].splitlines()
    split = "per partition (siblings on other ranks): 2"
    for line in ["rank 0: sibling-fused modules: 1", f"rank 1: sibling-fused modules: none; {split}",
                 f"rank 2: sibling-fused modules: none; {split}"]:
        assert line in out, out[-40:]


def test_torchrun_entry_point(art, single, tmp_path):
    pytest.importorskip("torch.distributed.run")
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gndgl_compiler.worker",
           str(art("resnet32_k2g1")), "--run-dir", str(run), *DATA, "--batch-size", "32", "--threads", "1",
           "--timeout", "60", "--json"]
    env = dict(os.environ, GNDGL_BACKEND="gloo", OMP_NUM_THREADS="1")
    env.pop("GNDGL_TEST_FAULT", None)
    r = torchrun(cmd, env, run, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert summary["complete"] and summary["steps"] == 4
    assert summary["bytes_sent"] == 4 * 32 * 32768  # rank 0 -> 1: one 32x16x16 float32 activation per sample
    assert_same_weights(run_weights(run), single("resnet32_k2g1", 32))
