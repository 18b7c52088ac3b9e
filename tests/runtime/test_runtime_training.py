"""Training runtime, whole runs (``train_artifact`` on a tiny GN-DGL spec and synthetic data): loss
decrease, evaluation, the sequential schedule, a start that fails on bad input, a non-finite loss,
and ``--epochs`` rescaling a recipe's schedule.

One step against hand-written PyTorch, fused vs unfused: ``tests/runtime/step/test_runtime_handwritten.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.metrics import read_metrics
from gndgl_compiler.runtime.train import TrainOptions, evaluate_run, train_artifact
from tiny_spec import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


# ======================================================================================

TINY = tiny_spec("tiny_gn", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 3
  optimizer: {kind: sgd, lr: 0.2, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  schedule: {kind: cosine, warmup_epochs: 0.25, warmup_start_lr: 0.02}
  augment: null
  seed: 0
  log_every: 4
""", schedule='SCHEDULE')
PARTS = ["m1.g0", "m1.g1", "m2.g0", "m2.g1", "head"]


def tiny_artifact(tmp_path, schedule: str = "parallel"):
    art = compile_spec(TINY.replace("SCHEDULE", schedule), out_dir=tmp_path / f"art-{schedule}")
    assert [p.name for p in art.plan.partitions] == PARTS
    return art.path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short parallel GN-DGL run on synthetic data: 3 epochs x 16 steps of batch 16."""
    tmp = tmp_path_factory.mktemp("run")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_artifact(tiny_artifact(tmp), TrainOptions(run_dir=str(tmp / "run"), limit_train=256,
                                                                  limit_test=64, tensorboard=False))
    finally:
        torch.set_num_threads(old)
    return tmp / "run", summary


# ======================================================================================
# 5. training lowers every partition's local loss
# ======================================================================================

def test_loss_goes_down_for_every_partition(trained_run):
    run, summary = trained_run
    assert summary["complete"] and summary["steps"] == 48 and summary["epochs_done"] == 3
    recs = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert {r["partition"] for r in recs} == set(PARTS)
    for name in PARTS:
        losses = [r["loss"] for r in recs if r["partition"] == name]
        assert len(losses) == 12  # every 4 steps
        assert losses[-1] < 0.9 * losses[0], (name, losses)


# ======================================================================================
# 7. evaluation of a finished run
# ======================================================================================

def test_evaluate_run(trained_run):
    run, summary = trained_run
    ev = evaluate_run(run)
    assert ev["n"] == 64 and ev["source"] == "final weights"
    assert 0.0 <= ev["test_acc"] <= 1.0 and 0.0 <= ev["ensemble_acc"] <= 1.0
    assert set(ev["partition_acc"]) == set(PARTS)
    assert all(0.0 <= a <= 1.0 for a in ev["partition_acc"].values())
    # the final head *is* the test accuracy, and the saved weights reproduce the last epoch's evaluation
    assert ev["test_acc"] == ev["partition_acc"]["head"]
    assert ev["test_acc"] == summary["test_acc"] and ev["ensemble_acc"] == summary["ensemble_acc"]
    last_eval = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    assert last_eval["partition_acc"] == ev["partition_acc"]
    assert ev["test_acc"] > 0.2  # above chance (10 classes) after 3 epochs on the easy synthetic task


# ======================================================================================
# 6. sequential schedule: module by module, earlier modules frozen (weights and BN stats)
# ======================================================================================

def test_sequential_schedule_trains_module_by_module(tmp_path):
    from gndgl_compiler.artifact import read_weights
    from gndgl_compiler.runtime.checkpoint.store import load_checkpoint
    from gndgl_compiler.runtime.checkpoint.directory import list_checkpoints

    art_dir = tiny_artifact(tmp_path, "sequential")
    init = read_weights(art_dir)
    run = tmp_path / "run"
    summary = train_artifact(art_dir, TrainOptions(run_dir=str(run), epochs=1, limit_train=64, limit_test=32,
                                                   tensorboard=False, keep_checkpoints=100,
                                                   eval_every_epoch=False))
    spe = 4
    assert summary["complete"] and summary["steps"] == 3 * spe  # 3 phases: module 1, module 2, final head
    ckpts = {load_checkpoint(run / "checkpoints", n)[1]["step"]: load_checkpoint(run / "checkpoints", n)[0]
             for n in list_checkpoints(run / "checkpoints")}
    assert {spe, 2 * spe, 3 * spe} <= set(ckpts)
    from safetensors.torch import load_file
    final = load_file(str(run / "weights.safetensors"))
    stages = [init, ckpts[spe], ckpts[2 * spe], ckpts[3 * spe], final]

    def same(a, b, prefix):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys
        return all(torch.equal(a[k], b[k]) for k in keys)

    def moved(a, b, prefix):  # every parameter tensor changed (BN counters included)
        keys = [k for k in a if k.startswith(prefix) and "running" not in k]
        return all(not torch.equal(a[k], b[k]) for k in keys)

    trains = {1: ("m1.",), 2: ("m2.",), 3: ("head.",)}
    for phase in (1, 2, 3):
        before, after = stages[phase - 1], stages[phase]
        for prefix in ("m1.", "m2.", "head."):
            if prefix in trains[phase]:
                assert moved(before, after, prefix), (phase, prefix)
            else:
                assert same(before, after, prefix), f"{prefix} changed during phase {phase}"
    assert same(ckpts[3 * spe], final, "")
    # metrics: each phase logs only its own partitions
    recs = [r for r in read_metrics(run) if r["kind"] == "train"]
    for r in recs:
        phase = (r["step"] - 1) // spe + 1
        assert r["partition"].startswith(trains[phase][0][:-1]), r


# ======================================================================================
# a start that fails on bad input must not leave a run directory behind
# ======================================================================================

def test_failed_start_leaves_no_run_directory(tmp_path):
    from gndgl_compiler.errors import GndglError

    art = tiny_artifact(tmp_path)
    run = tmp_path / "run"
    opts = dict(run_dir=str(run), epochs=1, limit_train=32, limit_test=16, tensorboard=False)
    with pytest.raises(GndglError, match="cuda:3"):
        train_artifact(art, TrainOptions(device="cuda:3", **opts))
    # the user follows the advice of the message and runs the same command on the CPU
    summary = train_artifact(art, TrainOptions(device="cpu", **opts))
    assert summary["complete"]


# ======================================================================================
# a non-finite loss stops the run, names the partition and step, keeps the last good checkpoint
# ======================================================================================

def test_non_finite_loss_stops_naming_partition_and_keeps_good_checkpoint(tmp_path):
    from gndgl_compiler.errors import TrainingError
    from gndgl_compiler.runtime.checkpoint.directory import latest_valid_checkpoint

    art = tiny_artifact(tmp_path)
    run = tmp_path / "run"
    common = dict(run_dir=str(run), limit_train=64, limit_test=16, tensorboard=False, log_every=1)
    # 4 good steps (checkpointed at step 4 by checkpoint_every), then a learning rate that blows up
    train_artifact(art, TrainOptions(max_steps=4, checkpoint_every=4, **common))
    good = latest_valid_checkpoint(run / "checkpoints")
    assert good is not None and good.state["step"] == 4
    cfg = json.loads((run / "run.json").read_text())
    cfg["config"]["optimizer"]["lr"] = 100.0  # the largest a spec allows
    (run / "run.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match=r"partition \S+ has a non-finite loss .*step \d+") as info:
        train_artifact(None, TrainOptions(resume=str(run), max_steps=12))
    assert info.value.exit_code == 1 and "last good checkpoint" in str(info.value)
    after = latest_valid_checkpoint(run / "checkpoints")
    for key, t in after.tensors.items():
        assert torch.isfinite(t.float()).all(), f"a checkpoint holds non-finite {key}"
    from safetensors.torch import load_file
    for key, t in load_file(str(run / "weights.safetensors")).items():  # the weights of the good first part
        assert torch.isfinite(t.float()).all(), f"weights.safetensors holds non-finite {key}"


def test_epochs_override_scales_warmup_and_milestones():
    """--epochs 16 on a 160-epoch recipe with 10 warm-up epochs warms up for 1 epoch (not the whole run);
    multistep milestones move with it; the same length leaves the schedule alone."""
    from gndgl_compiler.runtime.run.config import new_run_config
    from gndgl_compiler.runtime.step.optim import lr_at
    from gndgl_compiler.spec.models import Schedule
    cosine = {"epochs": 160, "optimizer": {"lr": 0.8},
              "schedule": {"kind": "cosine", "warmup_epochs": 10, "warmup_start_lr": 0.01}}
    cfg = new_run_config(cosine, TrainOptions(epochs=16)).recipe
    assert cfg.epochs == 16 and cfg.schedule.warmup_epochs == pytest.approx(1.0)
    assert lr_at(10, 10, 0.8, cfg.schedule, 16) == pytest.approx(0.8)  # peak right after one epoch
    assert new_run_config(cosine, TrainOptions(epochs=160)).recipe.schedule == Schedule(**cosine["schedule"])
    multi = {"epochs": 100, "optimizer": {"lr": 0.1}, "schedule": {"kind": "multistep", "milestones": [50, 75]}}
    cfg = new_run_config(multi, TrainOptions(epochs=20)).recipe
    assert cfg.schedule.milestones == pytest.approx([10, 15])
    assert multi["schedule"]["milestones"] == [50, 75]  # the spec's dict is not modified
