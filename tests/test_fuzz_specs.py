"""Fuzzing the spec front end through ``gndgl compile FILE -o OUTDIR`` (hypothesis).

What is generated
-----------------
* **Mutated shipped specs** (``specs/*.yaml``): 1-4 edits of the parsed document -- drop,
  duplicate (two equal keys in one mapping), rename or add keys; replace a value by a random
  scalar (ints, floats incl. nan/inf/huge/negative, strings, bools, None, binary, dates), a
  random list/dict, another part of the spec, a deep nesting, an anchor/alias "billion laughs"
  bomb or a self-referencing alias; nudge numbers to edge values (0, -1, 2**31, 10**100, ...);
  put Python object tags (``!!python/object/apply:os.system``, ``!!python/name:...``) or custom
  tags on scalars, mappings and sequences; odd names (``../x``, ``a/b``, ``[/]``, surrogates).
  Then, sometimes, byte-level damage of the YAML text: invalid UTF-8, NUL, BOM, tabs, YAML
  tokens (``&a``, ``*a``, ``<<:``, ``!!python/name:``), cut or duplicated lines.
* **Hostile documents**: random YAML values as the whole document, and generated attacks --
  alias bombs, text nesting thousands deep, tagged nodes, oversized files, random bytes, wide
  mappings, and valid but huge networks (thousands of units, wide templates, many groups,
  100k classes) that test the compiler's time and memory budgets.

Each document is compiled with the real CLI entry point, ``gndgl_cli.main.main(["compile",
FILE, "-o", OUT])``, under an odd file / output name now and then. The only outcomes allowed:

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

Determinism: ``derandomize=True`` (a fixed seed per test), no example database, a fixed
``max_examples`` (60 mutated specs + 50 hostile documents, ~45 s on 2 cores). For a longer
local hunt, ``GNDGL_FUZZ_EXAMPLES=2000`` sets the number of mutated-spec examples (the hostile
test scales with it) and ``GNDGL_FUZZ_SEED=N`` draws another reproducible sequence. The number
of examples run is printed (``-s``) and recorded as a junit property.

Failures found this way are kept in ``tests/fuzz_regressions/`` (one file each, raw bytes;
optional leading ``# expect: FRAGMENT`` / ``# expect-rc: N`` lines) and replayed by
``test_fuzz_regression`` through the same runner. A failing hypothesis example is saved under
pytest's tmp dir (the path is in the assertion message) so it can be copied there.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
SPEC_FILES = sorted(SPECS.glob("*.yaml"))

EXAMPLE_TIMEOUT = 120  # seconds per compile: a hang guard (most take < 2 s; resnet110 at width 16 with G=256, 257
#                       partitions of ~330 ops each, legitimately takes ~55 s on a 2-core machine)
MEM_HEADROOM = 3 << 30  # bytes of address space a compile may add to the warm worker
SCALE = float(os.environ.get("GNDGL_FUZZ_EXAMPLES", "0") or 0) / 60 or 1.0
MUTATION_EXAMPLES = max(1, int(60 * SCALE))
HOSTILE_EXAMPLES = max(1, int(50 * SCALE))

SEED = os.environ.get("GNDGL_FUZZ_SEED")  # set: a different, still reproducible, sequence of examples

FUZZ_SETTINGS = dict(
    derandomize=SEED is None,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


# ----------------------------------------------------------------------------- the forking runner

WORKER = r'''
import json, os, resource, signal, sys, tempfile, time, traceback
import gndgl_cli.main as climain  # the warm import: torch, pydantic, typer, rich

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
            try:
                climain.main(job["argv"])
                code = 0
            except SystemExit as exc:
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
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
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log_f, cwd=str(ROOT), start_new_session=True)
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


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def runner(fuzz_root):
    if not hasattr(os, "fork") or not Path("/proc/self/status").exists():
        pytest.skip("the fuzz runner needs fork() and /proc (Linux)")
    r = ForkRunner(fuzz_root / "worker.log")
    yield r
    r.close()


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
                    f"-o {out_name!r}; saved to {saved}; once fixed, copy it to tests/fuzz_regressions/):\n{head}",
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


# ----------------------------------------------------------------------------- YAML building blocks


class Pairs:
    """A mapping written with possibly repeated keys (for duplicate-key documents)."""

    def __init__(self, items: list[tuple[Any, Any]]):
        self.items = items


class Tagged:
    """A value written with an explicit YAML tag (on a scalar, mapping or sequence node)."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class _Dumper(yaml.SafeDumper):
    pass


