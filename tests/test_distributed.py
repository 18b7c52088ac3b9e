"""Distributed training on CPU (gloo, 2-3 local worker processes).

- same numbers: N workers end with weights ``torch.equal`` to one process (same seed,
  same intra-op thread count: 1 everywhere; CPU conv kernels round differently with 2) that
  runs sibling-fused exactly the modules whose siblings sit whole on one rank;
- committed checkpoints: stop mid-epoch, resume with ``--workers 2``, same weights as an
  uninterrupted run (on 3 ranks with a sibling-fused module: as one process, ``dist_run``);
  ``gndgl eval`` and merged ``metrics.jsonl`` afterwards;
- faults (a fault-injecting Transport, ``tests/fault_worker.py``: kill|hang|raise at RANK:STEP,
  installed as the launcher's worker module): bounded exit, a message naming the
  rank and its partitions, no orphan worker, a loadable committed checkpoint, resumable;
- bad input to ``gndgl train --workers``: exit 2, a clear message, no traceback;
- the torchrun entry point (``python -m torch.distributed.run ... -m gndgl_compiler.worker``).

Every run is small (synthetic data, 128 training images, batches of 16/32). Starting a
Python process with torch costs ~2.5 s of CPU here, so ``gndgl`` commands run in this
process (``gndgl_cli.main.main``, exit code and all output captured, worker processes
included) except ``gndgl eval`` once as a real command; the workers are real processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
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

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with the gloo backend")]

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DATA = ["--dataset", "synthetic", "--limit-train", "128", "--limit-test", "64", "--epochs", "1"]


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (or, with None, remove) environment variables for the worker processes, then restore them."""
    values = {"GNDGL_BACKEND": "gloo", "GNDGL_TEST_FAULT": None, **values}
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
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Result:
    returncode: int
    out: str
    """Everything printed: this process' stdout/stderr and the worker processes' (fd 1 and 2)."""
    wall: float


@contextlib.contextmanager
def _faulty_workers(fault: str | None):
    """With ``fault`` (``kind:RANK:STEP``), the launcher's ranks run ``tests/fault_worker.py`` (the real
    worker with a fault-injecting Transport); without, the real worker."""
    from gndgl_compiler.runtime import launch

    if fault is None:
        with _environ():
            yield
        return
    saved = launch.WORKER_MODULE
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    launch.WORKER_MODULE = "fault_worker"
    try:
        with _environ(GNDGL_TEST_FAULT=fault, PYTHONPATH=path):
            yield
    finally:
        launch.WORKER_MODULE = saved


def _gndgl(*args: str, fault: str | None = None) -> Result:
    """``gndgl ARGS`` run by ``gndgl_cli.main.main`` in this process; an escaping exception counts as a traceback."""
    from gndgl_cli.main import main

    return _captured(lambda: main(list(args)), fault)


def _captured(fn, fault: str | None = None) -> Result:
    """Call ``fn()`` with everything printed captured (worker processes included): exit code, output, wall."""
    buf = io.StringIO()
    t0 = time.time()
    with tempfile.TemporaryFile() as fds, _faulty_workers(fault), _one_thread():
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


def _launch(art: Path, run_dir: Path, workers: int, batch: int, *extra: str) -> None:
    """``launch_local(workers, ..., threads=1)`` (workers give up on a silent peer after 60 s)."""
    from gndgl_compiler.runtime.launch import launch_local

    args = [str(art), "--run-dir", str(run_dir), *DATA, "--batch-size", str(batch), "--timeout", "60", *extra]
    with _environ():
        launch_local(workers, args, threads=1)


@contextlib.contextmanager
def _per_partition(modules: frozenset[int]):
    """The executors built in this process run ``modules`` per partition (as a rank does with a
    module whose siblings sit on other ranks); the other modules fuse where they can."""
    from gndgl_compiler.runtime import executor
    from gndgl_compiler.runtime.fused import NotFusable

    real = executor.FusedStage

    def fused_stage(mods):
        if mods[0].part.module in modules:
            raise NotFusable("siblings on other ranks in the distributed run")
        return real(mods)

    executor.FusedStage = fused_stage
    try:
        yield
    finally:
        executor.FusedStage = real


