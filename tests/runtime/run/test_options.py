"""The training options are declared once (``runtime/run/options.py``) and the run config is typed
(``runtime/run/config.py``): the worker parses what the launcher passes, and run.json round-trips."""

from __future__ import annotations

import pytest

from gndgl_compiler.runtime.run.config import RunConfig, new_run_config
from gndgl_compiler.runtime.run.options import (LaunchOptions, TrainOptions, declared, from_args, worker_argv,
                                                worker_parser)


def test_worker_parses_what_the_launcher_passes():
    opts = TrainOptions(epochs=3, dataset="synthetic", batch_size=16, lr=0.05, seed=7, fused=False,
                        fuse_siblings=True, run_dir="runs/x", limit_train=64, max_steps=5, checkpoint_every=2,
                        log_every=1, overrides=["train.optimizer.momentum=0.5", "train.seed=3"], download=True,
                        tensorboard=True)
    launch = LaunchOptions(workers=2, timeout=12.5, port=1234)
    args = worker_parser("w", "d").parse_args(["compiled/x", *worker_argv(opts, launch)])
    back, back_launch = from_args(TrainOptions, args), from_args(LaunchOptions, args)
    for name, _typ, default, opt in declared(TrainOptions):
        assert getattr(back, name) == (getattr(opts, name) if opt.worker else default), name
    assert back_launch.timeout == 12.5 and back_launch.workers is None and back_launch.port is None
    assert args.artifact == "compiled/x"


def test_every_option_has_a_flag_help_and_part():
    for cls in (TrainOptions, LaunchOptions):
        for name, _typ, _default, opt in declared(cls):
            assert opt.flag.startswith("--") and opt.help and opt.part in ("recipe", "execution", "run", "launch"), name


def test_run_config_round_trips_run_json_and_reads_older_records():
    config = new_run_config({"epochs": 4, "schedule": {"kind": "multistep", "milestones": [2, 3]}},
                            TrainOptions(epochs=8, lr=0.2, limit_train=32, device="cpu"))
    assert config.recipe.schedule.milestones == pytest.approx([4, 6]) and config.recipe.optimizer.lr == 0.2
    assert config.execution.device == "cpu" and config.recipe.limit_train == 32
    record = config.record()
    assert RunConfig.from_record(record, device="cpu") == config
    older = {k: v for k, v in record.items() if k not in ("fuse_siblings", "limit_train", "limit_test")}
    old = RunConfig.from_record(older)
    assert old.execution.fuse_siblings is True and old.recipe.limit_train is None