def _repr_pairs(d: yaml.SafeDumper, v: Pairs) -> yaml.Node:
    return d.represent_mapping("tag:yaml.org,2002:map", v.items)


def _repr_tagged(d: yaml.SafeDumper, v: Tagged) -> yaml.Node:
    val = v.value
    if isinstance(val, dict):
        return d.represent_mapping(v.tag, val)
    if isinstance(val, Pairs):
        return d.represent_mapping(v.tag, val.items)
    if isinstance(val, (list, tuple)):
        return d.represent_sequence(v.tag, list(val))
    return d.represent_scalar(v.tag, "" if val is None else str(val))


_Dumper.add_representer(Pairs, _repr_pairs)
_Dumper.add_representer(Tagged, _repr_tagged)


def dump(doc: Any, flow: bool | None) -> bytes:
    """YAML text of ``doc`` (anchors/aliases for shared containers, as PyYAML does)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # the emitter recurses a few frames per nesting level
    try:
        text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=flow,
                         width=120)
    finally:
        sys.setrecursionlimit(limit)
    return text.encode("utf-8", errors="surrogatepass")  # a lone surrogate stays invalid UTF-8


# ----------------------------------------------------------------------------- strategies

NAN, INF = float("nan"), float("inf")
EDGE_INTS = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 255, 256,
             1000, 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536, 65537, 100_000, 1_000_000, 1_000_001,
             2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**31, -2**63, 10**100, -10**100]
EDGE_FLOATS = [NAN, INF, -INF, 0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, 0.5, 0.999999, 1.0, 1.0000001, 1.5, 2.0,
               3.7, 15.999, 16.0, 16.0001, 100.0, 1e6, -0.5, -1.0, 1e-3, 0.07]
ODD_STRINGS = [
    "", " ", ".", "..", "../", "../x", "../../etc/passwd", "/", "/tmp/gndgl-fuzz", "a/b", "a\\b", "..\\..\\x",
    "~", "~/x", "$HOME", "${HOME}", "%s%s%n", "{0}", "{}", "[bold]x[/]", "[/]", "[link=x]y", "\x00", "a\x00b",
    "\x1b[31mred", "\u202eevil", "\ufeff", "ü", "名前", "🦀", "\ud800", "\udcff", "x" * 65, "y" * 5000,
    "null", "~", "true", "yes", "no", "on", "off", "1e3", "0x10", "0o17", "1_000", ".inf", ".nan", "-.inf",
    "2001-12-14", "12:30:00", "<<", "&a", "*a", "!!python/name:os.system", "- x", "a: b", "# c", "'", '"',
    "cpu", "cuda", "cuda:0", "cuda:999", "cuda:-1", "mps", "tpu", "resnet32", "resnet110", "vgg6a", "1c2f",
    "infopro", "predsim", "model", "joint", "separate", "balanced", "equal", "sgd", "adamw", "multistep",
    "conv", "block", "linear", "flatten", "bn", "relu", "dropout", "stem", "s1.b0", "s3.b4", "fc", "fc2",
    "conv1", "block1", "synthetic", "fashion-mnist", "/nonexistent/data.tar.gz", "m1.g0", "head", "e2e",
    "con", "nul", "aux", "inference", "manifest", "code", "weights",
]
# keys that exist somewhere in the spec format (renames / additions pick from these too)
SPEC_KEYS = [
    "name", "description", "model", "template", "width", "dropout", "layers", "input_shape", "num_classes",
    "op", "out", "kernel", "stride", "padding", "bias", "size", "p", "cuts", "depth", "split", "local", "head",
    "kind", "hidden", "beta", "variant", "recon_weight", "task_weight", "temperature", "projection",
    "share_ratio", "diversity", "weight", "final_head", "mode", "schedule", "placement", "devices", "workers",
    "train", "dataset", "data_root", "batch_size", "epochs", "optimizer", "lr", "momentum", "nesterov",
    "weight_decay", "betas", "warmup_epochs", "warmup_start_lr", "min_lr", "milestones", "gamma", "values",
    "augment", "crop_pad", "flip", "seed", "checkpoint_every", "log_every", "amp", "channels_last", "fused",
]
TAGS = [
    "tag:yaml.org,2002:python/object/apply:os.system",
    "tag:yaml.org,2002:python/object/apply:subprocess.check_output",
    "tag:yaml.org,2002:python/object/new:dict",
    "tag:yaml.org,2002:python/object:builtins.object",
    "tag:yaml.org,2002:python/name:os.system",
    "tag:yaml.org,2002:python/module:os",
    "tag:yaml.org,2002:python/tuple",
    "tag:yaml.org,2002:python/bytes",
    "tag:yaml.org,2002:python/complex",
    "tag:yaml.org,2002:python/none",
    "tag:yaml.org,2002:set",
    "tag:yaml.org,2002:omap",
    "tag:yaml.org,2002:pairs",
    "tag:yaml.org,2002:binary",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:merge",
    "tag:yaml.org,2002:value",
    "tag:yaml.org,2002:yaml",
    "!custom",
    "!gndgl/spec",
    "!",
    "tag:example.com,2000:app/foo",
]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00",
             b"\x1b", b"\t", b"\r", b"\r\n", b"\x85", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\x80\x80\x80"]
YAML_TOKENS = ["&a ", "*a", "*undefined ", "!!python/name:os.system ", "!!python/object/apply:os.system [ls] ",
               "!foo ", "!!binary ", "!!set ", "<<: ", "<<: *a\n", "? ", "- ", ": ", "{", "}", "[", "]", "'", '"',
               "%YAML 1.1\n", "%TAG ! tag:evil.com,2000:\n", "---\n", "...\n", "|\n", ">-\n", "#", ",", "\\",
               "&a [*a]", "\n  ", "\n- ", "{a: *a}", "&x x", "!!int ", "!!float ", "!!str ", "!!timestamp "]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(-70, 70),
    st.integers(),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
    st.binary(max_size=6),
    st.dates(min_value=dt.date(1, 1, 1)),
    st.datetimes(),
)
keys = st.one_of(st.sampled_from(SPEC_KEYS), st.sampled_from(ODD_STRINGS), scalars)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)


def _slots(node: Any, path: tuple = (), seen: set | None = None) -> list[tuple]:
    """Paths of every value in a dict/list tree (the root is ``()``); shared nodes once."""
    seen = set() if seen is None else seen
    out = [path]
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return out
        seen.add(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            out += _slots(v, path + (k,), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _slots(v, path + (i,), seen)
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _bomb(draw) -> Any:
    """Nested lists whose levels all alias the same object: width ** depth leaves."""
    b = draw(st.integers(2, 12))
    levels = draw(st.integers(2, 14))
    node: Any = [draw(st.sampled_from(["lol", 16, {"op": "conv", "out": 16}, None]))] * b
    for _ in range(levels - 1):
        node = [node] * b
    if draw(st.booleans()):
        node = {"k": node, "v": node}
    return node


def _nested(draw) -> Any:
    depth = draw(st.sampled_from([2, 10, 40, 63, 64, 65, 66, 100, 300]))
    leaf = draw(scalars)
    as_map = draw(st.booleans())
    node = leaf
    for _ in range(depth):
        node = {"a": node} if as_map else [node]
    return node


def _self_ref(draw) -> Any:
    if draw(st.booleans()):
        x: list = []
        x.append(x)
        return x
    y: dict = {}
    y["self"] = y
    return y


def _nudge(draw, v: Any) -> Any:
    """A value close to ``v`` in type: edge numbers, odd names, flipped bools, changed lists."""
    if isinstance(v, bool):
        return draw(st.sampled_from([not v, 0, 1, "true", "yes", None]))
    if isinstance(v, int):
        return draw(st.one_of(st.sampled_from(EDGE_INTS), st.sampled_from([v - 1, v + 1, -v, v * 2, v // 2, v * 1000,
                                                                          float(v), v + 0.5, str(v)])))
    if isinstance(v, float):
        near = [-v, v * 2, v / 2, v * 1e6, int(v) if math.isfinite(v) else 0, str(v)]
        return draw(st.one_of(st.sampled_from(EDGE_FLOATS), st.sampled_from(near)))
    if isinstance(v, str):
        return draw(st.one_of(st.sampled_from(ODD_STRINGS), st.sampled_from([v + "x", v[:-1], v.upper(), v + "/..",
                                                                            "../" + v, v + "/" + v, " " + v, v * 2])))
    if isinstance(v, list):
        if v and draw(st.booleans()):
            i = draw(st.integers(0, len(v) - 1))
            return v[:i] + [copy.deepcopy(v[i])] * draw(st.sampled_from([2, 3, 50])) + v[i + 1:]
        return draw(st.sampled_from([[], v[::-1], v + v, v[:1], [v]]))
    if isinstance(v, dict):
        w = dict(v)
        w[draw(keys)] = draw(values)
        return w
    return draw(values)


PLAUSIBLE_INTS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512]
PLAUSIBLE_FLOATS = [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0, 1.5, 2.0, 3.0, 4.0]
VOCABULARY = [s for s in ODD_STRINGS if s.isascii() and len(s) < 20 and s.replace(".", "").replace("-", "").isalnum()]


def _plausible(draw, v: Any) -> Any:
    """A value of the same type that the spec format may well accept (reaches the later stages)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return draw(st.sampled_from(PLAUSIBLE_INTS))
    if isinstance(v, float):
        return draw(st.sampled_from(PLAUSIBLE_FLOATS))
    if isinstance(v, str):
        return draw(st.sampled_from(VOCABULARY))
    if isinstance(v, list) and v:
        i = draw(st.integers(0, len(v) - 1))
        return v[:i] + v[i + 1:] if draw(st.booleans()) else v[:i + 1] + [copy.deepcopy(v[i])] + v[i + 1:]
    return v


