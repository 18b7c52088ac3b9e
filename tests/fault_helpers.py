"""The pytest side of the fault-injection tests (``tests/faults/``): the tiny spec and the
command-line settings every run uses, the helper process as seen from pytest (``Driver``: the
process itself is ``tests/fault_process.py``), the jobs it runs (``cli_job``) and their checks.

The shared session fixture ``setup`` (compiled artifact, helper process, uninterrupted reference
run) is ``tests/fault_fixtures.py``.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_spec import tiny_spec
from paths import TESTS

SEED = int(os.environ.get("GNDGL_FAULT_SEED", "20250611"))

# A small GN-DGL net (K=2, G=2, sharing, diversity, separate 1c2f head) with SGD + augmentation, so a
# resume must restore the optimizer, the RNG, the data position and the metrics window exactly.
SPEC = tiny_spec("tiny_faults", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 3
  optimizer: {kind: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  schedule: {kind: cosine, warmup_epochs: 0.5, warmup_start_lr: 0.01}
  augment: {crop_pad: 4, flip: true}
  seed: SEED
""", deep=False)
# 256 images / batch 16 = 16 steps per epoch, 3 epochs = 48 steps; a checkpoint every 3 steps and at
# every epoch end (keep 2); 5 partitions log every 2 steps.
SETTINGS = ["--dataset", "synthetic", "--limit-train", "256", "--limit-test", "32", "--batch-size", "16",
            "--epochs", "3", "--checkpoint-every", "3", "--log-every", "2", "--no-tensorboard"]
TOTAL_STEPS = 48


@dataclass
class Result:
    name: str
    exit: int | None
    signal: int | None
    out: str
    err: str

    @property
    def flat_err(self) -> str:
        """stderr with line breaks and repeated spaces removed (rich may wrap)."""
        return " ".join(self.err.split())

    def describe(self) -> str:
        how = f"exit {self.exit}" if self.signal is None else f"signal {self.signal}"
        return f"[{self.name}: {how}]\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}"


def _drop_dac_override() -> None:
    """preexec_fn: let the helper process (root) honour file permissions, so read-only means read-only."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, dropped from the bounding set before exec
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; failure is detected by the read-only probe


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1", PYTHONDONTWRITEBYTECODE="1")
    return env


class Driver:
    """The helper process, seen from pytest."""

    def __init__(self, workdir: Path):
        self.log = open(workdir / "driver.log", "w")
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fault_process; fault_process._driver_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=_env(), cwd=workdir,
                                     preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)

    def run(self, *jobs: dict, timeout: float = 240) -> list[Result]:
        self.proc.stdin.write(json.dumps(list(jobs)) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the helper process did not answer (see {self.log.name})")
        out = []
        for job, status in zip(jobs, json.loads(line)):
            cwd = Path(job["cwd"])
            out.append(Result(job["name"], status["exit"], status["signal"],
                              (cwd / f"{job['name']}.out").read_text(errors="replace"),
                              (cwd / f"{job['name']}.err").read_text(errors="replace")))
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def cli_job(name: str, cwd: Path, *argv, faults: dict | None = None, timeout: int = 120) -> dict:
    return {"kind": "cli", "name": name, "cwd": str(cwd), "argv": [str(a) for a in argv], "faults": faults or {},
            "timeout": timeout}


def assert_clean_cli_error(res: Result, code: int, *needles: str) -> None:
    assert res.signal is None and res.exit == code, res.describe()
    assert "Traceback" not in res.out + res.err, res.describe()
    assert "error:" in res.err, res.describe()
    for needle in needles:
        assert needle in res.flat_err, f"{needle!r} is not in the message\n{res.describe()}"


def assert_ok(res: Result) -> None:
    assert res.signal is None and res.exit == 0, res.describe()
    assert "Traceback" not in res.out + res.err, res.describe()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"{len(bad)} of {len(wa)} tensors differ, e.g. {bad[:5]}"
    assert a.read_bytes() == b.read_bytes()


def comparable_metrics(run: Path) -> list[tuple]:
    from gndgl_compiler.runtime.metrics import read_metrics

    out = []
    for r in read_metrics(run):
        out.append(tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("images_per_s", "wall_s"))))
    return out


@dataclass
class Setup:
    driver: Driver
    root: Path
    artifact: Path
    reference: Path
    """The run directory of the uninterrupted reference run."""

    def ref_weights(self) -> Path:
        return self.reference / "weights.safetensors"

    def workdir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir()
        return d

    def assert_matches_reference(self, run: Path) -> None:
        assert_same_weights(self.ref_weights(), run / "weights.safetensors")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and summary["steps"] == TOTAL_STEPS
        assert comparable_metrics(run) == comparable_metrics(self.reference), "the metrics log differs"
