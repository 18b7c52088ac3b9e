"""A new user's first hour, as commands: the compiled/<name>/ convention, --set, units,
--version, help text, resume options, the progress lines and the human summary.

Every command is a real ``gndgl`` process; bad input exits 2 with an ``error:`` line.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import bad, gndgl
from tiny_spec import ONE_EPOCH, tiny_spec

TINY = tiny_spec("tiny_ux", ONE_EPOCH, deep=False)
DATA = ["--limit-train", "64", "--limit-test", "32", "--no-tensorboard"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ux")
    (d / "specs").mkdir()
    (d / "specs" / "tiny.yaml").write_text(TINY)
    (d / "specs" / "tiny2.yaml").write_text(TINY.replace("name: tiny_ux", "name: tiny_ux2"))
    return d


def test_compile_writes_compiled_name_and_folder_means_newest(work):
    assert gndgl(work, "compile", "specs/tiny.yaml").returncode == 0
    r = gndgl(work, "compile", "specs/tiny2.yaml", "--set", "train.optimizer.weight_decay=0.0005")
    assert r.returncode == 0, r.stderr
    assert (work / "compiled" / "tiny" / "manifest.json").is_file()
    spec2 = json.loads((work / "compiled" / "tiny2" / "spec.json").read_text())
    assert spec2["train"]["optimizer"]["weight_decay"] == 5e-4
    r = gndgl(work, "inspect", "compiled/")
    assert r.returncode == 0 and "tiny_ux2" in r.stdout and "match the sha256" in r.stdout
    assert "using compiled/tiny2/ (the newest of 2 artifacts in compiled/)" in r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 100
    r = gndgl(work, "viz", "compiled/")
    assert r.returncode == 0, r.stderr
    assert (work / "compiled" / "tiny2" / "partitions.svg").is_file() or "dot" in r.stderr


def test_train_folder_of_artifacts_summary_and_last_window(work):
    r = gndgl(work, "train", "compiled/", *DATA, "--max-steps", "3", "--run-dir", "runs/stopped")
    assert r.returncode == 0, r.stderr
    assert "using compiled/" in r.stderr
    assert "epoch 1 step 3:" in r.stdout  # the window after the last record (step 2) is shown
    assert "stopped in" in r.stdout and "gndgl eval runs/stopped" in r.stdout
    assert (work / "runs" / "stopped" / "data.json").is_file()


def test_old_style_compiled_artifact_gets_a_clear_error(tmp_path):
    (tmp_path / "t.yaml").write_text(TINY)
    assert gndgl(tmp_path, "compile", "t.yaml", "-o", "compiled").returncode == 0
    bad(gndgl(tmp_path, "compile", "t.yaml"), "'compiled' is itself an artifact", "mv compiled")


def test_set_errors_name_the_option(work):
    bad(gndgl(work, "compile", "specs/tiny.yaml", "--set", "cuts.width=3", "-o", "x"), "--set cuts.width=3",
        "field 'cuts.width'")
    bad(gndgl(work, "compile", "specs/tiny.yaml", "--set", "train.optimizer.lr=abc", "-o", "x"),
        "--set train.optimizer.lr=abc", "valid number")
    bad(gndgl(work, "compile", "specs/tiny.yaml", "--set", "nothing", "-o", "x"), "FIELD.PATH=VALUE")
    bad(gndgl(work, "train", "compiled/tiny", "--set", "cuts.width=1", *DATA), "only train.*",
        "gndgl compile SPEC --set")


def test_units_version_and_help(work):
    r = gndgl(work, "units", "resnet20")
    assert r.returncode == 0 and "s1.b0" in r.stdout and "s3.b2" in r.stdout
    bad(gndgl(work, "units", "resnet21"), "neither a template", "resnet20")
    from gndgl_compiler import __version__
    assert gndgl(work, "--version").stdout.strip() == f"gndgl {__version__}"
    r = gndgl(work, "train", "--help")
    assert r.returncode == 0 and "<bool>" not in r.stdout and "--set" in r.stdout


def test_resume_applies_or_refuses_options_and_extends(work):
    r = gndgl(work, "train", "compiled/tiny", *DATA, "--run-dir", "runs/ext", "--set", "train.optimizer.momentum=0.5")
    assert r.returncode == 0, r.stderr
    saved = json.loads((work / "runs" / "ext" / "run.json").read_text())
    assert saved["config"]["optimizer"]["momentum"] == 0.5
    bad(gndgl(work, "train", "--resume", "runs/ext", "--batch-size", "8"), "--batch-size cannot change when resuming")
    bad(gndgl(work, "train", "--resume", "runs/ext", "--epochs", "1", "--lr", "0.1"), "--lr")
    r = gndgl(work, "train", "--resume", "runs/ext", "--epochs", "2", "--log-every", "1")
    assert r.returncode == 0, r.stderr
    assert "resuming from step 4 of 8" in r.stdout and "extended from 1 to 2 epochs" in r.stdout
    saved = json.loads((work / "runs" / "ext" / "run.json").read_text())
    assert saved["config"]["log_every"] == 1 and saved["config"]["extensions"][0]["from_epoch"] == 1
    assert saved["changes"][-1]["epochs"] == 2
    summary = json.loads((work / "runs" / "ext" / "summary.json").read_text())
    assert summary["epochs_done"] == 2 == summary["epochs_total"] and summary["steps"] == 8
    assert "done in" in r.stdout and "2/2 epochs" in r.stdout
    bad(gndgl(work, "train", "--resume", "runs/ext", "--epochs", "1"), "would shorten it")