MUTATIONS = ["drop", "duplicate", "rename", "add", "retype", "nudge", "nudge", "tag", "nest", "bomb",
             "self_ref", "swap", "convert"] + ["plausible"] * 6


@st.composite
def mutated_specs(draw) -> tuple[str, bytes]:
    spec_file = draw(st.sampled_from(SPEC_FILES))
    doc: Any = yaml.safe_load(spec_file.read_text())
    done = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        slots = _slots(doc)
        path = draw(st.sampled_from(slots))
        kind = draw(st.sampled_from(MUTATIONS))
        target = _get(doc, path)
        parent = _get(doc, path[:-1]) if path else None
        if kind == "drop" and path:
            del parent[path[-1]]
        elif kind in ("duplicate", "rename", "add") and isinstance(target, dict) and target:
            k = draw(st.sampled_from(list(target)))
            if kind == "duplicate":
                items = list(target.items())
                i = list(target).index(k)
                second = target[k] if draw(st.booleans()) else draw(values)
                items.insert(draw(st.integers(i + 1, len(items))), (k, second))
                doc = _set(doc, path, Pairs(items))  # Pairs is a leaf for later edits
            elif kind == "rename":
                new = draw(keys)
                doc = _set(doc, path, {(new if kk == k else kk): vv for kk, vv in target.items()}
                           if new not in target else target)
            else:
                target[draw(keys)] = draw(values)
        elif kind == "retype":
            doc = _set(doc, path, draw(values))
        elif kind == "nudge":
            doc = _set(doc, path, _nudge(draw, target))
        elif kind == "plausible":
            doc = _set(doc, path, _plausible(draw, target))
        elif kind == "tag":
            doc = _set(doc, path, Tagged(draw(st.sampled_from(TAGS)), target))
        elif kind == "nest":
            doc = _set(doc, path, _nested(draw))
        elif kind == "bomb":
            doc = _set(doc, path, _bomb(draw))
        elif kind == "self_ref":
            doc = _set(doc, path, _self_ref(draw))
        elif kind == "swap":
            other = _get(doc, draw(st.sampled_from(slots)))
            doc = _set(doc, path, other)  # shared object -> written as an anchor + alias
        elif kind == "convert" and isinstance(target, (dict, list)) and path:
            doc = _set(doc, path, list(target.values()) if isinstance(target, dict) else
                       {str(i): v for i, v in enumerate(target)})
        else:
            continue
        done.append(f"{kind}@{'.'.join(map(str, path)) or '<root>'}")
        if not isinstance(doc, (dict, list)):
            break
    data = dump(doc, draw(st.sampled_from([None, False, True])))
    data = draw(damaged(data))
    return f"{spec_file.stem}: {', '.join(done)}", data


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """Sometimes, byte-level damage of YAML text."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2]))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["bytes", "token", "cut", "dup_line", "truncate", "random"]))
        if kind == "bytes":
            data = data[:pos] + draw(st.sampled_from(BAD_BYTES)) + data[pos:]
        elif kind == "token":
            data = data[:pos] + draw(st.sampled_from(YAML_TOKENS)).encode() + data[pos:]
        elif kind == "cut":
            data = data[:pos] + data[pos + draw(st.integers(1, 40)):]
        elif kind == "dup_line":
            lines = data.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = b"\n".join(lines)
        elif kind == "truncate":
            data = data[:pos]
        else:
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data


SPEC_HEAD = b"name: fuzz\nmodel: {template: resnet20}\n"


@st.composite
def hostile_documents(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["value", "value", "alias_bomb", "text_nest", "tagged", "huge", "bytes",
                                 "spec_value", "merge", "many_keys", "long_net", "wide_net", "wide_net"]))
    if kind == "value":  # any YAML value as the whole document
        return kind, dump(draw(values), draw(st.sampled_from([None, True])))
    if kind == "spec_value":  # a valid head, then a random value in one section
        sec = draw(st.sampled_from(["model", "cuts", "local", "placement", "train", "name", "description"]))
        doc = {"name": "fuzz", "model": {"template": "resnet20"}, sec: draw(values)}
        return f"{kind}:{sec}", dump(doc, None)
    if kind == "alias_bomb":
        width, depth = draw(st.integers(2, 30)), draw(st.integers(2, 12))
        lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
        for i in range(1, depth):
            lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
        where = draw(st.sampled_from(["top", "cuts", "layers"]))
        last = f"*l{depth - 1}"
        tail = {"top": "", "cuts": f"cuts: {{depth: {last}}}\n", "layers": f"model: {{layers: {last}}}\n"}[where]
        head = SPEC_HEAD if where != "layers" else b"name: fuzz\n"
        return f"{kind}:{width}^{depth}", head + ("\n".join(lines) + "\n" + tail).encode()
    if kind == "text_nest":
        n = draw(st.sampled_from([63, 64, 65, 200, 1000, 5000, 30000, 200_000]))
        style = draw(st.sampled_from(["[", "{a: ", "- ", "map", "mixed"]))
        if style == "[":
            body = "[" * n + "]" * n
        elif style == "{a: ":
            body = "{a: " * n + "x" + "}" * n
        elif style == "- ":
            body = "- " * min(n, 5000) + "x"
        elif style == "map":
            n = min(n, 900)
            body = "".join("  " * i + "a:\n" for i in range(n)) + "  " * n + "x"
        else:
            body = "[{a: " * (n // 2) + "x" + "}]" * (n // 2)
        return f"{kind}:{style}x{n}", SPEC_HEAD + b"cuts:\n  depth: " + body.encode() + b"\n"
    if kind == "tagged":
        tag = draw(st.sampled_from([t.replace("tag:yaml.org,2002:", "!!") for t in TAGS] + ["!<tag:evil,1:x>"]))
        form = draw(st.sampled_from(["scalar", "map", "seq", "key", "doc"]))
        arg = {"scalar": f"{tag} 'echo pwned > /tmp/gndgl-fuzz-pwned'", "map": f"{tag} {{template: resnet20}}",
               "seq": f"{tag} [echo, pwned]", "key": "x", "doc": ""}[form]
        if form == "doc":
            return f"{kind}:{tag}:{form}", f"--- {tag}\nname: fuzz\nmodel: {{template: resnet20}}\n".encode()
        if form == "key":
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {{template: resnet20}}\n{tag} k: 1\n".encode()
        sec = draw(st.sampled_from(["model", "name", "cuts: {depth", "train: {optimizer", "local: {head"]))
        if "{" in sec:
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {{template: resnet20}}\n{sec}: {arg}}}\n".encode()
        if sec == "model":
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {arg}\n".encode()
        return f"{kind}:{tag}:{form}", f"name: {arg}\nmodel: {{template: resnet20}}\n".encode()
    if kind == "huge":
        size = draw(st.sampled_from([999_000, 1_000_001, 2_000_000]))
        filler = draw(st.sampled_from(["comment", "description"]))
        if filler == "comment":
            return f"{kind}:{filler}:{size}", SPEC_HEAD + b"#" + b"x" * size + b"\n"
        return f"{kind}:{filler}:{size}", SPEC_HEAD + b"description: " + b"x" * size + b"\n"
    if kind == "bytes":
        return kind, draw(st.binary(max_size=200))
    if kind == "long_net":  # many units (up to the 4096 allowed): cut search, partition count, placement
        n = draw(st.sampled_from([2, 40, 600, 1500]))
        c = draw(st.sampled_from([1, 4, 16]))
        k = draw(st.sampled_from([1, 2, 3, n // 2, n, 1024]))
        lines = [f"  - {{op: conv, out: {c}}}"] * n + ["  - {op: flatten}", "  - {op: linear, out: 10}"]
        workers = draw(st.sampled_from(["", "placement: {workers: 4096}\n", "placement: {devices: [cpu, cpu, cpu]}\n"]))
        return f"{kind}:{n}x{c}/K={k}", (f"name: long\nmodel:\n  input_shape: [1, 2, 2]\n  layers:\n" + "\n".join(lines)
                                         + f"\ncuts: {{depth: {k}, width: {draw(st.sampled_from([1, 2, c]))}}}\n"
                                         + workers).encode()
    if kind == "wide_net":  # wide templates and many groups: parameter and partition budgets
        template = draw(st.sampled_from(["resnet20", "resnet32", "resnet110", "vgg6a"]))
        width = draw(st.sampled_from([0.01, 1, 2, 4, 8, 16]))
        k = draw(st.sampled_from([1, 2, 4, 16, 54]))
        g = draw(st.sampled_from([1, 2, 16, 64, 256, 1024, 4096]))
        local = draw(st.sampled_from(["{}", "{share_ratio: 1.0, diversity: {weight: 0.5}}",
                                      "{head: {kind: mlp-sr, hidden: 65536}}", "{head: {kind: infopro}}"]))
        classes = draw(st.sampled_from([10, 100_000]))
        return f"{kind}:{template}x{width}/K={k}/G={g}", (
            f"name: wide\nmodel: {{template: {template}, width: {width}, num_classes: {classes}}}\n"
            f"cuts: {{depth: {k}, width: {g}, split: balanced}}\nlocal: {local}\n").encode()
    if kind == "merge":
        return kind, (SPEC_HEAD + b"base: &b {depth: 2, width: 2}\ncuts:\n  <<: *b\n  " +
                      draw(st.sampled_from([b"depth: 4", b"<<: *b", b"x: 1"])) + b"\n")
    n = draw(st.sampled_from([100, 5000, 20_000]))  # many_keys: a wide mapping (60k keys parse for ~4 s)
    return f"{kind}:{n}", SPEC_HEAD + b"train:\n" + b"".join(b"  k%d: 1\n" % i for i in range(n))


SPEC_NAMES = ["spec.yaml", "spec.yml", "spec", "a b.yaml", "ünïcødé.yaml", "..yaml", "x..y.yaml", "-dash.yaml",
              "--help.yaml", "#.yaml", "$(touch pwned).yaml", "name'quote\".yaml"]
OUT_NAMES = ["artifact", "a b", "compiled", "new/nested/dir", "x/../y", "-o", ".hidden", "ünï"]


# ----------------------------------------------------------------------------- the tests


def _fuzz(runner, fuzz_root, strategy, max_examples: int, label: str, record_property) -> Stats:
    stats = Stats()
    root = fuzz_root / label
    root.mkdir(exist_ok=True)
    t0 = time.monotonic()

    @settings(max_examples=max_examples, **FUZZ_SETTINGS)
    @given(case=strategy, spec_name=st.sampled_from(SPEC_NAMES), out_name=st.sampled_from(OUT_NAMES))
    @hypothesis.seed(int(SEED or 0))
    def one(case, spec_name, out_name):
        what, doc = case
        hypothesis.note(f"{what} | file {spec_name!r} | -o {out_name!r}")
        res = compile_document(runner, root, doc, spec_name=spec_name, out_name=out_name, stats=stats)
        if res.wall > 2.0:
            stats.slow[-1] += (what,)

    one()
    stats.seconds = time.monotonic() - t0
    leftovers = sorted(p.name for p in root.iterdir())
    assert not leftovers, f"examples left files behind in {root}: {leftovers[:10]}"
    print("\n" + stats.line(label))
    for slow in stats.slow:
        print("  slow:", slow)
    record_property(f"{label}_examples", stats.examples)
    record_property(f"{label}_compiled", stats.ok)
    return stats


def test_fuzz_mutated_shipped_specs(runner, fuzz_root, record_property):
    stats = _fuzz(runner, fuzz_root, mutated_specs(), MUTATION_EXAMPLES, "mutated", record_property)
    assert stats.examples >= MUTATION_EXAMPLES * 0.8
    assert stats.ok > 0 and stats.refused > 0  # the mutations reach both outcomes


def test_fuzz_hostile_documents(runner, fuzz_root, record_property):
    stats = _fuzz(runner, fuzz_root, hostile_documents(), HOSTILE_EXAMPLES, "hostile", record_property)
    assert stats.examples >= HOSTILE_EXAMPLES * 0.8


def test_runner_reports_tracebacks_hangs_and_memory(runner, fuzz_root):
    """The harness itself: a crash, a hang and a memory blow-up are seen as such."""
    box = fuzz_root / "selftest"
    for sub in ("cwd", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    res = runner.run(["compile", str(SPECS / "resnet32_k2g1.yaml"), "-o", str(box / "ok")], box)
    assert res.rc == 0 and res.signal is None and (box / "ok" / "manifest.json").is_file(), res.describe()
    res = runner.run(["compile", str(box / "missing.yaml"), "-o", str(box / "o")], box)
    assert res.rc == 2 and res.stderr.startswith("error:"), res.describe()
    # no address space to spare: the same compile must not look like a success or a clean error
    # (a starved child may also hang in the allocator: a short alarm ends it, and SIGALRM counts as a signal)
    res = runner.run(["compile", str(SPECS / "resnet32_k2g1.yaml"), "-o", str(box / "o2")], box, mem=1 << 20,
                     timeout=5)
    assert res.signal is not None or res.rc not in (0, 2), res.describe()
    res = runner.run(["compile", str(SPECS / "vgg6a_g6_sg_div.yaml"), "-o", str(box / "o3")], box, timeout=1)
    assert res.signal == 14 or res.wall < 1.0, res.describe()


# ----------------------------------------------------------------------------- the cut search


def _reference_split(costs: list[int], k: int) -> list[int]:
    """The O(k·n²) min-max DP that ``balanced_split`` replaced (first minimiser on ties)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    dp = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    dp[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(dp[j - 1][s], prefix[i] - prefix[s])
                if v < dp[j][i]:
                    dp[j][i], arg[j][i] = v, s
    starts, i = [], n
    for j in range(k, 0, -1):
        i = arg[j][i]
        starts.append(i)
    return sorted(starts)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(st.lists(st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 10**9)), min_size=1, max_size=14)
       .flatmap(lambda c: st.tuples(st.just(c), st.integers(1, len(c)))))
