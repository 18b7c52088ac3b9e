"""Fault injection: what survives a SIGKILL, Ctrl-C, a full disk, a read-only directory or tampering.

The guarantees (README, "Training" and "Artifacts"):

1. a run SIGKILLed at any point (mid-step, in the middle of writing a checkpoint, between
   its two files, while appending metrics, while pruning, ...) and resumed, again and again,
   ends with the weights of an uninterrupted run bit for bit (CPU, one thread);
2. a truncated or corrupted newest checkpoint falls back to the previous one with a warning
   that names the file;
3. a read-only run directory or a full disk gives a clear error that names the path, and no
   earlier checkpoint is lost: the run resumes once the condition clears;
4. Ctrl-C checkpoints, exits with status 130 and says how to resume;
5. a tampered run directory is refused with a message naming the file (exit status 2, no
   traceback), and a compile killed while replacing an artifact leaves the old or the new
   artifact, never a mix.

Most processes here are forked from one helper process (``_driver_main``) that imported
gndgl and torch once but never ran a tensor op, so that each child is a real process
(it can be SIGKILLed and holds nothing of its parent's training state) that starts in
milliseconds. Children run the real ``gndgl`` command line (``gndgl_cli.main.main``) inside
``with fsio.use(fs)``: a :class:`gndgl_compiler.fsio.FileSystem` whose operations and named
points (``fsio.point``) SIGKILL the process at the N-th occurrence, tear a write, fail an
fsync, fill the disk or make the run directory read-only. No production name is patched. Ctrl-C is tested on a plain ``python -m gndgl_cli.main``
subprocess. Kill points are drawn with a seeded RNG; rerun with another draw with
``GNDGL_FAULT_SEED=<int> python -m pytest -q tests/test_faults.py -s`` (``-s`` shows what
was survived).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_spec import tiny_spec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and /proc (Linux)")

TESTS = Path(__file__).resolve().parent
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


# =============================================================================== the helper process
# Everything from here to "the tests" runs in the helper process or its forked children.


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


# name -> (description, highest N drawn). Each is reached within a few steps of any resume point.
KILL_POINTS = {
    "checkpoint-due": ("when a checkpoint is due, before any of it is written", 2),
    "mid-step": ("in the middle of training, after a step's update, before it is logged or checkpointed", 6),
    "serialize": ("after a checkpoint's tensors are serialised, before anything is written", 2),
    "torn-tensors": ("half-way through writing a checkpoint's .safetensors temp file", 2),
    "tensors-before-rename": ("after the .safetensors temp file is fsynced, before its rename", 2),
    "between-tensors-and-json": ("after the .safetensors rename, before the .json (commit) is written", 2),
    "torn-json": ("half-way through writing a checkpoint's .json temp file", 2),
    "json-before-dir-fsync": ("after the .json rename, before the directory fsync", 2),
    "metrics-torn-line": ("half-way through appending a metrics.jsonl line", 8),
    "prune-between-files": ("after deleting an old checkpoint's .json, before its .safetensors", 2),
    "metrics-rewrite": ("while a resumed run rewrites metrics.jsonl, before the rename", 1),
    "eval": ("during the end-of-epoch evaluation", 1),
    "final-weights": ("after the final weights' temp file is written, before its rename", 1),
}
NEEDS_CHECKPOINT = {"metrics-rewrite"}  # only a run resumed from a checkpoint rewrites its metrics
FIRST = ("checkpoint-due", 1)  # the fresh run dies before its first checkpoint: the next attempt starts over
LAST = "final-weights"  # after it nothing is left to train
POINTS = {"checkpoint-due": "checkpoint.start", "mid-step": "train.step", "serialize": "checkpoint.serialized",
          "eval": "train.evaluate"}
"""Kill points that are logical events of the code (``fsio.point``); the others are file operations."""


def _is_ckpt(name: str, ext: str) -> bool:
    return name.lstrip(".").startswith("ckpt-") and ext in name


def _fault_fs(faults: dict, at_exit: list):
    """The file system of one forked child (``fsio.use``): the real one plus the faults of its job.

    faults: ``kill`` [point, n] (SIGKILL at the n-th occurrence of a KILL_POINTS entry); ``read_only_after``
    / ``enospc_after`` / ``fill_disk_after`` [n, filler] (after the n-th checkpoint: make the run directory
    read-only, fail every later fsync with ENOSPC, fill the disk); ``no_exchange`` (a file system without
    renameat2(RENAME_EXCHANGE)); ``compile_kill`` n (SIGKILL after the n-th file-system change; 0: never)
    with ``count_to`` (write the list of changes there at exit).
    """
    from gndgl_compiler import fsio

    class FaultFS(fsio.FileSystem):
        def __init__(self):
            self.kill, self.n = faults.get("kill", (None, 0))
            self.seen = 0
            self.checkpoints = 0
            self.enospc = False
            self.last_replaced = ""
            self.events: list[str] = []

        def hit(self) -> bool:
            self.seen += 1
            return self.seen == self.n

        def event(self, label: str) -> None:
            """A file-system change while compiling (compile_kill)."""
            if "compile_kill" in faults:
                self.events.append(label)
                if len(self.events) == faults["compile_kill"]:
                    _die()

        # ---- logical events
        def point(self, name, **info):
            if POINTS.get(self.kill) == name and self.hit():
                _die()
            if name == "checkpoint.committed":
                self.checkpoints += 1
                for key, action in (("read_only_after", _make_read_only), ("enospc_after", self.disk_full),
                                    ("fill_disk_after", lambda _: _fill_disk(Path(faults["fill_disk_after"][1])))):
                    if key in faults:
                        n = faults[key][0] if key == "fill_disk_after" else faults[key]
                        if self.checkpoints == n:
                            action(info["path"])

        def disk_full(self, _json_path) -> None:
            """Every later fsync fails with ENOSPC (a simulated full disk)."""
            self.enospc = True

        # ---- file operations
        def write(self, f, data, path):
            name = os.path.basename(path)
            torn = ((self.kill == "torn-tensors" and _is_ckpt(name, ".safetensors.")) or
                    (self.kill == "torn-json" and _is_ckpt(name, ".json.")) or
                    (self.kill == "metrics-torn-line" and name == "metrics.jsonl"))
            if torn and self.hit():
                f.write(data[: len(data) // 2])
                f.flush()
                _die()
            super().write(f, data, path)
            self.event("write weights" if name == "weights.safetensors" else "write file")

        def fsync(self, fd, path):
            if self.enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().fsync(fd, path)
            self.event("fsync")

        def fsync_dir(self, directory):
            if self.enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.kill == "json-before-dir-fsync" and _is_ckpt(self.last_replaced, ".json") and self.hit():
                _die()
            super().fsync_dir(directory)  # not a change of the tree: not a compile_kill event

        def replace(self, src, dst):
            name = os.path.basename(dst)
            before = ((self.kill == "tensors-before-rename" and _is_ckpt(name, ".safetensors")) or
                      (self.kill == "metrics-rewrite" and name == "metrics.jsonl") or
                      (self.kill == "final-weights" and name == "weights.safetensors"))
            if before and self.hit():
                _die()
            super().replace(src, dst)
            self.last_replaced = name
            if self.kill == "between-tensors-and-json" and _is_ckpt(name, ".safetensors") and self.hit():
                _die()
            self.event("rename")

        def unlink(self, path, missing_ok=True):
            super().unlink(path, missing_ok)
            path = Path(path)
            if (self.kill == "prune-between-files" and path.parent.name == "checkpoints" and path.suffix == ".json"
                    and self.hit()):
                _die()

        def exchange(self, a, b):
            done = False if "no_exchange" in faults else super().exchange(a, b)
            self.event("exchange")
            return done

        def mkdir(self, path, parents=False, exist_ok=False):
            super().mkdir(path, parents, exist_ok)
            self.event("mkdir")

        def mkdtemp(self, directory, prefix):
            d = super().mkdtemp(directory, prefix)
            self.event("mkdtemp")
            return d

        def chmod(self, path, mode):
            super().chmod(path, mode)
            self.event("chmod")

        def rmtree(self, path):
            super().rmtree(path)
            self.event("rmtree")

    if faults.get("kill") and faults["kill"][0] not in KILL_POINTS:
        raise ValueError(f"unknown kill point {faults['kill'][0]}")
    fs = FaultFS()
    if "count_to" in faults:
        at_exit.append(lambda: Path(faults["count_to"]).write_text(json.dumps(fs.events)))
    return fs


def _make_read_only(json_path: Path) -> None:
    for d in (json_path.parent, json_path.parent.parent):  # checkpoints/ and the run directory
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)


def _fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full (a real ENOSPC for every later write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    block = b"\0" * (1 << 16)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    for size in (4096, 64):  # the last partial blocks
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
        finally:
            os.close(fd)


def _with_faults(faults: dict, fn) -> int:
    """Run ``fn()`` (-> exit code) with the file system of ``faults`` (see :func:`_fault_fs`)."""
    from gndgl_compiler import fsio

    at_exit: list = []
    with fsio.use(_fault_fs(faults, at_exit)):
        code = fn()
    for done in at_exit:
        done()
    return code


def _cli(argv: list[str]) -> int:
    from gndgl_cli.main import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _fork(fn, out: str, err: str, timeout: int) -> int:
    """Run ``fn()`` (-> exit code) in a forked child with stdout/stderr in files; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        signal.alarm(timeout)  # a hung child dies of SIGALRM
        torch.set_num_threads(1)
        code = fn()
    except BaseException:  # noqa: BLE001 - report anything the job raised
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status), "signal": None}


