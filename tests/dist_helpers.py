"""Helpers of the distributed tests (``tests/distributed/``): run ``gndgl`` and the
launcher in this process with everything printed captured, train the single-process reference,
compare weights, find orphan workers. Fixtures: ``tests/dist_fixtures.py``.

Starting a Python process with torch costs ~2.5 s of CPU here, so ``gndgl`` commands run in this
process (``gndgl_cli.main.main``, exit code and all output captured, worker processes included);
the workers are real processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from paths import REPO, TESTS

DIST = [pytest.mark.slow,
        pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                           reason="needs torch.distributed with the gloo backend")]
"""The ``pytestmark`` of every distributed test module."""

PY = sys.executable
DATA = ["--dataset", "synthetic", "--limit-train", "128", "--limit-test", "64", "--epochs", "1"]


@contextlib.contextmanager
def worker_env(**values: str | None):
    """Set (or, with None, remove) environment variables for the worker processes, then restore them."""
    values = {"GNDGL_BACKEND": "gloo", "GNDGL_TEST_FAULT": None, "GNDGL_WORKER_MODULE": None, **values}
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def single_thread():
    """One intra-op thread in this process (the ranks run with one too), then the old count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Result:
    """What a captured ``gndgl`` command or launch did."""

    returncode: int
    out: str
    """Everything printed: this process' stdout/stderr and the worker processes' (fd 1 and 2)."""
    wall: float


@contextlib.contextmanager
def faulty_workers(fault: str | None):
    """With ``fault`` (``kind:RANK:STEP``), the launcher's ranks run ``tests/fault_worker.py`` (the real
    worker with a fault-injecting Transport; named by ``GNDGL_WORKER_MODULE``); without, the real worker."""
    if fault is None:
        with worker_env():
            yield
        return
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    with worker_env(GNDGL_TEST_FAULT=fault, GNDGL_WORKER_MODULE="fault_worker", PYTHONPATH=path):
        yield


def gndgl(*args: str, fault: str | None = None) -> Result:
    """``gndgl ARGS`` run by ``gndgl_cli.main.main`` in this process; an escaping exception counts as a traceback."""
    from gndgl_cli.main import main

    return captured(lambda: main(list(args)), fault)


