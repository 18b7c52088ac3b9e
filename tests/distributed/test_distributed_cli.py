"""Bad input to ``gndgl train --workers``: exit 2, a clear message, no traceback, no worker left."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import DATA, DIST, gndgl, workers_alive

pytestmark = DIST


def test_zero_workers_is_rejected(art, tmp_path):
    r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "0", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2 and "Traceback" not in r.out, r.out[-2000:]
    assert "--workers" in r.out


def test_more_workers_than_partitions_is_rejected(art, tmp_path):
    r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "3", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2, r.out[-2000:]
    assert "Traceback" not in r.out
    assert "--workers 3 is more than the 2 partitions" in r.out and "--workers 2" in r.out
    assert not (tmp_path / "r").exists() and not workers_alive(str(tmp_path / "r"))


@pytest.fixture(scope="module")
def busy_port_run(art, tmp_path_factory):
    run = tmp_path_factory.mktemp("port") / "r"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "2", "--port", str(port), "--run-dir", str(run),
                  *DATA)
    return port, r, run


def test_busy_port_is_reported(busy_port_run):
    port, r, run = busy_port_run
    assert r.returncode != 0
    assert f"port {port} is in use" in r.out and "--port" in r.out
    assert "Traceback" not in r.out
    assert not workers_alive(str(run)) and not run.exists()


def test_busy_port_exits_2(busy_port_run):
    assert busy_port_run[1].returncode == 2


def test_workers_show_and_record_the_last_window(art, tmp_path):
    """A --max-steps stop between log steps: rank 0 prints the last window and every rank records it."""
    run = tmp_path / "r"
    r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "2", "--max-steps", "3", "--log-every", "2",
              "--batch-size", "16", "--run-dir", str(run), "--no-tensorboard", *DATA)
    assert r.returncode == 0 and "Traceback" not in r.out, r.out[-3000:]
    assert "epoch 1 step 2: loss" in r.out and "epoch 1 step 3: loss" in r.out
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at = {s: {x["partition"] for x in recs if x["kind"] == "train" and x["step"] == s} for s in (2, 3)}
    assert at[3] == at[2] and len(at[3]) >= 2  # both ranks' partitions, merged
    assert all(x.get("partial") for x in recs if x["step"] == 3)


def _worker(args: list[str], cwd: Path, rank: int, **env: str) -> subprocess.CompletedProcess:
    """One rank of ``python -m gndgl_compiler.worker`` as torchrun starts it (without joining a group)."""
    e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
             MASTER_PORT="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "gndgl_compiler.worker", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["ART", "--dataset", "nope", "--run-dir", "r"], "unknown data set 'nope'"),
    (["ART", "--run-dir", "afile"], "'afile' is a file"),
    (["ART", "--dataset", "mnist", "--data-root", "missing", "--run-dir", "r"], "--data-root 'missing' does not exist"),
    (["ART", "--resume", "r"], "would be ignored"),
    (["nowhere", "--run-dir", "r"], "'nowhere' does not exist"),
], ids=["dataset", "run-dir-file", "data-root", "artifact-with-resume", "no-artifact"])
def test_torchrun_worker_refuses_bad_input_before_joining(art, tmp_path, args, message):
    """Each rank checks its input before the rendezvous: exit 2 at once, one line (local rank 0 only), no
    traceback, no run directory, and the message in torchrun's error file (its report repeats it)."""
    (tmp_path / "afile").write_text("x\n")
    args = [str(art("resnet32_k2g1")) if a == "ART" else a for a in args]
    r0 = _worker(args, tmp_path, 0)
    assert r0.returncode == 2, r0.stdout + r0.stderr
    assert r0.stderr.startswith("rank 0: error:") and message in r0.stderr and "Traceback" not in r0.stderr
    assert len(r0.stderr.strip().splitlines()) == 1 and not r0.stdout
    r1 = _worker(args, tmp_path, 1, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    assert r1.returncode == 2 and not r1.stdout and not r1.stderr  # the same check: said once per node
    reported = json.loads((tmp_path / "error.json").read_text())["message"]
    assert reported["message"].startswith("rank 1: error:") and message in reported["message"]
    assert not (tmp_path / "r").exists()


def test_torchrun_report_names_the_ranks_error(art, tmp_path):
    """torchrun itself still prints its ChildFailedError report, but its root cause is the rank's message."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                        "gndgl_compiler.worker", str(art("resnet32_k2g1")), "--dataset", "nope", "--run-dir", "r"],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    # whichever rank fails first is reported; torchrun may stop the other before it prints
    assert re.search(r"rank [01]: error: unknown data set 'nope'", r.stderr), r.stderr[-2000:]
    root_cause = r.stderr.split("Root Cause")[-1]
    assert "error: unknown data set 'nope'" in root_cause and "To enable traceback" not in root_cause
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()