def _run_job(job: dict) -> int:
    os.chdir(job["cwd"])
    if job["kind"] == "cli":
        code = _with_faults(job.get("faults", {}), lambda: _cli(job["argv"]))
    elif job["kind"] == "disk-full-tmpfs":
        code = _disk_full_tmpfs(job)
    elif job["kind"] == "probe-read-only":
        d = Path(job["cwd"]) / "ro-probe"
        d.mkdir(exist_ok=True)
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
        try:
            (d / "x").write_text("x")
            code = 1  # writable: this process overrides permissions
        except PermissionError:
            code = 0
        finally:
            os.chmod(d, stat.S_IRWXU)
    else:
        raise ValueError(job["kind"])
    return code


def _private_tmpfs(mount: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``mount`` in a new mount namespace that only this process and its
    children see (root: CLONE_NEWNS; otherwise a user namespace too). Raises OSError where impossible."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, clone_newuser = 0x00020000, 0x10000000
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(clone_newns) != 0:
        if libc.unshare(clone_newns | clone_newuser) != 0:
            raise OSError(ctypes.get_errno(), "unshare: " + os.strerror(ctypes.get_errno()))
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    ms_rec, ms_private = 0x4000, 1 << 18
    if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:  # never propagate to the host
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /: " + os.strerror(ctypes.get_errno()))
    if libc.mount(b"tmpfs", os.fsencode(mount), b"tmpfs", 0, f"size={size}".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs: " + os.strerror(ctypes.get_errno()))


def _disk_full_tmpfs(job: dict) -> int:
    """A run on a small private tmpfs that fills up after a checkpoint, then resumed after freeing space.

    The tmpfs disappears with this process, so what the test checks is copied out / reported.
    """
    from gndgl_compiler.runtime.checkpoint_dir import latest_valid_checkpoint

    mount, cwd = Path(job["mount"]), Path(job["cwd"])
    try:
        _private_tmpfs(mount, "64m")
    except OSError as exc:
        print(f"cannot mount a private tmpfs: {exc}")
        return 77
    run, filler = mount / "run", mount / "filler"
    report: dict = {}

    def cli_in_child(argv, faults, name):
        pid = _fork(lambda: _with_faults(faults, lambda: _cli(argv)), str(cwd / f"{name}.out"), str(cwd / f"{name}.err"), 120)
        return _status(os.waitpid(pid, 0)[1])

    report["first"] = cli_in_child(["train", job["artifact"], "--run-dir", str(run), *job["settings"]],
                                   {"fill_disk_after": [job["fill_after"], str(filler)]}, "first")
    found = latest_valid_checkpoint(run / "checkpoints")
    report["after_failure"] = {"valid": found.name if found else None, "step": found.state["step"] if found else None,
                               "files": sorted(p.name for p in (run / "checkpoints").iterdir())}
    filler.unlink()  # the condition clears
    report["resume"] = cli_in_child(["train", "--resume", str(run)], {}, "resume")
    shutil.copytree(run, job["copy_to"])
    (cwd / "report.json").write_text(json.dumps(report))
    return 0


PARALLEL = int(os.environ.get("GNDGL_FAULT_JOBS", "3"))
"""Children the helper process runs at once (the machine may be small and shared)."""


def _driver_main() -> None:
    """The helper process: import everything once, then for each line of jobs (JSON) fork one child per
    job (PARALLEL at a time) and answer one JSON line of results when all have ended."""
    import gndgl_cli.main  # noqa: F401 - import before forking, so children start at once
    import gndgl_compiler.runtime.train  # noqa: F401

    while True:
        line = sys.stdin.readline()
        if not line:
            return
        jobs = json.loads(line)
        results: list = [None] * len(jobs)
        pids: dict[int, int] = {}
        todo = list(enumerate(jobs))
        while todo or pids:
            while todo and len(pids) < PARALLEL:
                i, job = todo.pop(0)
                cwd = Path(job["cwd"])
                pids[_fork(lambda job=job: _run_job(job), str(cwd / f"{job['name']}.out"),
                           str(cwd / f"{job['name']}.err"), job.get("timeout", 120))] = i
            pid, status = os.wait()
            if pid in pids:
                results[pids.pop(pid)] = _status(status)
        sys.stdout.write(json.dumps(results) + "\n")
        sys.stdout.flush()


# =============================================================================== the tests


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
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_faults; test_faults._driver_main()"
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    from gndgl_compiler import compile_spec

    root = tmp_path_factory.mktemp("faults")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        art = compile_spec(SPEC.replace("SEED", "3"), out_dir=root / "artifact").path
    finally:
        torch.set_num_threads(n)
    driver = Driver(root)
    try:
        ref = root / "reference"
        (res,) = driver.run(cli_job("reference", root, "train", art, "--run-dir", ref, *SETTINGS))
        assert_ok(res)
        yield Setup(driver, root, art, ref)
    finally:
        driver.close()


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


# ---------------------------------------------------------------- 2. a damaged newest checkpoint


@pytest.fixture(scope="module")
def partial_run(setup) -> Path:
    """A run stopped at step 20 (checkpoints 18 and 20 kept), without final weights: as if killed."""
    run = setup.root / "partial"
    (res,) = setup.driver.run(cli_job("partial", setup.root, "train", setup.artifact, "--run-dir", run, *SETTINGS,
                                      "--max-steps", "20"))
    assert_ok(res)
    (run / "weights.safetensors").unlink()
    (run / "summary.json").unlink()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json")) == ["ckpt-000000018.json",
                                                                            "ckpt-000000020.json"]
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=1))


