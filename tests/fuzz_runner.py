"""The forking runner of the spec fuzzer (``tests/fuzz/test_fuzz_specs.py``, ``tests/fuzz/test_fuzz_regressions.py``):
``compile_document`` writes one document to a fresh sandbox, compiles it with the real CLI entry
point, ``gndgl_cli.main.main(["compile", FILE, "-o", OUT])``, and checks the only outcomes allowed:

* exit 0: the artifact (``manifest.json``) is in OUT and nothing was written anywhere else in
  the example's sandbox (input dir, working dir, ``$TMPDIR``);
* exit 2: stderr starts with ``error:``, nothing was written at all;

never a traceback, another exit code, a signal, a hang or unbounded memory.

How it runs (speed vs. isolation)
---------------------------------
Importing torch costs ~2 s, so the CLI runs *in-process* -- but not in pytest's process (an
allocation of 100s of GB there would take pytest, or the machine, down, and a timer cannot
safely interrupt a C loop): a warm worker subprocess imports gndgl once and, per example,
``fork()``s a child that

* sets ``RLIMIT_AS`` to the worker's address space + ``MEM_HEADROOM`` (3 GiB), so a spec
  that would allocate without bound fails inside the child (MemoryError / torch allocator
  error -> a traceback, which this test reports) instead of taking the machine down;
* sets ``alarm(EXAMPLE_TIMEOUT)``: a hang is killed by SIGALRM and reported;
* redirects fds 1/2 to files (the real ``sys.stdout``/``sys.stderr`` objects, as in a shell),
  chdirs into an empty sandbox dir and points ``$TMPDIR`` into the sandbox, then calls
  ``main(argv)`` and exits with the ``SystemExit`` code (an uncaught exception: traceback,
  exit 1 -- exactly what ``python -m gndgl_cli.main`` would do).

The worker reports the exit status, wall time and peak RSS of the child (``wait4``). Forking
costs ~20 ms; a clean refusal ~30 ms; a successful compile 0.1-1.5 s. The forking worker never
runs torch ops itself, so the children never inherit a running thread pool.

The fixtures ``runner`` (one warm worker per session) and ``fuzz_root`` are ``tests/fuzz_fixtures.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from paths import REPO, TESTS

EXAMPLE_TIMEOUT = 120  # seconds per compile: a hang guard (most take < 2 s; resnet110 at width 16 with G=256, 257
#                       partitions of ~330 ops each, legitimately takes ~55 s on a 2-core machine)
MEM_HEADROOM = 3 << 30  # bytes of address space a compile may add to the warm worker


# ----------------------------------------------------------------------------- the forking runner

WORKER = r'''
import json, os, resource, signal, sys, tempfile, time
sys.path.append(sys.argv[1])  # tests/, for cli_helpers
from cli_helpers import exit_status
import gndgl_cli.main as climain  # the warm import: pydantic, typer, rich
import gndgl_compiler.api, gndgl_compiler.spec  # torch too (the CLI imports it lazily), before RLIMIT_AS is set

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0

chan = os.fdopen(os.dup(1), "w")  # the answer channel; fd 1 itself is redirected in each child
base_vm, base_rss = status("VmSize:"), status("VmRSS:")
chan.write(json.dumps({"ready": True, "vm": base_vm, "rss": base_rss}) + "\n"); chan.flush()
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            chan.close()
            with open(job["probe"], "w") as f:  # the child's own starting RSS, for the growth figure
                f.write(str(status("VmRSS:")))
            limit, hard = base_vm + job["mem"], resource.getrlimit(resource.RLIMIT_AS)[1]
            limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(job["timeout"])
            fo = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fe = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fo, 1); os.dup2(fe, 2); os.close(fo); os.close(fe)
            os.chdir(job["cwd"])
            os.environ["TMPDIR"] = job["tmp"]
            tempfile.tempdir = job["tmp"]
            code = exit_status(lambda: climain.main(job["argv"]))
            sys.stdout.flush(); sys.stderr.flush()
        finally:
            os._exit(code)
    _, st, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    sig = os.WTERMSIG(st) if os.WIFSIGNALED(st) else None
    rc = os.WEXITSTATUS(st) if os.WIFEXITED(st) else None
    try:
        with open(job["probe"]) as f:
            rss0 = int(f.read())
        os.unlink(job["probe"])
    except (OSError, ValueError):
        rss0 = base_rss
    chan.write(json.dumps({"rc": rc, "signal": sig, "wall": wall, "maxrss": ru.ru_maxrss * 1024,
                           "base_rss": rss0}) + "\n")
    chan.flush()
'''


@dataclass
class Result:
    rc: int | None
    signal: int | None
    wall: float
    rss_growth: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        how = f"signal {self.signal}" if self.signal is not None else f"exit {self.rc}"
        return (f"{how} after {self.wall:.2f}s (rss +{self.rss_growth >> 20} MiB)\n--- stderr:\n{self.stderr[-3000:]}"
                f"\n--- stdout:\n{self.stdout[-1000:]}")


class ForkRunner:
    """A warm worker process that runs ``gndgl_cli.main.main(argv)`` in a forked, limited child."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None
        self._buf = b""
        self._start()

    def _start(self) -> None:
        self._log_f = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(TESTS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log_f, cwd=str(REPO), start_new_session=True)
        self._buf = b""
        hello = self._read_line(120)
        assert hello and json.loads(hello)["ready"], f"fuzz worker did not start; see {self.log}"

    def _read_line(self, timeout: float) -> bytes | None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def run(self, argv: list[str], box: Path, timeout: int = EXAMPLE_TIMEOUT, mem: int = MEM_HEADROOM) -> Result:
        """Run one CLI invocation with cwd ``box/cwd`` and ``$TMPDIR`` ``box/tmp``."""
        assert self.proc and self.proc.stdin
        out, err = box.parent / f"{box.name}.stdout", box.parent / f"{box.name}.stderr"
        job = {"argv": argv, "cwd": str(box / "cwd"), "tmp": str(box / "tmp"), "stdout": str(out),
               "stderr": str(err), "probe": str(box.parent / f"{box.name}.rss0"), "timeout": timeout, "mem": mem}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        line = self._read_line(timeout + 60)
        if line is None:  # the worker itself died or hung: start a fresh one, report the example
            self.close()
            self._start()
            return Result(None, -1, float(timeout), 0, "", f"the fuzz worker died or hung; see {self.log}")
        ans = json.loads(line)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        growth = max(0, ans["maxrss"] - ans["base_rss"])
        res = Result(ans["rc"], ans["signal"], ans["wall"], growth, read(out), read(err))
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return res

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except Exception:  # a hung worker: end it and the child it forked (its own process group)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
            self.proc = None
        self._log_f.close()