def test_balanced_split_matches_the_quadratic_dp(case):
    from gndgl_compiler.partition.cuts import balanced_split
    costs, k = case
    assert balanced_split(costs, k) == _reference_split(costs, k)


def test_balanced_split_is_fast_at_the_schema_limits():
    """4096 units cut K=1024 ways (or 2048 partitions over 4096 workers) used to take O(k·n²): hours."""
    from gndgl_compiler.partition.cuts import balanced_split
    t0 = time.monotonic()
    starts = balanced_split([100 + i % 7 for i in range(4094)], 1024)
    assert len(starts) == 1024 and starts[0] == 0
    assert len(balanced_split([3] * 2049, 1000)) == 1000
    assert time.monotonic() - t0 < 20


# ----------------------------------------------------------------------------- regressions

REGRESSION_FILES = sorted(p for p in REGRESSIONS.glob("*") if p.is_file() and p.name != "README.md") \
    if REGRESSIONS.is_dir() else []


def _expectations(doc: bytes) -> tuple[int | None, list[str]]:
    rc, frags = None, []
    for raw in doc.split(b"\n"):
        if not raw.startswith(b"#"):
            break
        key, _, val = raw[1:].decode("utf-8", errors="replace").strip().partition(":")
        if key == "expect-rc":
            rc = int(val)
        elif key == "expect":
            frags.append(val.strip())
    return rc, frags


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=lambda p: p.name)
def test_fuzz_regression(path: Path, runner, fuzz_root):
    doc = path.read_bytes()
    res = compile_document(runner, fuzz_root / "regressions", doc, spec_name="spec.yaml")
    rc, frags = _expectations(doc)
    if rc is not None:
        assert res.rc == rc, res.describe()
    for frag in frags:
        assert frag in res.stderr.replace("\n", " "), (frag, res.describe())


def test_regression_corpus_exists():
    assert REGRESSION_FILES, "tests/fuzz_regressions/ holds the failures the fuzzer found"