NEWEST = "checkpoints/ckpt-000000020"
FALLBACK_CASES = {  # id -> how the newest checkpoint is damaged
    "truncated-tensors": lambda run: _truncate(run / f"{NEWEST}.safetensors"),
    "truncated-json": lambda run: _truncate(run / f"{NEWEST}.json"),
    "flipped-byte-tensors": lambda run: _flip_byte(run / f"{NEWEST}.safetensors"),
    "edited-json": lambda run: _edit_json(run / f"{NEWEST}.json", lambda r: r["state"].update(step_in_epoch=1)),
    "missing-tensors": lambda run: (run / f"{NEWEST}.safetensors").unlink(),
}
# resumed to the end (slow): one case of each path, a tensor file that fails to load and a record that fails to read
RESUMED = ("truncated-tensors", "edited-json")


def test_damaged_newest_checkpoint_falls_back_with_a_warning(setup, partial_run):
    work = setup.workdir("fallback")
    jobs = []
    for case, damage in FALLBACK_CASES.items():
        for cmd, argv in (("eval", ["eval", "{run}", "--json"]), ("resume", ["train", "--resume", "{run}"])):
            if cmd == "resume" and case not in RESUMED:
                continue
            run = work / f"{cmd}-{case}"
            shutil.copytree(partial_run, run)
            damage(run)
            jobs.append(cli_job(f"{cmd}-{case}", work, *[run if a == "{run}" else a for a in argv]))
    results = {r.name: r for r in setup.driver.run(*jobs)}
    for case in FALLBACK_CASES:
        for cmd in ("eval", "resume") if case in RESUMED else ("eval",):
            run, res = work / f"{cmd}-{case}", results[f"{cmd}-{case}"]
            assert_ok(res)
            assert "warning:" in res.err, res.describe()
            bad = run / NEWEST
            assert str(bad) in res.flat_err, res.describe()  # names the damaged checkpoint, with its path
        assert json.loads(results[f"eval-{case}"].out)["source"] == "checkpoint ckpt-000000018"
        if case in RESUMED:
            setup.assert_matches_reference(work / f"resume-{case}")


