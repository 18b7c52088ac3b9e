"""Each training setting is declared once (issue 20): every field of the spec's ``train:`` model carries a
``Setting`` (``spec/setting.py``: recipe or execution, resume rule, flag), and TrainOptions, the Recipe /
Execution field lists and the resume rules are derived from it; ``run.json`` is a typed ``RunRecord`` that still
reads records written before; one run lifecycle (``runtime/run/lifecycle.py``) undoes a failed start."""

from __future__ import annotations

import copy
import json
from dataclasses import fields, replace

import pytest

from gndgl_compiler.errors import RunError
from gndgl_compiler.runtime.run.config import EXECUTION_FIELDS, RECIPE_FIELDS, Execution, Recipe, new_run_config
from gndgl_compiler.runtime.run.lifecycle import Started, undo_failed_start
from gndgl_compiler.runtime.run.options import TrainOptions, resume_rule
from gndgl_compiler.runtime.run.record import RunRecord
from gndgl_compiler.runtime.run.resume import APPLIES, REFUSED
from gndgl_compiler.spec.models import Train
from gndgl_compiler.spec.setting import PARTS, RESUME_RULES, settings_of
from paths import RUN_JSON_V0


def test_every_train_field_declares_one_setting():
    declared = settings_of(Train)
    assert list(declared) == list(Train.model_fields)
    for name, (info, setting) in declared.items():
        assert setting.part in PARTS and setting.resume in RESUME_RULES and info.description, name
        assert (setting.flags is None or setting.flags.startswith("--")) and (setting.help or not setting.option), name


def test_train_options_have_one_field_per_overridden_setting_with_its_flag_and_rule():
    options = TrainOptions.__dataclass_fields__
    for name, (_info, setting) in settings_of(Train).items():
        if not setting.option:
            assert name not in options, name
            continue
        opt = options[name].metadata.get("option")
        assert options[name].default is None and (opt.flags if opt else None) == setting.flags, name
        assert resume_rule(name) == setting.resume and (opt is None or opt.part == setting.part), name


def test_the_derived_lists_are_the_hand_kept_ones_they_replace():
    assert set(RECIPE_FIELDS) == {"dataset", "batch_size", "epochs", "seed", "optimizer", "schedule", "augment",
                                  "sync_bn"}  # sync_bn: added with the replicas, a recipe setting (BN statistics)
    assert set(EXECUTION_FIELDS) == {"data_root", "fused", "fuse_siblings", "amp", "channels_last", "cuda_graphs",
                                     "compile", "log_every", "checkpoint_every", "data"}
    assert set(RECIPE_FIELDS) <= {f.name for f in fields(Recipe)}
    assert set(EXECUTION_FIELDS) <= {f.name for f in fields(Execution)}
    assert set(APPLIES) == {"device", "log_every", "checkpoint_every", "data_root", "fuse_siblings", "cuda_graphs",
                            "compile"}
    assert REFUSED == {"dataset": "--dataset", "batch_size": "--batch-size", "seed": "--seed",
                       "fused": "--fused/--no-fused", "amp": "amp", "channels_last": "channels_last",
                       "limit_train": "--limit-train", "limit_test": "--limit-test", "overrides": "--set",
                       "run_dir": "--run-dir", "sync_bn": "--sync-bn/--no-sync-bn"}  # sync_bn: with its option


def test_options_are_checked_once_naming_the_field():
    with pytest.raises(RunError, match=r"train\.amp: Input should be 'auto', 'bf16' or 'off'"):
        new_run_config({}, TrainOptions(amp="fp8"))
    config = new_run_config({"epochs": 10, "schedule": {"warmup_epochs": 2}}, TrainOptions(epochs=5, lr=0.3))
    assert config.recipe.schedule.warmup_epochs == pytest.approx(1.0) and config.recipe.optimizer.lr == 0.3


def test_a_run_json_written_before_the_change_loads_and_writes_back_the_same_keys():
    data = json.loads(RUN_JSON_V0.read_text())
    record = RunRecord.from_json(copy.deepcopy(data))
    assert record.world == 1 and record.device == "cpu" and record.source == data["source"] and not record.changes
    assert record.to_json() == {**data, "config": {**data["config"], "data": None, "sync_bn": False}}
    config = record.run_config()
    assert config.recipe.epochs == 2 and config.recipe.limit_train == 64 and config.execution.checkpoint_every == 1
    older = copy.deepcopy(data)  # before fuse_siblings and world were recorded
    del older["config"]["fuse_siblings"], older["world"]
    assert RunRecord.from_json(older).run_config() == config
    changed = record.changed({"log_every": 1}, config=replace(config, execution=replace(config.execution,
                                                                                        log_every=1)))
    out = changed.to_json()
    assert out["config"]["log_every"] == 1 and out["changes"][0]["log_every"] == 1 and "time" in out["changes"][0]
    assert record.to_json()["config"]["log_every"] == 2  # the record itself is not changed


@pytest.mark.parametrize("bad, named", [({"world": 0}, "'world' is 0"), ({"device": 3}, "'device' is 3"),
                                        ({"config": {"epochs": 2}}, "config has no")])
def test_a_damaged_record_is_refused_naming_the_field(bad, named):
    with pytest.raises(ValueError, match=named):
        RunRecord.from_json({**json.loads(RUN_JSON_V0.read_text()), **bad})


def test_a_failed_start_is_undone_only_where_nothing_was_trained(tmp_path):
    fresh, kept, trained = tmp_path / "fresh", tmp_path / "kept", tmp_path / "trained"
    for d in (fresh, kept, trained):
        (d / "artifact").mkdir(parents=True)
        (d / "run.json").write_text("{}")
    (trained / "checkpoints").mkdir()
    (trained / "checkpoints" / "ckpt-000000001.json").write_text("{}")
    for started in (Started(fresh, True), Started(kept, False), Started(trained, True)):
        with pytest.raises(RunError), undo_failed_start(started, (RunError,)):
            raise RunError("bad input")
    assert not fresh.exists() and kept.is_dir() and not any(kept.iterdir()) and (trained / "run.json").is_file()
    with pytest.raises(ValueError), undo_failed_start(Started(trained, True), (RunError,)):
        raise ValueError("not bad input: kept")
    assert (trained / "run.json").is_file()