def split_modules(plan, workers: int) -> frozenset[int]:
    """Modules whose partitions the placement for ``workers`` ranks puts on more than one rank."""
    from gndgl_compiler.partition.placement import place

    place(plan, plan.devices, workers)
    ranks: dict[int, set[int]] = {}
    for p in plan.partitions:
        ranks.setdefault(p.module, set()).add(p.worker)
    return frozenset(m for m, r in ranks.items() if len(r) > 1)


def _single(art: Path, run_dir: Path, batch: int, fused: bool | None = None,
            split: frozenset[int] | None = None) -> dict[str, torch.Tensor]:
    """One process (this one), one intra-op thread, the modules fused or not as the ranks run them
    (bit-for-bit comparable): with ``split`` (modules whose siblings a distributed run spreads over
    ranks) those run per partition and the others sibling-fused; without, every module per partition."""
    from gndgl_compiler.runtime.train import TrainOptions, train_artifact

    with _one_thread(), _per_partition(split or frozenset()):
        train_artifact(art, TrainOptions(dataset="synthetic", limit_train=128, limit_test=64, epochs=1,
                                         batch_size=batch, fused=fused, fuse_siblings=split is not None,
                                         run_dir=str(run_dir), tensorboard=False))
    return load_file(str(run_dir / "weights.safetensors"))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "weights.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} of {len(a)} tensors differ, e.g. {diff[:4]}"


def _workers_alive(marker: str) -> list[int]:
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


def _orphans(marker: str, wait_s: float = 3.0) -> list[int]:
    deadline = time.time() + wait_s
    while (alive := _workers_alive(marker)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """``art(name)``: ``specs/<name>.yaml`` compiled once per module (or ``art(name, spec_dict)``)."""
    from gndgl_compiler import compile_spec

    base = tmp_path_factory.mktemp("artifacts")
    cache: dict[str, Path] = {}

    def get(name: str, spec=None) -> Path:
        if name not in cache:
            cache[name] = compile_spec(spec if spec is not None else ROOT / "specs" / f"{name}.yaml", base / name).path
        return cache[name]

    return get


@pytest.fixture(scope="module")
def single(art, tmp_path_factory):
    """``single(name, batch, fused, split)``: single-process weights (one thread), cached (``_single``)."""
    base = tmp_path_factory.mktemp("single")
    cache: dict[tuple, dict] = {}

    def get(name: str, batch: int, fused: bool | None = None, split: frozenset[int] | None = None
            ) -> dict[str, torch.Tensor]:
        key = (name, batch, fused, split)
        if key not in cache:
            tag = "pp" if split is None else "-".join(map(str, sorted(split))) or "all"
            cache[key] = _single(art(name), base / f"{name}-{batch}-{fused}-{tag}", batch, fused, split)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def dist_run(art, tmp_path_factory):
    """``dist_run(name, workers, fused)``: a finished ``launch_local`` run (threads 1, batches of 32), cached.
    resnet32_k2g2 on 3 ranks (m1 sibling-fused on rank 0) is stopped after 2 of its 4 steps (committing
    every step) and resumed, so the comparison with one process also checks that fused ranks resume
    exactly; ``get.printed[key]`` is what the ranks of the first launch printed."""
    base = tmp_path_factory.mktemp("dist")
    cache: dict[tuple, Path] = {}

    def get(name: str, workers: int, fused: bool | None) -> Path:
        key = (name, workers, fused)
        if key not in cache:
            run = base / f"{name}-{workers}-{fused}"
            extra = ["--no-fused"] if fused is False else []
            stop = key == ("resnet32_k2g2", 3, None)
            if stop:
                extra += ["--max-steps", "2", "--checkpoint-every", "1"]
            r = _captured(lambda: _launch(art(name), run, workers, 32, *extra))
            assert r.returncode == 0, r.out[-4000:]
            get.printed[key] = r.out
            if stop:
                assert json.loads((run / "summary.json").read_text())["steps"] == 2
                r = _captured(lambda: _resume(run, workers))
                assert r.returncode == 0, r.out[-4000:]
            cache[key] = run
        return cache[key]

    get.printed = {}
    return get


def _resume(run: Path, workers: int) -> None:
    """``launch_local(workers, --resume RUN, threads=1)``."""
    from gndgl_compiler.runtime.launch import launch_local

    with _environ():
        launch_local(workers, [str(run / "artifact"), "--resume", str(run), "--timeout", "60"], threads=1)


TRAIN2 = ["--workers", "2", *DATA, "--batch-size", "16", "--log-every", "1"]  # resnet32_k2g1: 8 steps


@pytest.fixture(scope="module")
def reference_run(art, tmp_path_factory):
    """An uninterrupted ``gndgl train --workers 2`` run of resnet32_k2g1 (8 steps)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = _gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2)
    assert r.returncode == 0, r.out[-4000:]
    return run


@pytest.fixture(scope="module")
def resumed_run(art, tmp_path_factory):
    """The same run stopped after 5 steps (checkpoints every 2), then ``gndgl train --resume RUN --workers 2``."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    first = _gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2, "--max-steps", "5",
                   "--checkpoint-every", "2")
    assert first.returncode == 0, first.out[-4000:]
    stopped = json.loads((run / "summary.json").read_text())
    commits = sorted(p.name for p in (run / "checkpoints").glob("commit-*.json"))
    second = _gndgl("train", "--resume", str(run), "--workers", "2")
    assert second.returncode == 0, second.out[-4000:]
    return {"run": run, "stopped": stopped, "commits": commits}