# ---------------------------------------------------------------- 3. read-only directory, full disk


def test_read_only_run_directory_gives_a_clear_error_and_keeps_checkpoints(setup):
    from gndgl_compiler.runtime.checkpoint_dir import latest_valid_checkpoint

    work = setup.workdir("read_only")
    (probe,) = setup.driver.run({"kind": "probe-read-only", "name": "probe", "cwd": str(work)})
    if probe.exit != 0:
        pytest.skip("this user overrides file permissions (root with CAP_DAC_OVERRIDE that cannot be dropped)")
    run, ro_parent = work / "run", work / "ro"
    ro_parent.mkdir()
    ro_parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        first, fresh = setup.driver.run(
            # the run directory turns read-only after the 2nd checkpoint (step 6)
            cli_job("first", work, "train", setup.artifact, "--run-dir", run, *SETTINGS, faults={"read_only_after": 2}),
            cli_job("fresh", work, "train", setup.artifact, "--run-dir", ro_parent / "run", *SETTINGS))
        assert_clean_cli_error(first, 1, str(run / "checkpoints" / "ckpt-000000009"), "Permission denied")
        assert_clean_cli_error(fresh, 2, str(ro_parent / "run"), "Permission denied", "--run-dir")
        assert not (ro_parent / "run").exists()
        (resume_ro,) = setup.driver.run(cli_job("resume-ro", work, "train", "--resume", run))
        assert_clean_cli_error(resume_ro, 1, str(run), "Permission denied")
    finally:
        ro_parent.chmod(stat.S_IRWXU)
        for d in (run, run / "checkpoints"):
            if d.exists():
                d.chmod(stat.S_IRWXU)
    found = latest_valid_checkpoint(run / "checkpoints")
    assert found is not None and found.state["step"] == 6
    assert not list((run / "checkpoints").glob(".*.tmp")), "a temp file was left behind"
    (res,) = setup.driver.run(cli_job("resume", work, "train", "--resume", run))
    assert_ok(res)
    setup.assert_matches_reference(run)


