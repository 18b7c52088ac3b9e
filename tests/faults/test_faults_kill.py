"""Fault injection: a run SIGKILLed at any point, or interrupted by Ctrl-C, resumes exactly.

The guarantees (README, "Training"):

1. a run SIGKILLed at any point (mid-step, in the middle of writing a checkpoint, between
   its two files, while appending metrics, while pruning, ...) and resumed, again and again,
   ends with the weights of an uninterrupted run bit for bit (CPU, one thread);
4. Ctrl-C checkpoints, exits with status 130 and says how to resume.

(2.: ``test_faults_tamper.py``; 3.: ``test_faults_disk.py``; 5.: ``test_faults_tamper.py``
and ``test_faults_recompile.py``.)

The SIGKILLed runs are children forked from the helper process (``tests/fault_process.py``) whose
file system SIGKILLs them at the N-th occurrence of a kill point; Ctrl-C is tested on a plain
``python -m gndgl_cli.main`` subprocess. Kill points are drawn with a seeded RNG; rerun with another
draw with ``GNDGL_FAULT_SEED=<int> python -m pytest -q tests/faults/test_faults_kill.py -s`` (``-s`` shows
what was survived).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from fault_helpers import SEED, SETTINGS, TOTAL_STEPS, Result, _env, assert_ok, cli_job
from fault_process import FIRST, KILL_POINTS, LAST, NEEDS_CHECKPOINT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and /proc (Linux)")


# ---------------------------------------------------------------- 1. SIGKILL anywhere, resume, again


def kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """One draw of every kill point in random order, after FIRST and before LAST."""
    plan = [(p, rng.randint(1, hi)) for p, (_, hi) in KILL_POINTS.items() if p != LAST]
    rng.shuffle(plan)
    return [FIRST] + plan + [(LAST, 1)]


def test_sigkill_at_random_points_then_resume_is_exact(setup):
    """A run SIGKILLed 14 times (before its first checkpoint, then a draw of every kill point in random
    order), resumed after each kill, ends with the reference weights and metrics bit for bit."""
    work = setup.workdir("sigkill")
    run = work / "run"
    plan = kill_plan(random.Random(SEED))
    survived: list[str] = []
    while plan:
        point, n = plan[0]
        if point in NEEDS_CHECKPOINT and not any((run / "checkpoints").glob("*.json")) and len(plan) > 2:
            plan.insert(2, plan.pop(0))  # not reachable yet: draw it after the next kill
            continue
        plan.pop(0)
        argv = ["train", "--resume", run] if survived else ["train", setup.artifact, "--run-dir", run, *SETTINGS]
        (res,) = setup.driver.run(cli_job(f"kill{len(survived)}", work, *argv, faults={"kill": [point, n]}))
        assert res.signal == signal.SIGKILL, (f"kill point '{point}' #{n} ({KILL_POINTS[point][0]}) was not reached "
                                              f"(seed {SEED}):\n{res.describe()}")
        assert "Traceback" not in res.err, res.describe()
        survived.append(f"{point}#{n}")
    assert not (run / "summary.json").exists()
    (res,) = setup.driver.run(cli_job("final", work, "train", "--resume", run))
    assert_ok(res)
    setup.assert_matches_reference(run)
    assert not list(run.rglob("*.tmp")), "temp files of killed writes were left behind"
    print(f"\nsurvived {len(survived)} SIGKILLs (seed {SEED}): {', '.join(survived)}")
    assert len(survived) == len(KILL_POINTS) + 1


# ---------------------------------------------------------------- 4. Ctrl-C


def test_ctrl_c_checkpoints_exits_130_and_resumes_exactly(setup):
    work = setup.workdir("sigint")
    run = work / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gndgl_cli.main", "train", str(setup.artifact), "--run-dir",
                             str(run), *SETTINGS], cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not any((run / "checkpoints").glob("*.json")):
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be interrupted:\n" + "".join(proc.communicate())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = Result("ctrl-c", proc.returncode if proc.returncode >= 0 else None,
                 -proc.returncode if proc.returncode < 0 else None, out, err)
    assert res.exit == 130, res.describe()
    assert "Traceback" not in out + err, res.describe()
    assert f"gndgl train --resume {run}" in res.flat_err, res.describe()
    assert "error:" not in res.err, res.describe()  # a stop the user asked for is not an error
    step = int(res.flat_err.split("stopped at step ")[1].split(";")[0])
    assert 3 <= step < TOTAL_STEPS
    assert (run / "checkpoints" / f"ckpt-{step:09d}.json").is_file(), "no checkpoint at the interrupted step"
    assert not (run / "weights.safetensors").exists()
    (resumed,) = setup.driver.run(cli_job("resume", work, "train", "--resume", run))
    assert_ok(resumed)
    setup.assert_matches_reference(run)
