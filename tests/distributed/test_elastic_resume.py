"""Resuming a run on another number of processes (gloo, local worker processes): the partitions are
re-placed from the per-partition checkpoint files (``runtime/checkpoint/replace.py``).

resnet32_k2g2 (5 partitions), 4 steps of 32, sibling fusion off: stopped after 2 steps, then resumed

    2 ranks  ──▶  gndgl train --resume RUN              (one process)
    1 process ──▶ gndgl train --resume RUN --workers 2

ends with the weights of an uninterrupted one-process run, bit for bit (the reference is trained
in this process with one thread, every module per partition, as the ranks run them). The optimizer
split and re-layout is also checked on its own against optimizers stepped side by side.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dist_helpers import DATA, DIST, assert_same_weights, gndgl, run_metrics, run_weights

pytestmark = DIST

NAME, BATCH = "resnet32_k2g2", 32
START = [*DATA, "--batch-size", str(BATCH), "--no-fuse-siblings", "--max-steps", "2", "--checkpoint-every", "1",
         "--log-every", "1", "--timeout", "60"]


@pytest.fixture(scope="module")
def changed(art, tmp_path_factory):
    """``changed(first, then)``: a run started on ``first`` workers (1: one process), stopped after 2 of
    its 4 steps and resumed on ``then`` (cached); returns ``{"run", "out"}``."""
    base = tmp_path_factory.mktemp("elastic")
    cache: dict[tuple[int, int], dict] = {}

    def get(first: int, then: int) -> dict:
        if (first, then) not in cache:
            run = base / f"{first}-{then}"
            workers = ["--workers", str(first)] if first > 1 else []
            r = gndgl("train", str(art(NAME)), "--run-dir", str(run), *workers, *START)
            assert r.returncode == 0, r.out[-4000:]
            assert json.loads((run / "summary.json").read_text())["steps"] == 2
            workers = ["--workers", str(then)] if then > 1 else []
            r = gndgl("train", "--resume", str(run), *workers)
            assert r.returncode == 0, r.out[-4000:]
            cache[(first, then)] = {"run": run, "out": r.out}
        return cache[(first, then)]

    return get


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_changed_world_matches_uninterrupted_run(changed, single, first, then):
    c = changed(first, then)
    assert f"workers: {first} → {then}" in c["out"] and f"re-placed from {first} process(es) onto {then}" in c["out"]
    run = c["run"]
    assert json.loads((run / "summary.json").read_text())["complete"]
    assert json.loads((run / "run.json").read_text())["world"] == then
    assert_same_weights(run_weights(run), single(NAME, BATCH))


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_changed_world_logs_every_step_once(changed, first, then):
    run = changed(first, then)["run"]
    train = [(x["step"], x["partition"]) for x in run_metrics(run) if x["kind"] == "train"]
    assert len(train) == len(set(train)), "a step was logged twice"
    assert {s for s, _ in train} == {1, 2, 3, 4}
    assert len({p for _, p in train}) == 5  # every partition, whichever process trained it
    if first == 2:
        assert not (run / "ranks" / "1" / "metrics.jsonl").exists()  # folded into the run's file


def test_eval_of_changed_world_run(changed):
    run = changed(2, 1)["run"]
    r = gndgl("eval", str(run), "--json")
    assert r.returncode == 0, r.out[-2000:]
    assert json.loads(r.out[r.out.index("{"):])["source"] == "final weights"


def test_finished_run_resumed_on_more_ranks_keeps_its_weights(changed, tmp_path):
    """Nothing left to train: the last step is checkpointed again in the new layout (rank0/ of the old
    layout holds that step with other partitions) and gathered from it."""
    run = tmp_path / "run"
    shutil.copytree(changed(1, 2)["run"], run)
    r = gndgl("train", "--resume", str(run), "--workers", "3")
    assert r.returncode == 0, r.out[-3000:]
    assert_same_weights(run_weights(run), run_weights(changed(1, 2)["run"]))
    assert json.loads((run / "checkpoints" / "commit-000000004.json").read_text())["world"] == 3


def _stepped(groups: list[list[torch.nn.Parameter]], tagged: bool) -> list[torch.optim.Optimizer]:
    """SGD with momentum over ``groups``: one optimizer with a param group per partition (tagged with
    its id, as the per-device updater does) or one optimizer per partition; two steps."""
    opts = ([torch.optim.SGD([{"params": g, "pid": i} for i, g in enumerate(groups)], lr=0.1, momentum=0.9)]
            if tagged else [torch.optim.SGD(g, lr=0.1, momentum=0.9) for g in groups])
    for k in range(2):
        for g in groups:
            for p in g:
                p.grad = torch.full_like(p, 0.5 + k) * p.numel()
        for o in opts:
            o.step()
    return opts


@pytest.mark.parametrize("tagged", [True, False])
def test_optimizer_state_relaid_out(tagged):
    from gndgl_compiler.runtime.checkpoint.replace import layout_optim, partition_optim

    torch.manual_seed(0)
    shapes = [[(3, 2), (3,)], [(4,)], [(2, 2), (5,), (1,)]]
    make = [[torch.nn.Parameter(torch.randn(s)) for s in g] for g in shapes]
    stepped = _stepped(make, tagged)
    saved = ({"cpu": stepped[0].state_dict()} if tagged else {str(i): o.state_dict() for i, o in enumerate(stepped)})
    fresh = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in make]
    other = ([torch.optim.SGD(g, lr=0.1, momentum=0.9) for g in fresh] if tagged else
             [torch.optim.SGD([{"params": g, "pid": i} for i, g in enumerate(fresh)], lr=0.1, momentum=0.9)])
    template = ({str(i): o.state_dict() for i, o in enumerate(other)} if tagged else {"cpu": other[0].state_dict()})
    laid = layout_optim(partition_optim(saved), template, "test")
    for key, o in zip(template, other):
        o.load_state_dict(laid[key])
    for g_old, g_new in zip(make, fresh):
        for p_old, p_new in zip(g_old, g_new):
            old = next(o for o in stepped if p_old in o.state).state[p_old]["momentum_buffer"]
            new = next(o for o in other if p_new in o.state).state[p_new]["momentum_buffer"]
            assert torch.equal(old, new)


def test_one_process_never_restarts_a_distributed_run_from_step_0(tmp_path):
    from gndgl_compiler.errors import RunError
    from gndgl_compiler.runtime.dist.context import LocalContext

    root = tmp_path / "checkpoints"
    (root / "rank0").mkdir(parents=True)
    (root / "commit-000000004.json").write_text(json.dumps({"step": 4, "world": 2}))  # no rank file is there
    with pytest.raises(RunError, match="no step whose every rank file is usable"):
        LocalContext().latest_checkpoint(root, None)
