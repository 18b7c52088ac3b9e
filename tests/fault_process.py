"""The helper process of the fault-injection tests (``tests/faults/``) and its forked children.

Most processes of those tests are forked from one helper process (``_driver_main``) that imported
gndgl and torch once but never ran a tensor op, so that each child is a real process
(it can be SIGKILLed and holds nothing of its parent's training state) that starts in
milliseconds. Children run the real ``gndgl`` command line (``gndgl_cli.main.main``) inside
``with fsio.use(fs)``: a :class:`gndgl_compiler.fsio.FileSystem` whose operations and named
points (``fsio.point``) SIGKILL the process at the N-th occurrence, tear a write, fail an
fsync, fill the disk or make the run directory read-only. No production name is patched.

Everything here runs in the helper process or its forked children; the pytest side (``Driver``,
``Setup``, the asserts) is ``tests/fault_helpers.py``, the shared session fixture ``setup``
``tests/fault_fixtures.py``.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

import torch


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
    from gndgl_compiler.runtime.checkpoint.directory import latest_valid_checkpoint

    mount, cwd = Path(job["mount"]), Path(job["cwd"])
    try:
        _private_tmpfs(mount, "64m")
    except OSError as exc:
        print(f"cannot mount a private tmpfs: {exc}")
        return 77
    run, filler = mount / "run", mount / "filler"
    report: dict = {}

    def cli_in_child(argv, faults, name):
        pid = _fork(lambda: _with_faults(faults, lambda: _cli(argv)), str(cwd / f"{name}.out"),
                    str(cwd / f"{name}.err"), 120)
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
    importlib.import_module("gndgl_cli.main")  # import before forking, so children start at once
    importlib.import_module("gndgl_compiler.runtime.train")

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