# ----------------------------------------------------------------------------- running one document

@dataclass
class Stats:
    examples: int = 0
    ok: int = 0
    refused: int = 0
    max_wall: float = 0.0
    max_rss_growth: int = 0
    seconds: float = 0.0
    slow: list = field(default_factory=list)  # (seconds, exit status, bytes, what) of examples over 2 s

    def line(self, what: str) -> str:
        return (f"{what}: {self.examples} examples ({self.ok} compiled, {self.refused} refused) in "
                f"{self.seconds:.1f}s; slowest {self.max_wall:.2f}s, peak rss growth {self.max_rss_growth >> 20} MiB")


def _tree(d: Path) -> set[Path]:
    return set(d.rglob("*"))


def _inside(p: Path, d: Path) -> bool:
    return p.resolve() == d.resolve() or d.resolve() in p.resolve().parents


def compile_document(runner: ForkRunner, root: Path, doc: bytes, *, spec_name: str = "spec.yaml",
                     out_name: str = "artifact", stats: Stats | None = None) -> Result:
    """Write ``doc`` to a fresh sandbox, run ``gndgl compile``, check the allowed outcomes.

    The sandbox ``box`` holds ``in/<spec_name>``, an empty working dir ``cwd``, ``$TMPDIR``
    ``tmp`` and ``out/``; the artifact goes to ``out/<out_name>``.

    Returns:
        The result (a disallowed outcome fails the test, naming the saved document).
    """
    digest = hashlib.sha1(doc + spec_name.encode() + out_name.encode()).hexdigest()[:12]
    box = root / f"ex-{digest}"
    shutil.rmtree(box, ignore_errors=True)
    for sub in ("in", "out", "cwd", "tmp"):
        (box / sub).mkdir(parents=True)
    spec = box / "in" / spec_name
    spec.write_bytes(doc)
    out = box / "out" / out_name
    before = _tree(box)
    res = runner.run(["compile", str(spec), "-o", str(out)], box)
    new = _tree(box) - before

    def fail(why: str) -> None:
        saved = root / "failures" / f"{digest}.yaml"
        saved.parent.mkdir(exist_ok=True)
        saved.write_bytes(doc)
        head = doc[:800].decode("utf-8", errors="backslashreplace")
        pytest.fail(f"{why}\n{res.describe()}\n--- document ({len(doc)} bytes, file name {spec_name!r}, "
                    f"-o {out_name!r}; saved to {saved}; once fixed, copy it to tests/fuzz/fuzz_regressions/):\n{head}",
                    pytrace=False)

    if stats is not None:
        stats.examples += 1
        stats.max_wall = max(stats.max_wall, res.wall)
        stats.max_rss_growth = max(stats.max_rss_growth, res.rss_growth)
        if res.wall > 2.0:
            stats.slow.append((round(res.wall, 1), res.rc, len(doc)))
    if res.signal is not None:
        fail(f"the compile was killed by signal {res.signal} (14: it ran longer than {EXAMPLE_TIMEOUT}s; "
             "-1: the worker died)")
    if "Traceback" in res.stdout + res.stderr:
        fail("the compile printed a traceback")
    if res.rc == 0:
        if not (out / "manifest.json").is_file():
            fail("exit 0 without an artifact in the output directory")
        # files only inside the artifact; `-o x/../y` may leave the empty directory out/x (like mkdir -p)
        stray = sorted(str(p.relative_to(box)) for p in new
                       if not _inside(p, out) and not (p.is_dir() and _inside(p, box / "out")))
        if stray:
            fail(f"a successful compile wrote outside its output directory: {stray}")
        if stats is not None:
            stats.ok += 1
    elif res.rc == 2:
        if not res.stderr.strip().startswith("error:"):
            fail("exit 2 without a clean 'error:' message on stderr")
        if new:
            fail(f"a refused compile wrote files: {sorted(str(p.relative_to(box)) for p in new)}")
        if stats is not None:
            stats.refused += 1
    else:
        fail(f"exit status {res.rc}; only 0 (compiled) or 2 (a clean error) are allowed")
    shutil.rmtree(box, ignore_errors=True)
    return res
