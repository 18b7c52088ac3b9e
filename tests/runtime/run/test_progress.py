"""What a user sees while training and sweeping (issue 25, items 8, 9, 13, 14), through the CLI:
the run's real length under --max-steps, time per step and ETA, the loss legend, a progress line
by time in a pipe (``--progress-every``), ``gndgl sweep --seeds`` with mean ± std, and the
Python API's top-level names and field descriptions."""

from __future__ import annotations

import csv
import json
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import gndgl as run_gndgl
from tiny_spec import tiny_spec

TINY = tiny_spec("tiny_prog", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 1
  augment: null
""", deep=False)
DATA = ["--limit-train", "64", "--limit-test", "32", "--no-tensorboard"]


def gndgl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``gndgl ARGS`` as a real process, 200 columns wide (progress lines whole)."""
    return run_gndgl(cwd, *args, columns=200)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("prog")
    (d / "tiny.yaml").write_text(TINY)
    return d


def test_progress_shows_the_runs_real_length_pace_and_legend(work):
    """4 steps per epoch, --max-steps 3: the run is 3 steps long; the window line has s/step and an ETA."""
    r = gndgl(work, "train", "tiny.yaml", *DATA, "--max-steps", "3", "--log-every", "2", "--run-dir", "r1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "loss = mean of the partitions' local losses" in out
    line = next(x for x in out.splitlines() if x.startswith("epoch 1 step 2:"))
    assert "s/step" in line and "img/s" in line and "run 2/3, ETA 0:00:" in line, line
    assert "run 3/3, ETA 0:00:00" in out
    assert "/4 · run" not in out  # no time-based lines at the default interval (30 s)


def test_progress_line_by_time_in_a_pipe(work):
    """With no log window in the run (--log-every 100), --progress-every 0 still prints a line per step."""
    r = gndgl(work, "train", "tiny.yaml", *DATA, "--max-steps", "3", "--log-every", "100", "--progress-every", "0",
              "--run-dir", "r2")
    assert r.returncode == 0, r.stderr
    timed = [x for x in r.stdout.splitlines() if " · run " in x and x.startswith("epoch 1 step ") and ":" not in x[:16]]
    assert [x.split(" · ")[0] for x in timed] == ["epoch 1 step 1/3", "epoch 1 step 2/3", "epoch 1 step 3/3"], r.stdout
    assert "s/step · ETA" in timed[-1] and timed[-1].split(" · ")[1] == "run 3/3"
    assert "stopped in" in r.stdout


def test_progress_every_is_a_documented_option(work):
    r = gndgl(work, "train", "--help")
    assert r.returncode == 0 and "--progress-every" in r.stdout
    from gndgl_compiler.runtime.run.options import PROGRESS_EVERY_S, DisplayOptions
    assert DisplayOptions().progress_every == PROGRESS_EVERY_S == 30.0


def test_sweep_with_seeds_reports_mean_and_std(work):
    r = gndgl(work, "sweep", "tiny.yaml", "--depth", "1,2", "--width", "2", "--train", "--seeds", "0,1",
              "--max-steps", "2", "--lr", "0.01", "--set", "local.head.hidden=16", *DATA[:4], "-o", "sw",
              "--progress-every", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    flat = " ".join(r.stdout.split())
    assert "K=2 G=2 seed 1: training 5 partitions" in flat and "(seeds 0,1)" in flat and " ± " in flat
    assert "epoch 1 step 2/2 · run 2/2" in r.stdout  # per-step progress of each run
    table = (work / "sw" / "table.md").read_text()
    assert "mean ± std over seeds 0,1" in table and " ± " in table
    rows = list(csv.DictReader((work / "sw" / "table.csv").open()))
    assert len(rows) == 2 and all(row["seeds"] == "0,1" and float(row["test_acc_std"]) >= 0 for row in rows)
    for seed in (0, 1):
        run = work / "sw" / "runs" / f"tiny_prog_k2g2-s{seed}"
        saved = json.loads((run / "run.json").read_text())["config"]
        assert saved["seed"] == seed and saved["optimizer"]["lr"] == 0.01
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
    spec = json.loads((work / "sw" / "artifacts" / "tiny_prog_k2g2" / "spec.json").read_text())
    assert spec["local"]["head"]["hidden"] == 16


def test_sweep_training_options_without_train_are_refused(work):
    r = gndgl(work, "sweep", "tiny.yaml", "--depth", "1", "--width", "2", "--seeds", "0,1", "-o", "sw2")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "add --train" in r.stderr, r.stderr
    r = gndgl(work, "sweep", "tiny.yaml", "--train", "--seeds", "0,-1", "-o", "sw2")
    assert r.returncode == 2 and "--seeds" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_options_fields_are_described_in_help():
    from gndgl_compiler.runtime.run.options import TrainOptions, declared

    text = pydoc.render_doc(TrainOptions, renderer=pydoc.plaintext)
    assert "max_steps (int | None, default None) [--max-steps]: Stop after N steps" in text
    assert "on_log (" in text and "schemas in docs/api.md" in text
    assert "keep_checkpoints (int, default 2): How many" in text
    for name, *_ in declared(TrainOptions):
        assert any(line.strip(" |").startswith(f"{name} (") for line in text.splitlines()), name


def test_training_api_is_importable_from_the_package_lazily():
    from gndgl_compiler import TrainOptions, evaluate_run, train_artifact
    from gndgl_compiler.runtime.evaluation import evaluate
    from gndgl_compiler.runtime.run import options
    from gndgl_compiler.runtime import train

    assert (train_artifact, TrainOptions, evaluate_run) == (train.train_artifact, options.TrainOptions,
                                                            evaluate.evaluate_run)
    code = "import sys, gndgl_compiler; print('gndgl_compiler.runtime.train' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