def test_full_disk_simulated_gives_a_clear_error_and_keeps_checkpoints(setup):
    """Every checkpoint write after the 2nd fails with ENOSPC (fsync), as on a full disk."""
    from gndgl_compiler.runtime.checkpoint_dir import latest_valid_checkpoint

    work = setup.workdir("enospc")
    run = work / "run"
    (first,) = setup.driver.run(cli_job("first", work, "train", setup.artifact, "--run-dir", run, *SETTINGS,
                                        faults={"enospc_after": 2}))
    assert_clean_cli_error(first, 1, str(run / "checkpoints" / "ckpt-000000009.safetensors"),
                           "No space left on device")
    found = latest_valid_checkpoint(run / "checkpoints")
    assert found is not None and found.state["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-000000003.json", "ckpt-000000003.safetensors", "ckpt-000000006.json", "ckpt-000000006.safetensors"]
    (res,) = setup.driver.run(cli_job("resume", work, "train", "--resume", run))
    assert_ok(res)
    setup.assert_matches_reference(run)


# id -> (settings, fill the disk after this many checkpoints, the file that cannot be written, step kept)
TMPFS_CASES = {
    # the next checkpoint (step 9) is the first write that needs space
    "checkpoint-write": (SETTINGS, 2, "checkpoints/ckpt-000000009.safetensors", 6),
    # checkpoints only at epoch ends: metrics.jsonl outgrows its last page before the next one
    "metrics-append": ([*SETTINGS, "--checkpoint-every", "0"], 1, "metrics.jsonl", 16),
}


