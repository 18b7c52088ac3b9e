"""MAN across ranks: the weight edge as a point-to-point send of U's parameters (gloo, CPU).

The tiny MAN net of ``tests/runtime/step/test_man.py`` (``tests/man_helpers.py``; K=3, ``mix: learned``; G=1 on
2 worker processes, G=2 on 3, placed so that U sits on another rank than the partition that follows it) ends with
weights ``torch.equal`` to one
process — EMA units and s included — so U's parameters arrive exactly as they were before this step's update
(DESIGN §2.3), whichever rank holds U; the 3-rank run is stopped after 2 of its 4 steps and resumed.

Sibling fusion is on: each rank runs the MAN modules whose siblings it owns sibling-fused (the EMA units in fused
storage, their EMA step from U's parameters received from another rank or, for G = 4 on 3 ranks, partly local),
and the one-process reference fuses the same modules (there the EMA step runs over whole fused storages where
U's module is fused too).
"""

from __future__ import annotations

import json

import pytest
from dist_helpers import (DIST, assert_same_weights, captured, launch_run, resume_run, run_weights, split_modules,
                          train_single)
from man_helpers import spec

from gndgl_compiler import load_artifact

pytestmark = DIST


FUSED = {(1, 2): [], (2, 3): ["rank 0: sibling-fused modules: 1", "rank 1: sibling-fused modules: 2",
                             "rank 2: sibling-fused modules: 3"],
         (4, 3): ["rank 0: sibling-fused modules: 1", "rank 1: sibling-fused modules: 2"]}
"""(G, ranks) → what each rank prints about its fused modules (MAN modules 1 and 2 among them where G > 1)."""


@pytest.mark.parametrize("width,workers", [(1, 2), (2, 3), (4, 3)], ids=["g1-2w", "g2-3w", "g4-3w"])
def test_distributed_man_matches_single_process(tmp_path, width, workers):
    from gndgl_compiler import compile_spec

    path = compile_spec(spec("learned", width=width, train="{dataset: synthetic, batch_size: 32, seed: 2}"),
                        tmp_path / "art").path
    plan = load_artifact(path, workers=workers).plan
    remote = [p for p in plan.partitions if p.man is not None and plan.partitions[p.man.source].worker != p.worker]
    assert remote, "the placement must put some U on another rank than the partition that follows it"
    ref = train_single(path, tmp_path / "single", 32, split=split_modules(load_artifact(path).plan, workers))
    if width == 2:  # stopped after 2 of its 4 steps and resumed: the EMA units resume with the rest
        run = captured(lambda: launch_run(path, tmp_path / "dist", workers, 32, "--max-steps", "2",
                                          "--checkpoint-every", "1"))
        assert json.loads((tmp_path / "dist" / "summary.json").read_text())["steps"] == 2
        resume_run(tmp_path / "dist", workers)
    else:
        run = captured(lambda: launch_run(path, tmp_path / "dist", workers, 32))
    assert run.returncode == 0, run.out[-4000:]
    lines = run.out.splitlines()
    assert all(any(ln.startswith(want) for ln in lines) for want in FUSED[width, workers]), lines[-40:]
    got = run_weights(tmp_path / "dist")
    assert any(".ema_" in k for k in got) and any("man_mix.s" in k for k in got)
    assert_same_weights(got, ref)
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["complete"]
