"""``gndgl train`` / ``gndgl eval`` as a user runs them: a real process per command.

Bad input must exit with code 2 and a one-paragraph message, never a traceback.
The commands of this module are started together (each in its own working
directory) and awaited once, so the interpreter start-ups overlap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image
from tiny_spec import tiny_spec
from paths import SPECS


TINY = tiny_spec("tiny_cli", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 1
  augment: null
""", num_classes='NUM_CLASSES', deep=False)

SMALL = ["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16", "--no-tensorboard"]

# id -> (argv after 'gndgl', substrings the error message must contain)
ERROR_CASES = {
    "unknown-dataset": (["train", "{spec}", "--dataset", "no-such-data", "--run-dir", "r", *SMALL],
                        ["unknown data set 'no-such-data'", "synthetic"]),
    "workers-unknown-dataset": (["train", "{spec}", "--dataset", "no-such-data", "--workers", "2", "--run-dir", "r",
                                 *SMALL], ["unknown data set 'no-such-data'"]),  # refused before a worker starts
    "run-dir-is-a-file": (["train", "{art}", "--run-dir", "{afile}", *SMALL], ["'{afile}' is a file", "--run-dir"]),
    "workers-run-dir-is-a-file": (["train", "{art}", "--workers", "2", "--run-dir", "{afile}", *SMALL],
                                  ["'{afile}' is a file"]),
    "data-root-missing": (["train", "{spec}", "--dataset", "fashion-mnist", "--data-root", "{missing}", "--run-dir",
                           "r", *SMALL], ["--data-root '{missing}' does not exist", "leave --data-root out"]),
    "workers-data-root-missing": (["train", "{art}", "--dataset", "mnist", "--data-root", "{missing}", "--workers",
                                   "2", "--run-dir", "r", *SMALL], ["--data-root '{missing}' does not exist"]),
    "workers-device-tpu": (["train", "{art}", "--workers", "2", "--device", "tpu", "--run-dir", "r", *SMALL],
                           ["unknown device 'tpu'"]),
    "resume-with-source": (["train", "{art}", "--resume", "{plain}"], ["would be ignored", "--resume {plain}"]),
    "device-cuda3": (["train", "{spec}", "--dataset", "synthetic", "--device", "cuda:3", "--run-dir", "r", *SMALL],
                     ["cuda:3", "--device"]),
    "device-tpu": (["train", "{spec}", "--dataset", "synthetic", "--device", "tpu", "--run-dir", "r", *SMALL],
                   ["tpu"]),
    "run-dir-not-empty": (["train", "{spec}", "--dataset", "synthetic", "--run-dir", "{nonempty}", *SMALL],
                          ["not empty", "--resume"]),
    "resume-not-a-run": (["train", "--resume", "{plain}"], ["not a gndgl run directory"]),
    "eval-not-a-run": (["eval", "{plain}"], ["not a gndgl run directory"]),
    "eval-no-runs": (["eval"], ["no run directory in 'runs/'", "pass one"]),
    "num-classes-mismatch": (["train", "{spec100}", "--dataset", "{folder}", "--run-dir", "r", *SMALL],
                             ["2 classes", "100", "num_classes: 2"]),
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gndgl_cli.main", *args]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1", **extra)
    return e


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start every command of this module at once; return {id: (returncode, stdout, stderr, cwd)}."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "tiny.yaml").write_text(TINY.replace("NUM_CLASSES", "10"))
    (tmp / "tiny100.yaml").write_text(TINY.replace("NUM_CLASSES", "100"))
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("not a run\n")
    (tmp / "nonempty").mkdir()
    (tmp / "nonempty" / "keep.txt").write_text("x\n")
    (tmp / "afile").write_text("a file, not a run directory\n")
    subprocess.run(cli("compile", str(tmp / "tiny.yaml"), "-o", str(tmp / "art")), env=env(), check=True,
                   capture_output=True)
    for split in ("train", "test"):  # a 2-class image folder
        for cls in ("cat", "dog"):
            (tmp / "folder" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp / "folder" / split / cls / f"{i}.png")
    subst = {"{spec}": str(tmp / "tiny.yaml"), "{spec100}": str(tmp / "tiny100.yaml"), "{folder}": str(tmp / "folder"),
             "{plain}": str(tmp / "plain"), "{nonempty}": str(tmp / "nonempty"), "{afile}": str(tmp / "afile"),
             "{art}": str(tmp / "art"), "{missing}": str(tmp / "missing")}
    cmds = {k: [subst.get(a, a) for a in argv] for k, (argv, _) in ERROR_CASES.items()}
    cmds["train-ok"] = ["train", str(SPECS / "resnet32_k2g2.yaml"), "--dataset", "synthetic",
                        "--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
                        "--run-dir", "tmp", "--no-tensorboard"]
    procs = {}
    for key, argv in cmds.items():
        cwd = tmp / key
        cwd.mkdir()
        procs[key] = (subprocess.Popen(cli(*argv), cwd=cwd, env=env(GNDGL_CACHE=str(tmp / "cache")),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cwd)
    out = {"_subst": subst}
    deadline = time.monotonic() + 300
    for key, (p, cwd) in procs.items():
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out[key] = (p.returncode, so, se, cwd)
    return out


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gives_a_clean_message(cli_runs, case):
    code, so, se, _ = cli_runs[case]
    text = so + se
    assert code != 0, text
    assert "Traceback" not in text, text
    assert "error:" in se, se
    flat = " ".join(se.split())  # rich may wrap the message
    for needle in ERROR_CASES[case][1]:
        for key, value in cli_runs["_subst"].items():
            needle = needle.replace(key, value)
        assert needle in flat, f"{needle!r} not in {flat!r}"


# Bad input must exit with status 2 (README; errors.py: "2 for bad input").
EXIT_CASES = sorted(ERROR_CASES)


@pytest.mark.parametrize("case", EXIT_CASES)
def test_bad_input_exits_with_status_2(cli_runs, case):
    code, so, se, _ = cli_runs[case]
    assert code == 2, f"exit {code}:\n{so + se}"


@pytest.mark.parametrize("case", ["unknown-dataset", "workers-unknown-dataset", "device-tpu", "data-root-missing",
                                  "workers-data-root-missing", "workers-device-tpu", "num-classes-mismatch"])
def test_a_start_that_fails_on_bad_input_leaves_no_run_directory(cli_runs, case):
    _, so, se, cwd = cli_runs[case]
    assert not (cwd / "r").exists() and not (cwd / "runs").exists(), so + se
    # nor a compiled artifact (that a later bare `gndgl train` would take as the newest one)
    assert not (cwd / "compiled").exists() or not any((cwd / "compiled").iterdir()), so + se


@pytest.mark.parametrize("case", [k for k in ERROR_CASES if k.startswith("workers-")])
def test_workers_bad_input_is_refused_before_any_worker_starts(cli_runs, case):
    """The launcher checks what every rank would refuse, so no rank (nor torchrun's report) is reached."""
    _, so, se, _ = cli_runs[case]
    assert "launching" not in so and "rank " not in se, so + se


def test_train_writes_a_complete_run(cli_runs):
    code, so, se, cwd = cli_runs["train-ok"]
    assert code == 0, so + se
    assert "Traceback" not in so + se
    assert "done" in so
    run = cwd / "tmp"
    for name in ("metrics.jsonl", "summary.json", "weights.safetensors", "run.json", "artifact/manifest.json"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("ckpt-*.json")) and list((run / "checkpoints").glob("ckpt-*.safetensors"))
    assert (cwd / "compiled" / "resnet32_k2g2" / "manifest.json").is_file()  # compiled on the fly
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 4 and summary["dataset"] == "synthetic"
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and kinds[-1] == "eval"


def test_eval_json(cli_runs):
    code, so, se, cwd = cli_runs["train-ok"]
    assert code == 0, so + se
    res = subprocess.run(cli("eval", "tmp", "--json"), cwd=cwd, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    ev = json.loads(res.stdout)
    assert ev["n"] == 32 and ev["source"] == "final weights"
    for key in ("test_acc", "ensemble_acc"):
        assert 0.0 <= ev[key] <= 1.0
    assert set(ev["partition_acc"]) == {"m1.g0", "m1.g1", "m2.g0", "m2.g1", "head"}
    assert all(0.0 <= a <= 1.0 for a in ev["partition_acc"].values())
    summary = json.loads((cwd / "tmp" / "summary.json").read_text())
    assert ev["test_acc"] == summary["test_acc"] and ev["ensemble_acc"] == summary["ensemble_acc"]


def test_eval_and_plot_default_to_the_newest_run(cli_runs, tmp_path):
    """Without an argument, `gndgl eval` and `gndgl plot` take the newest run under ./runs."""
    code, so, se, cwd = cli_runs["train-ok"]
    assert code == 0, so + se
    (tmp_path / "runs").mkdir()
    older = tmp_path / "runs" / "older"
    older.mkdir()
    (older / "run.json").write_text("{}")  # would fail to evaluate: must not be chosen
    os.utime(older / "run.json", (1, 1))
    (tmp_path / "runs" / "newest").symlink_to(cwd / "tmp")
    unstarted = tmp_path / "runs" / "unstarted"  # newer still, but its start failed before a step: passed over
    unstarted.mkdir()
    (unstarted / "run.json").write_text("{}")
    res = subprocess.run(cli("eval", "--json"), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["test_acc"] == json.loads((cwd / "tmp" / "summary.json").read_text())["test_acc"]
    res = subprocess.run(cli("plot", "-o", "curves.png"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=120)
    if importlib.util.find_spec("matplotlib") is None:  # a bare install: a clean message says what to install
        assert res.returncode == 2 and "pip install matplotlib" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        return
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_synthetic_data_takes_the_networks_shape_and_classes(tmp_path):
    """`--dataset synthetic` smoke-tests any spec: grey 28x28 with 100 classes trains as well."""
    spec = tmp_path / "grey100.yaml"
    spec.write_text(TINY.replace("NUM_CLASSES", "100").replace("[3, 32, 32]", "[1, 28, 28]"))
    res = subprocess.run(cli("train", str(spec), "--dataset", "synthetic", "--run-dir", "r", *SMALL),
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["complete"]