@pytest.mark.parametrize("case", TMPFS_CASES)
def test_full_disk_real_tmpfs_gives_a_clear_error_and_keeps_checkpoints(setup, case):
    """A real ENOSPC: the run lives on a 64 MiB tmpfs (private mount namespace) that is filled up after
    a checkpoint; once the filler is deleted the run resumes to the reference weights."""
    settings, fill_after, bad_file, kept_step = TMPFS_CASES[case]
    work = setup.workdir(f"tmpfs-{case}")
    mount = work / "mnt"
    mount.mkdir()
    job = {"kind": "disk-full-tmpfs", "name": "scenario", "cwd": str(work), "mount": str(mount),
           "artifact": str(setup.artifact), "copy_to": str(work / "copy"), "timeout": 240,
           "settings": settings, "fill_after": fill_after}
    (res,) = setup.driver.run(job)
    if res.exit == 77:
        pytest.skip(f"no private tmpfs possible here: {res.out.strip()}")
    assert_ok(res)
    report = json.loads((work / "report.json").read_text())
    first = Result("first", report["first"]["exit"], report["first"]["signal"], (work / "first.out").read_text(),
                   (work / "first.err").read_text())
    assert_clean_cli_error(first, 1, str(mount / "run" / bad_file), "No space left on device")
    assert report["after_failure"]["step"] == kept_step, report
    assert not [f for f in report["after_failure"]["files"] if f.endswith(".tmp")], report
    resume = Result("resume", report["resume"]["exit"], report["resume"]["signal"],
                    (work / "resume.out").read_text(), (work / "resume.err").read_text())
    assert_ok(resume)
    setup.assert_matches_reference(work / "copy")


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
    step = int(res.flat_err.split("interrupted at step ")[1].split(";")[0])
    assert 3 <= step < TOTAL_STEPS
    assert (run / "checkpoints" / f"ckpt-{step:09d}.json").is_file(), "no checkpoint at the interrupted step"
    assert not (run / "weights.safetensors").exists()
    (resumed,) = setup.driver.run(cli_job("resume", work, "train", "--resume", run))
    assert_ok(resumed)
    setup.assert_matches_reference(run)


# ---------------------------------------------------------------- 5. a tampered run directory


def _set_config(key, value):
    return lambda run: _edit_json(run / "run.json", lambda r: r["config"].__setitem__(key, value))


def _damage_all_checkpoints(run: Path) -> None:
    for p in (run / "checkpoints").glob("*.safetensors"):
        _flip_byte(p)


def _drop_from_manifest(run: Path) -> None:
    _edit_json(run / "artifact" / "manifest.json", lambda m: m["files"].pop("plan.json"))
    _edit_json(run / "artifact" / "plan.json", lambda p: p.update(name="edited"))