@pytest.fixture(scope="module")
def fault_runs(art, tmp_path_factory):
    """``fault_runs(kind)``: ``gndgl train --workers 2 --timeout 5``, rank 1 faulting at step 3 (cached)."""
    base = tmp_path_factory.mktemp("faults")
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            run = base / kind
            r = _gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2, "--checkpoint-every", "1",
                       "--timeout", "5", fault=f"{kind}:1:3")
            cache[kind] = {"run": run, "result": r, "orphans": _orphans(str(run))}
        return cache[kind]

    return get


# --------------------------------------------------------------------------------------------- same numbers
@pytest.mark.parametrize("name,workers,fused", [
    ("resnet32_k2g1", 2, None),    # DGL, joint final head, spec default (fused)
    ("resnet32_k2g2", 2, False),   # GN-DGL, sharing + diversity, unfused per-partition steps
    ("resnet32_k2g2", 3, None),    # 5 partitions on 3 ranks: m1 fused on rank 0, m2.g0 | m2.g1 share, exchange;
                                   # stopped after 2 steps and resumed (dist_run)
    ("vit_tiny_fmnist_k2g2", 2, None),  # a width-cut ViT: group-wise placement, token slices and diversity travel
], ids=["k2g1-2w-fused", "k2g2-2w-unfused", "k2g2-3w-fused", "vit-k2g2-2w-fused"])
def test_distributed_matches_single_process(art, single, dist_run, name, workers, fused):
    from gndgl_compiler import load_artifact
    from gndgl_compiler.partition.placement import place

    a = load_artifact(art(name), verify=False)
    assert a.spec["train"]["fused"] is True  # the single process' default, so fused=None means fused
    place(a.plan, a.plan.devices, workers)
    assert len({p.worker for p in a.plan.partitions}) == workers
    if workers > 2 or name.startswith("vit"):  # siblings on different ranks: shared slices and diversity travel
        owner = {p.id: p.worker for p in a.plan.partitions}
        assert any(owner[s.source] != owner[p.id] for p in a.plan.partitions for s in p.shares)
        assert any(owner[s] != owner[p.id] for p in a.plan.partitions for s in p.siblings
                   if p.loss.diversity_weight > 0)

    # a module whose siblings all sit on one rank runs sibling-fused there, as in one process
    split = split_modules(a.plan, workers)
    whole = {p.module for p in a.plan.partitions if p.groups > 1} - split
    assert bool(whole) == (name == "resnet32_k2g2" and workers == 3)
    run = dist_run(name, workers, fused)
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["world"] == workers and cfg["config"]["fused"] is (fused is not False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 4
    _assert_same_weights(_weights(run), single(name, 32, fused, split if whole and fused is not False else None))


def test_distributed_matches_single_process_with_dropout(art, tmp_path):
    import yaml

    spec = yaml.safe_load((ROOT / "specs" / "vgg6a_dgl.yaml").read_text())
    spec["model"]["width"] = 0.125
    assert spec["model"]["dropout"] > 0
    path = art("vgg6a_dgl_w0125", spec)
    ref = _single(path, tmp_path / "single", 32)
    _launch(path, tmp_path / "dist", 2, 32)
    _assert_same_weights(_weights(tmp_path / "dist"), ref)


# --------------------------------------------------------------------------------------------- checkpoints
def test_resume_matches_uninterrupted_run(resumed_run, reference_run):
    assert resumed_run["stopped"]["steps"] == 5 and not resumed_run["stopped"]["complete"]
    assert resumed_run["commits"] == ["commit-000000004.json", "commit-000000005.json"]
    run = resumed_run["run"]
    assert json.loads((run / "summary.json").read_text())["complete"]
    for r in (0, 1):
        assert list((run / "checkpoints" / f"rank{r}").glob("ckpt-*.safetensors"))
    _assert_same_weights(_weights(run), _weights(reference_run))


def test_ranks_print_which_modules_run_fused(dist_run):
    """resnet32_k2g2 on 3 ranks: m1's siblings sit whole on rank 0 and run fused there (each partition's
    slice goes to rank 1 or 2), m2's are split over ranks 1 and 2; rank 0 prints every rank's line."""
    dist_run("resnet32_k2g2", 3, None)
    out = dist_run.printed[("resnet32_k2g2", 3, None)].splitlines()
    split = "per partition (siblings on other ranks): 2"
    for line in ["rank 0: sibling-fused modules: 1", f"rank 1: sibling-fused modules: none; {split}",
                 f"rank 2: sibling-fused modules: none; {split}"]:
        assert line in out, out[-40:]


def test_committed_checkpoint_is_loadable(resumed_run):
    from gndgl_compiler.runtime.dist_checkpoint import committed_checkpoint

    root = resumed_run["run"] / "checkpoints"
    assert sorted(root.glob("commit-*.json"))
    for r in (0, 1):
        ck = committed_checkpoint(root, r)
        assert ck is not None and ck.state["step"] == 8 and ck.tensors


def test_eval_and_merged_metrics_after_distributed_run(resumed_run):
    run = resumed_run["run"]
    r = subprocess.run([PY, "-m", "gndgl_cli.main", "eval", str(run), "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(r.stdout)
    assert set(ev["partition_acc"]) == {"m1.g0", "m2.g0"} and ev["source"] == "final weights"
    assert ev["test_acc"] == json.loads((run / "summary.json").read_text())["test_acc"]
    recs = _metrics(run)
    train = [x for x in recs if x["kind"] == "train"]
    assert {x["partition"] for x in train} == {"m1.g0", "m2.g0"}  # rank 0's and rank 1's partitions
    assert {x["step"] for x in train if x["partition"] == "m2.g0"} == set(range(1, 9))
    assert [x["step"] for x in recs] == sorted(x["step"] for x in recs)
    assert any(x["kind"] == "eval" for x in recs)


def test_metrics_have_no_duplicates_after_resume(resumed_run):
    seen = [(x["kind"], x["step"], x.get("partition")) for x in _metrics(resumed_run["run"])]
    dup = sorted({k for k in seen if seen.count(k) > 1})
    assert not dup, f"duplicated records: {dup[:6]}"


# --------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("kind", ["kill", "hang", "raise"])
def test_fault_stops_all_ranks_and_keeps_committed_checkpoint(fault_runs, kind):
    from gndgl_compiler.runtime.dist_checkpoint import committed_checkpoint

    f = fault_runs(kind)
    r, run = f["result"], f["run"]
    assert r.returncode != 0, r.out[-3000:]
    assert r.wall < 5 + 30, f"took {r.wall:.1f}s with --timeout 5"
    assert re.search(r"error: rank [01] \(partitions m[12]\.g0\) exited with code", r.out), r.out[-3000:]
    assert "rank 1 (partitions m2.g0" in r.out  # the faulty rank is named (by the launcher or by its peer)
    assert "Traceback" not in r.out, r.out[-3000:]
    assert not f["orphans"], f"orphan workers: {f['orphans']}"
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("commit-*.json"))[-1] == "commit-000000003.json"
    for rank in (0, 1):
        ck = committed_checkpoint(root, rank)
        assert ck is not None and ck.state["step"] == 3, rank
    assert not (run / "weights.safetensors").exists()


def test_resume_after_killed_rank_matches_uninterrupted_run(fault_runs, reference_run, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(fault_runs("kill")["run"], run)
    r = _gndgl("train", "--resume", str(run), "--workers", "2")
    assert r.returncode == 0, r.out[-4000:]
    _assert_same_weights(_weights(run), _weights(reference_run))


def test_eval_of_interrupted_distributed_run(fault_runs):
    r = _gndgl("eval", str(fault_runs("raise")["run"]), "--json")
    assert r.returncode == 0, r.out[-2000:]
    assert "000000003" in r.out


def test_single_process_resume_of_distributed_run(fault_runs, tmp_path):
    run = tmp_path / "hung"
    shutil.copytree(fault_runs("hang")["run"], run)
    r = _gndgl("train", "--resume", str(run), "--max-steps", "4")
    if r.returncode != 0:  # refusing is fine if it says how to resume
        assert "--workers 2" in r.out and "Traceback" not in r.out, r.out[-2000:]
        return
    steps = [(x["step"], x["partition"]) for x in _metrics(run) if x["kind"] == "train"]
    assert len(steps) == len(set(steps)), "steps 1..3 were trained twice"


def test_resume_with_other_worker_count_is_refused_or_works(dist_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dist_run("resnet32_k2g2", 3, None), run)
    r = _gndgl("train", "--resume", str(run), "--workers", "2", "--epochs", "2", "--timeout", "10")
    if r.returncode != 0:
        assert "--workers 3" in r.out and "ValueError" not in r.out, r.out[-2000:]
    else:
        assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2


# --------------------------------------------------------------------------------------------- bad input
def test_zero_workers_is_rejected(art, tmp_path):
    r = _gndgl("train", str(art("resnet32_k2g1")), "--workers", "0", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2 and "Traceback" not in r.out, r.out[-2000:]
    assert "--workers" in r.out


def test_more_workers_than_partitions_is_rejected(art, tmp_path):
    r = _gndgl("train", str(art("resnet32_k2g1")), "--workers", "3", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2, r.out[-2000:]
    assert "Traceback" not in r.out
    assert "--workers 3 is more than the 2 partitions" in r.out and "--workers 2" in r.out
    assert not (tmp_path / "r").exists() and not _workers_alive(str(tmp_path / "r"))


@pytest.fixture(scope="module")
def busy_port_run(art, tmp_path_factory):
    run = tmp_path_factory.mktemp("port") / "r"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _gndgl("train", str(art("resnet32_k2g1")), "--workers", "2", "--port", str(port), "--run-dir", str(run),
                   *DATA)
    return port, r, run


def test_busy_port_is_reported(busy_port_run):
    port, r, run = busy_port_run
    assert r.returncode != 0
    assert f"port {port} is in use" in r.out and "--port" in r.out
    assert "Traceback" not in r.out
    assert not _workers_alive(str(run)) and not run.exists()


def test_busy_port_exits_2(busy_port_run):
    assert busy_port_run[1].returncode == 2


# --------------------------------------------------------------------------------------------- torchrun
def test_torchrun_entry_point(art, single, tmp_path):
    pytest.importorskip("torch.distributed.run")
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gndgl_compiler.worker",
           str(art("resnet32_k2g1")), "--run-dir", str(run), *DATA, "--batch-size", "32", "--threads", "1",
           "--timeout", "60", "--json"]
    env = dict(os.environ, GNDGL_BACKEND="gloo", OMP_NUM_THREADS="1")
    env.pop("GNDGL_TEST_FAULT", None)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish in 180 s (no rendezvous offline?)")
    if r.returncode != 0 and not (run / "run.json").exists() and re.search(
            r"[Rr]endezvous|socket|resolve|getaddrinfo", r.stderr):
        pytest.skip(f"torchrun cannot rendezvous here: {r.stderr.strip().splitlines()[-1][:200]}")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert summary["complete"] and summary["steps"] == 4
    assert summary["bytes_sent"] == 4 * 32 * 32768  # rank 0 -> 1: one 32x16x16 float32 activation per sample
    _assert_same_weights(_weights(run), single("resnet32_k2g1", 32))
