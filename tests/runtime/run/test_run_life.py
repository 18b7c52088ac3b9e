"""A run's life through the CLI (issue 25): the last, partial log window is recorded at a stop and
replaced on resume, bare ``gndgl plot`` / ``eval`` skip runs with nothing to show (saying so), eval
does not call mid-schedule weights final, ``wall_s`` adds up over a resume, a failed ``gndgl train
SPEC`` puts the artifact it replaced back, and ``--data-root`` is never silently ignored.

Every command is a real ``gndgl`` process; bad input exits 2 with an ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from cli_helpers import gndgl as run_gndgl
from tiny_spec import ONE_EPOCH, tiny_spec

TINY = tiny_spec("tiny_life", ONE_EPOCH, deep=False)
DATA = ["--limit-train", "64", "--limit-test", "32", "--no-tensorboard"]  # 4 steps per epoch


def gndgl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``gndgl ARGS`` as a real process, 200 columns wide (progress lines whole)."""
    return run_gndgl(cwd, *args, columns=200)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return r


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("life")
    (d / "tiny.yaml").write_text(TINY)
    ok(gndgl(d, "compile", "tiny.yaml"))
    return d


def test_stop_records_the_last_window_and_resume_replaces_it(work):
    r = ok(gndgl(work, "train", "compiled/tiny", *DATA, "--max-steps", "3", "--run-dir", "runs/stopped"))
    assert "epoch 1 step 3:" in r.stdout
    run = work / "runs" / "stopped"
    last = [x for x in records(run) if x["step"] == 3]
    assert len(last) == 5 and all(x["kind"] == "train" and x["partial"] for x in last)  # one per partition
    wall_before = json.loads((run / "checkpoints" / "ckpt-000000003.json").read_text())["state"]["wall_s"]
    assert json.loads((run / "summary.json").read_text())["wall_s"] >= wall_before > 0
    r = ok(gndgl(work, "train", "--resume", "runs/stopped", "--epochs", "2", "--max-steps", "7"))
    assert "epoch 2 step 7:" in r.stdout
    recs = records(run)
    assert [x["step"] for x in recs if x["kind"] == "train" and x.get("partial")] == [7] * 5  # step 3's: replaced
    assert sorted({x["step"] for x in recs if x["kind"] == "train"}) == [2, 4, 6, 7]
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["complete"] and summary["steps"] == 7
    assert summary["wall_s"] > wall_before  # this attempt's time added to the first one's, not in its place
    r = ok(gndgl(work, "eval", "runs/stopped"))
    assert "final weights" not in r.stdout and "weights of step 7, not final" in " ".join(r.stdout.split())


def test_bare_plot_and_eval_skip_runs_with_nothing_to_show(work):
    ok(gndgl(work, "train", "compiled/tiny", *DATA, "--run-dir", "runs/a-complete"))
    ok(gndgl(work, "train", "compiled/tiny", *DATA, "--max-steps", "1", "--log-every", "5", "--run-dir",
             "runs/b-one-step"))
    assert records(work / "runs" / "b-one-step"), "the one-step run's only window was not recorded"
    empty = work / "runs" / "c-never-started"  # newest: a start that died before its first step
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    r = ok(gndgl(work, "eval"))
    assert "runs/b-one-step (weights of step 1, not final" in " ".join(r.stdout.split())
    assert "skipped 1 newer run(s)" in r.stderr and "c-never-started (no weights or checkpoints yet)" in r.stderr
    r = gndgl(work, "plot", "-o", "curves.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert r.returncode == 2 and "pip install matplotlib" in r.stderr
        return
    ok(r)
    assert "c-never-started (no metrics records yet)" in r.stderr and "runs/b-one-step" in r.stderr
    assert (work / "curves.png").stat().st_size > 1000


def test_eval_calls_a_finished_runs_weights_final(work):
    ok(gndgl(work, "train", "compiled/tiny", *DATA, "--run-dir", "runs/finished"))
    r = ok(gndgl(work, "eval", "runs/finished"))
    assert "(final weights, 32 test images)" in r.stdout


def test_failed_train_of_a_spec_restores_the_artifact_it_replaced(tmp_path):
    """The failed-compile-then-train case: a later bare `gndgl train` trains the artifact compiled before."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    ok(gndgl(tmp_path, "compile", "tiny.yaml"))
    before = (tmp_path / "compiled" / "tiny" / "spec.json").read_text()
    for split in ("train", "test"):  # a 2-class image folder: the 10-class spec no longer fits it
        for cls in ("cat", "dog"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "folder" / split / cls / f"{i}.png")
    r = gndgl(tmp_path, "train", "tiny.yaml", "--set", "train.batch_size=2", "--dataset", "folder", *DATA)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "compiled" / "tiny" / "spec.json").read_text() == before
    assert [p.name for p in (tmp_path / "compiled").iterdir()] == ["tiny"]
    r = ok(gndgl(tmp_path, "train", *DATA, "--max-steps", "1"))
    assert "using compiled/tiny/" in r.stderr
    assert json.loads((tmp_path / "compiled" / "tiny" / "spec.json").read_text())["train"]["batch_size"] == 16


def test_data_root_without_the_data_warns_naming_what_was_used(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file() and \
            not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    (tmp_path / "tiny.yaml").write_text(TINY.replace("[3, 32, 32]", "[1, 28, 28]"))
    (tmp_path / "empty").mkdir()
    r = ok(gndgl(tmp_path, "train", "tiny.yaml", "--dataset", "fashion-mnist", "--data-root", "empty", *DATA,
                 "--max-steps", "1"))
    flat = " ".join(r.stderr.split())
    assert "warning: fashion-mnist is not in --data-root empty" in flat
    assert "using the copy in /usr/share/datasets/fashion-mnist" in flat