RUN = "{run}"
# id -> (damage, file named in the message (relative to the run), more words the message must hold)
TAMPER_CASES = {
    "run.json-garbage": (lambda run: _flip_byte(run / "run.json", 0), "run.json", ["damaged", "restore it"]),
    "run.json-truncated": (lambda run: _truncate(run / "run.json"), "run.json", ["damaged", "restore it"]),
    "run.json-missing": (lambda run: (run / "run.json").unlink(), "run.json", ["is missing", "Restore it"]),
    "run.json-not-a-run": (lambda run: (run / "run.json").write_text("[1, 2]"), "run.json", ["damaged"]),
    "run.json-bad-type": (_set_config("batch_size", "sixteen"), "run.json", ["config.batch_size", "restore it"]),
    "run.json-missing-key": (lambda run: _edit_json(run / "run.json", lambda r: r["config"].pop("seed")),
                             "run.json", ["'seed'", "restore it"]),
    "run.json-bad-limit": (_set_config("limit_train", -5), "run.json", ["config.limit_train"]),
    "checkpoints-all-damaged": (_damage_all_checkpoints, "checkpoints/ckpt-000000020.safetensors",
                                ["none is usable", "move", "away"]),
    "artifact-code-edited": (lambda run: (run / "artifact/code/inference.py").open("a").write("# edited\n"),
                             "artifact/code/inference.py", ["sha256", "the run directory was modified"]),
    "artifact-weights-flipped": (lambda run: _flip_byte(run / "artifact/weights.safetensors"),
                                 "artifact/weights.safetensors", ["sha256", "restore the file"]),
    "artifact-plan-missing": (lambda run: (run / "artifact/plan.json").unlink(), "artifact/plan.json",
                              ["missing", "restore the file"]),
    "artifact-manifest-garbage": (lambda run: (run / "artifact/manifest.json").write_text("{"),
                                  "artifact/manifest.json", ["corrupt", "restore the file"]),
    "artifact-manifest-entry-dropped": (_drop_from_manifest, "artifact/manifest.json",
                                        ["does not list plan.json", "restore the file"]),
    "artifact-dir-missing": (lambda run: shutil.rmtree(run / "artifact"), "artifact", ["is missing", "Restore it"]),
}
RESUME_ONLY_CASES = {  # eval does not read the metrics
    "metrics-middle-line-broken": (lambda run: (run / "metrics.jsonl").write_text(
        (run / "metrics.jsonl").read_text().replace("}\n", "}\nnot json\n", 1)), "metrics.jsonl",
        ["line 2", "fix or delete that line"]),
}


def test_tampered_run_directory_is_refused_naming_the_file(setup, partial_run):
    work = setup.workdir("tamper")
    jobs = []
    for case, (damage, _, _) in {**TAMPER_CASES, **RESUME_ONLY_CASES}.items():
        for cmd in ("resume", "eval") if case in TAMPER_CASES else ("resume",):
            run = work / f"{cmd}-{case}"
            shutil.copytree(partial_run, run)
            damage(run)
            argv = ["train", "--resume", run] if cmd == "resume" else ["eval", run]
            jobs.append(cli_job(f"{cmd}-{case}", work, *argv))
    results = {r.name: r for r in setup.driver.run(*jobs)}
    checked = 0
    for case, (_, file, words) in {**TAMPER_CASES, **RESUME_ONLY_CASES}.items():
        for cmd in ("resume", "eval"):
            if f"{cmd}-{case}" not in results:
                continue
            run, res = work / f"{cmd}-{case}", results[f"{cmd}-{case}"]
            assert_clean_cli_error(res, 2, str(run / file), *words)
            assert not (run / "weights.safetensors").exists()
            checked += 1
    print(f"\n{len(TAMPER_CASES) + len(RESUME_ONLY_CASES)} tamper cases, {checked} refused commands")
    assert checked == 2 * len(TAMPER_CASES) + len(RESUME_ONLY_CASES)


# ---------------------------------------------------------------- 5b. compile killed while replacing


def _manifest_files(d: Path) -> dict | None:
    try:
        return json.loads((d / "manifest.json").read_text())["files"]
    except FileNotFoundError:
        return None