def captured(fn, fault: str | None = None) -> Result:
    """Call ``fn()`` with everything printed captured (worker processes included): exit code, output, wall."""
    buf = io.StringIO()
    t0 = time.time()
    with tempfile.TemporaryFile() as fds, faulty_workers(fault), single_thread():
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fds.fileno(), 1)
        os.dup2(fds.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    fn()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:  # noqa: BLE001 - the real command would die with this traceback
                    buf.write(traceback.format_exc())
                    code = 1
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fds.seek(0)
        out = buf.getvalue() + fds.read().decode(errors="replace")
    return Result(code, out, time.time() - t0)


def launch_run(art: Path, run_dir: Path, workers: int, batch: int, *extra: str) -> None:
    """``launch_local(workers, ..., threads=1)`` (workers give up on a silent peer after 60 s)."""
    from gndgl_compiler.runtime.dist.launch import launch_local

    args = [str(art), "--run-dir", str(run_dir), *DATA, "--batch-size", str(batch), "--timeout", "60", *extra]
    with worker_env():
        launch_local(workers, args, threads=1)


def split_modules(plan, workers: int) -> frozenset[int]:
    """Modules whose partitions the placement for ``workers`` ranks puts on more than one rank."""
    from gndgl_compiler.partition.placement import place

    place(plan, plan.devices, workers)
    ranks: dict[int, set[int]] = {}
    for p in plan.partitions:
        ranks.setdefault(p.module, set()).add(p.worker)
    return frozenset(m for m, r in ranks.items() if len(r) > 1)


def train_single(art: Path, run_dir: Path, batch: int, fused: bool | None = None,
                 split: frozenset[int] | None = None) -> dict[str, torch.Tensor]:
    """One process (this one), one intra-op thread, the modules fused or not as the ranks run them
    (bit-for-bit comparable): with ``split`` (modules whose siblings a distributed run spreads over
    ranks) those run per partition and the others sibling-fused; without, every module per partition."""
    from gndgl_compiler import load_artifact
    from gndgl_compiler.runtime.run.config import new_run_config
    from gndgl_compiler.runtime.dist.context import LocalContext
    from gndgl_compiler.runtime.run.directory import create_run
    from gndgl_compiler.runtime.train import TrainOptions, Trainer

    class FuseAsRanksDo(LocalContext):
        """One process whose modules fuse as a distributed run's ranks fuse them (``split`` never)."""

        def fuse_siblings(self, setting: bool) -> bool | frozenset[int]:
            if not setting or split is None:
                return setting
            return frozenset(p.module for p in loaded.plan.partitions) - split

    opts = TrainOptions(dataset="synthetic", limit_train=128, limit_test=64, epochs=1, batch_size=batch, fused=fused,
                        fuse_siblings=split is not None, run_dir=str(run_dir), tensorboard=False)
    with single_thread():
        loaded = load_artifact(art)
        config = new_run_config(loaded.spec["train"], opts)
        Trainer(loaded, config, create_run(loaded, config, opts.run_dir), FuseAsRanksDo()).fit()
    return load_file(str(run_dir / "weights.safetensors"))


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final ``weights.safetensors`` of a run directory."""
    return load_file(str(run_dir / "weights.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same tensor names, every tensor ``torch.equal`` (bit for bit)."""
    assert sorted(a) == sorted(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} of {len(a)} tensors differ, e.g. {diff[:4]}"


def workers_alive(marker: str) -> list[int]:
    """PIDs of live ``gndgl_compiler.worker`` processes whose command line contains ``marker`` (via /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if "gndgl_compiler.worker" in cmd and marker in cmd and "zombie" not in state:
            pids.append(int(d.name))
    return pids


def orphans(marker: str, wait_s: float = 3.0) -> list[int]:
    """The workers of ``marker`` still alive after up to ``wait_s`` seconds."""
    deadline = time.time() + wait_s
    while (alive := workers_alive(marker)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def run_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's (merged) ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def resume_run(run: Path, workers: int) -> None:
    """``launch_local(workers, --resume RUN, threads=1)``."""
    from gndgl_compiler.runtime.dist.launch import launch_local

    with worker_env():
        launch_local(workers, [str(run / "artifact"), "--resume", str(run), "--timeout", "60"], threads=1)


TRAIN2 = ["--workers", "2", *DATA, "--batch-size", "16", "--log-every", "1"]  # resnet32_k2g1: 8 steps


TRAIN2 = ["--workers", "2", *DATA, "--batch-size", "16", "--log-every", "1"]  # resnet32_k2g1: 8 steps


def torchrun(cmd: list[str], env: dict, run: Path, timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` (a ``torch.distributed.run`` command line) run from the repository, its output captured; the test
    is skipped where torchrun cannot work here: it does not finish in ``timeout`` s, or it fails before the run
    directory ``run`` exists with a rendezvous / socket / name-resolution error (an offline machine)."""
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"torchrun did not finish in {timeout} s (no rendezvous offline?)")
    if r.returncode != 0 and not (run / "run.json").exists() and re.search(
            r"[Rr]endezvous|socket|resolve|getaddrinfo", r.stderr):
        pytest.skip(f"torchrun cannot rendezvous here: {r.stderr.strip().splitlines()[-1][:200]}")
    return r


def replica_net(bn: bool) -> str:
    """The replica tests' net (YAML): two conv modules, two sibling partitions each, linear heads and final head,
    ``placement.replicas: 2``; with ``bn`` a BatchNorm after each conv (else no BatchNorm anywhere)."""
    norm = ["    - {op: bn, name: b%d}" % i if bn else "" for i in (1, 2)]
    layers = ["    - {op: conv, name: c1, out: 8}", norm[0], "    - {op: relu, name: r1}",
              "    - {op: conv, name: c2, out: 8}", norm[1], "    - {op: relu, name: r2}",
              "    - {op: adaptive_avgpool, name: gap}", "    - {op: flatten, name: fl}",
              "    - {op: linear, name: fc, out: 10}"]
    return "\n".join([f"name: {'bnnet' if bn else 'nobn'}", "model:", "  input_shape: [3, 8, 8]", "  num_classes: 10",
                      "  layers:", *filter(None, layers), "cuts: {depth: [c2], width: 2}",
                      "local: {head: {kind: linear}, final_head: {kind: linear}}", "placement: {replicas: 2}",
                      "train: {batch_size: 16, optimizer: {kind: sgd, lr: 0.05, momentum: 0.9}}", ""])


REPLICA_TRAIN = ["--dataset", "synthetic", "--limit-train", "320", "--limit-test", "32", "--epochs", "1",
                 "--timeout", "90"]
"""The replica tests' runs: 20 steps of the global batch 16."""


def train_replica_net(art, bn: bool, run: Path, *extra: str) -> Result:
    """``gndgl train`` of :func:`replica_net` (compiled once per session) into ``run``; asserts it succeeded."""
    res = gndgl("train", str(art("bnnet" if bn else "nobn", replica_net(bn))), "--run-dir", str(run),
                *REPLICA_TRAIN, *extra)
    assert res.returncode == 0, res.out[-4000:]
    return res
