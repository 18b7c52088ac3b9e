"""Metric logging: nested records reach TensorBoard as tagged scalars, and metrics.csv.

Training used to die at its first evaluation when TensorBoard was installed (the eval
record's ``partition_acc`` dict went to ``add_scalar``); the training test here runs with
TensorBoard at its default (on when installed), as a user's machine has it.
"""

from __future__ import annotations

import csv

import pytest
from tiny_spec import ONE_EPOCH, tiny_spec

from gndgl_compiler import compile_spec, load_spec
from gndgl_compiler.runtime.metrics import MetricsLogger, flatten_scalars, read_metrics, write_metrics_csv
from gndgl_compiler.runtime.train import TrainOptions, train_artifact

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = {"kind": "eval", "epoch": 0, "step": 4, "test_acc": 0.5, "ensemble_acc": 0.25,
        "partition_acc": {"m0.g0": 0.125, "m1.g1": 0.75}, "wall_s": 1.5}


def test_flatten_scalars_joins_nested_keys():
    assert flatten_scalars({"a": 1, "b": {"x": 2.5, "y": {"z": 3}}, "s": "str", "t": True, "n": None}, "eval/") == [
        ("eval/a", 1), ("eval/b/x", 2.5), ("eval/b/y/z", 3)]


def test_tensorboard_gets_nested_values_as_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as log:
        log.log({"kind": "train", "epoch": 0, "step": 2, "partition": "m0.g0", "loss": 2.0, "lr": 0.1})
        log.log(EVAL)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/partition_acc/m0.g0", "eval/partition_acc/m1.g1", "eval/test_acc", "train/m0.g0/loss"} <= tags
    (ev,) = acc.Scalars("eval/partition_acc/m1.g1")
    assert (ev.step, ev.value) == (4, 0.75)


def test_metrics_csv_has_one_row_per_record_and_flat_columns(tmp_path):
    records = [{"kind": "train", "epoch": 0, "step": 2, "partition": "m0.g0", "loss": 2.0}, EVAL]
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for r in records:
            log.log(r)
    path = write_metrics_csv(tmp_path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2
    assert rows[0]["loss"] == "2.0" and rows[0]["partition_acc/m0.g0"] == ""
    assert rows[1]["partition_acc/m1.g1"] == "0.75" and rows[1]["test_acc"] == "0.5"


def test_training_with_tensorboard_default_logs_eval(tmp_path):
    spec = load_spec(tiny_spec("tb_run", ONE_EPOCH, deep=False))
    art = compile_spec(spec, out_dir=tmp_path / "compiled")
    summary = train_artifact(art, TrainOptions(limit_train=32, limit_test=16, run_dir=str(tmp_path / "run")))
    kinds = [r["kind"] for r in read_metrics(tmp_path / "run")]
    assert "eval" in kinds and summary["complete"]
    assert (tmp_path / "run" / "metrics.csv").is_file()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any((tmp_path / "run" / "tensorboard").iterdir())