def test_compile_killed_over_an_existing_artifact_leaves_old_or_new(setup):
    """``gndgl compile B -o DIR`` over DIR (compiled from A) SIGKILLed after a random one of its file-system
    changes leaves DIR holding all of A or all of B; ``gndgl inspect DIR`` works and a new compile succeeds."""
    from gndgl_compiler import compile_spec, load_artifact

    work = setup.workdir("recompile")
    spec_a, spec_b = work / "a.yaml", work / "b.yaml"
    spec_a.write_text(SPEC.replace("SEED", "3"))
    spec_b.write_text(SPEC.replace("SEED", "4"))  # other initial weights: another manifest
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old = compile_spec(spec_a, work / "old").path
        new = compile_spec(spec_b, work / "new").path
    finally:
        torch.set_num_threads(n)
    old_files, new_files = _manifest_files(old), _manifest_files(new)
    assert old_files != new_files

    def case_dir(name: str) -> Path:
        d = work / name
        d.mkdir()
        shutil.copytree(old, d / "DIR")
        return d

    count_dir = case_dir("count")
    (res,) = setup.driver.run(cli_job("compile", count_dir, "compile", spec_b, "-o", count_dir / "DIR",
                                      faults={"compile_kill": 0, "count_to": str(count_dir / "events.json")}))
    assert_ok(res)
    events = json.loads((count_dir / "events.json").read_text())
    assert _manifest_files(count_dir / "DIR") == new_files
    rng = random.Random(SEED)
    last_fsync = len(events) - events[::-1].index("fsync")  # from here on the new artifact is complete: swapping
    points = sorted({*range(last_fsync, len(events) + 1), *rng.sample(range(1, last_fsync), 6)})
    kills = []
    for k in points:
        d = case_dir(f"kill{k}")
        kills.append(cli_job("compile", d, "compile", spec_b, "-o", d / "DIR", faults={"compile_kill": k}))
    outcomes = []
    for job, res in zip(kills, setup.driver.run(*kills)):
        d = Path(job["cwd"])
        k = job["faults"]["compile_kill"]
        assert res.signal == signal.SIGKILL, f"event {k} ({events[k - 1]}) not reached\n{res.describe()}"
        files = _manifest_files(d / "DIR")
        assert files in (old_files, new_files), (f"killed after event {k} ({events[k - 1]}) of {events}: DIR is "
                                                 f"{'missing' if files is None else 'neither the old nor the new'}")
        load_artifact(d / "DIR")  # verifies every hash
        outcomes.append(f"{k}:{events[k - 1]}->{'new' if files == new_files else 'old'}")
    for res in setup.driver.run(*[cli_job("inspect", Path(j["cwd"]), "inspect", Path(j["cwd"]) / "DIR", "--json")
                                  for j in kills]):
        assert_ok(res)
    # compiling again works whatever a killed compile left (debris of the swap included)
    again = [cli_job("again", Path(j["cwd"]), "compile", spec_b, "-o", Path(j["cwd"]) / "DIR") for j in kills
             if j["faults"]["compile_kill"] >= last_fsync]
    for job, res in zip(again, setup.driver.run(*again)):
        assert_ok(res)
        assert _manifest_files(Path(job["cwd"]) / "DIR") == new_files
    print(f"\ncompile killed after {len(points)} of its {len(events)} file-system changes: {', '.join(outcomes)}")


def test_compile_killed_between_two_renames_says_where_the_old_artifact_is(setup):
    """Without an atomic exchange (a file system lacking renameat2), DIR can be briefly absent; a compile
    killed right then leaves the old artifact aside and ``gndgl inspect DIR`` says how to restore it."""
    work = setup.workdir("recompile_fallback")
    spec_b = work / "b.yaml"
    spec_b.write_text(SPEC.replace("SEED", "4"))
    for d in ("DIR", "COUNT"):
        shutil.copytree(setup.artifact, work / d)
    old_files = _manifest_files(work / "DIR")
    (count,) = setup.driver.run(cli_job("count", work, "compile", spec_b, "-o", work / "COUNT",
                                        faults={"no_exchange": True, "compile_kill": 0,
                                                "count_to": str(work / "events.json")}))
    assert_ok(count)
    events = json.loads((work / "events.json").read_text())
    # after the (failed) exchange: mkdtemp(.DIR.old-*), rename DIR out of the way, rename the new one in
    first_rename = events.index("rename", events.index("exchange")) + 1
    (res,) = setup.driver.run(cli_job("kill", work, "compile", spec_b, "-o", work / "DIR",
                                      faults={"no_exchange": True, "compile_kill": first_rename}))
    assert res.signal == signal.SIGKILL, res.describe()
    assert not (work / "DIR").exists()
    (inspect,) = setup.driver.run(cli_job("inspect", work, "inspect", work / "DIR"))
    assert_clean_cli_error(inspect, 2, str(work / "DIR"), "interrupted", "mv")
    moved = next(work.glob(".DIR.old-*/a"))
    assert _manifest_files(moved) == old_files and str(moved) in inspect.flat_err
