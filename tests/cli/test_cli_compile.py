"""The ``gndgl`` CLI: the bad-input corpus, bad invocations, and the happy path.

Every file ``tests/cli/bad_specs/NN_name.yaml`` carries its expectations in leading
comments::

    # expect: field 'cuts.width'        (a fragment the message must contain; repeatable)
    # line: 9                           (the message must name '<file>:9')
    # xfail: why                        (a known library bug: the whole case is expected to fail)
    # xfail-cli: why                    (the API is right, the CLI output is known to be wrong)

Each file goes through the Python API (``load_spec`` + ``compile_spec`` must raise a
``GndglError`` / ``SpecError`` with the fragments) and through the CLI (exit code 2,
fragments on stderr, no traceback anywhere, nothing written to ``-o``).

A Python process costs ~2 s here just to import torch, so the CLI runs of the corpus
go through a small *fork runner*: one helper process imports torch/gndgl once and
then, per invocation, forks a child that redirects its stdout/stderr to files and
executes ``gndgl_cli.main`` as ``__main__`` exactly like ``python -m gndgl_cli.main``
(uncaught exception -> traceback + exit 1, ``SystemExit`` -> its code). A sample of
invocations is also run with a plain ``subprocess.run([sys.executable, "-m",
"gndgl_cli.main", ...])`` and must give byte-identical results, which keeps the
runner honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gndgl_compiler import compile_spec, load_spec
from gndgl_compiler.errors import GndglError, SpecError
from paths import BAD_SPECS, REPO, SPECS, TESTS

BAD_FILES = sorted(BAD_SPECS.glob("*.yaml"))



# ----------------------------------------------------------------------------- corpus reading


def read_expectations(path: Path) -> dict:
    exp = {"expect": [], "line": None, "xfail": None, "xfail_cli": None}
    for raw in path.read_bytes().split(b"\n"):
        if not raw.startswith(b"#"):
            break
        line = raw.decode("utf-8")
        key, _, val = line[1:].strip().partition(":")
        val = val.strip()
        if key == "expect":
            exp["expect"].append(val)
        elif key == "line":
            exp["line"] = int(val)
        elif key == "xfail":
            exp["xfail"] = val
        elif key == "xfail-cli":
            exp["xfail_cli"] = val
    return exp


def _corpus_params():
    out = []
    for f in BAD_FILES:
        exp = read_expectations(f)
        marks = [pytest.mark.xfail(reason=exp["xfail"])] if exp["xfail"] else []
        out.append(pytest.param(f, id=f.stem, marks=marks))
    return out


def test_corpus_is_large_and_well_formed():
    assert len(BAD_FILES) >= 30
    names = [f.name for f in BAD_FILES]
    numbers = [n.split("_", 1)[0] for n in names]
    assert all(x.isdigit() and len(x) in (2, 3) and "_" in n for x, n in zip(numbers, names))
    assert len(set(numbers)) == len(names), "numbers must be unique"
    for f in BAD_FILES:
        exp = read_expectations(f)
        assert exp["expect"], f"{f.name} has no '# expect:' line"
        assert f.read_bytes().startswith(b"# expect:"), f"{f.name}: the first line must be '# expect: ...'"


# ----------------------------------------------------------------------------- CLI runners

FORK_RUNNER = r'''
import json, os, runpy, sys
sys.path.append(sys.argv[1])  # tests/, for cli_helpers
from cli_helpers import exit_status
import gndgl_compiler, gndgl_cli.common, gndgl_cli.compile_cmd, gndgl_cli.train_cmd, gndgl_cli.viz_cmd  # warm up
import gndgl_compiler.api, gndgl_compiler.spec  # torch too: the CLI imports it lazily
assert "gndgl_cli.main" not in sys.modules
jobs = json.load(sys.stdin)
codes = []
for job in jobs:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fo = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fe = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fo, 1); os.dup2(fe, 2)
            os.chdir(job["cwd"])
            sys.argv = [job["argv0"]] + job["args"]
            code = exit_status(lambda: runpy.run_module("gndgl_cli.main", run_name="__main__", alter_sys=True))
            sys.stdout.flush(); sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes.append(os.waitstatus_to_exitcode(status))
sys.stdout.write(json.dumps(codes))
'''

def _main_file() -> str:
    import gndgl_cli.common as common
    return str(Path(common.__file__).with_name("main.py"))


class CliResult:
    def __init__(self, rc: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr

    def __repr__(self):
        return f"CliResult(rc={self.returncode}, stderr={self.stderr[-400:]!r})"


def fork_run(invocations: list[list[str]], work: Path, cwd: Path) -> list[CliResult]:
    """Run ``python -m gndgl_cli.main ARGS`` for each ARGS in a forked child of one warm process."""
    if not hasattr(os, "fork"):  # no fork (Windows): plain processes, slower but the same
        return [real_run(args, cwd) for args in invocations]
    work.mkdir(parents=True, exist_ok=True)
    jobs = [{"args": args, "stdout": str(work / f"{i}.out"), "stderr": str(work / f"{i}.err"),
             "cwd": str(cwd), "argv0": _main_file()} for i, args in enumerate(invocations)]
    proc = subprocess.run([sys.executable, "-c", FORK_RUNNER, str(TESTS)], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=300, cwd=str(cwd))
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout)
    return [CliResult(rc, Path(j["stdout"]).read_text(errors="replace"), Path(j["stderr"]).read_text(errors="replace"))
            for rc, j in zip(codes, jobs)]


def real_run(args: list[str], cwd: Path) -> CliResult:
    p = subprocess.run([sys.executable, "-m", "gndgl_cli.main", *args], capture_output=True, text=True,
                       timeout=300, cwd=str(cwd))
    return CliResult(p.returncode, p.stdout, p.stderr)


def assert_clean_failure(res: CliResult, *fragments: str) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res
    assert res.returncode == 2, res
    for frag in fragments:
        assert frag in res.stderr, (frag, res)
    assert res.stderr.strip().startswith("error:"), res


# ----------------------------------------------------------------------------- module-wide runs


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def _corpus_args(f: Path, out_root: Path) -> list[str]:
    return ["compile", str(f), "-o", str(out_root / f.stem)]


NOT_ARTIFACT = "not_an_artifact"


def _misc_invocations(tmp: Path) -> dict[str, list[str]]:
    (tmp / NOT_ARTIFACT).mkdir(exist_ok=True)
    (tmp / NOT_ARTIFACT / "notes.txt").write_text("mine\n")
    (tmp / "a_file").write_text("x\n")
    (tmp / "specdir.yaml").mkdir(exist_ok=True)
    good = str(SPECS / "resnet32_k2g2.yaml")
    return {
        "missing_spec": ["compile", str(tmp / "nope.yaml"), "-o", str(tmp / "o_missing")],
        "spec_is_directory": ["compile", str(tmp / "specdir.yaml"), "-o", str(tmp / "o_dir")],
        "unwritable_output": ["compile", good, "-o", "/proc/gndgl_x/out"],
        "output_is_non_artifact_dir": ["compile", good, "-o", str(tmp / NOT_ARTIFACT)],
        "output_is_a_file": ["compile", good, "-o", str(tmp / "a_file")],
        "inspect_non_artifact": ["inspect", str(tmp / NOT_ARTIFACT)],
        "inspect_missing_dir": ["inspect", str(tmp / "does_not_exist")],
        "inspect_a_file": ["inspect", str(tmp / "a_file")],
        "usage_missing_argument": ["compile"],
        "usage_unknown_command": ["frobnicate"],
        "usage_bad_option_value": ["compile", good, "-o", str(tmp / "o_w"), "--workers", "0"],
        "usage_unknown_option": ["compile", good, "--frobnicate"],
        "usage_no_arguments": [],
    }


REAL_SAMPLE = ["01_unknown_top_level_key", "54_yaml_syntax_error"]


@pytest.fixture(scope="module")
def runs(cli_tmp):
    """Every CLI invocation of this module, run once.

    Thread 1: the fork runner (one warm process) runs all corpus files, the bad
    invocations and the happy path one after another, in this order.
    Thread 2 (meanwhile): a few plain ``python -m gndgl_cli.main`` processes.
    """
    out_root = cli_tmp / "out"
    out_root.mkdir()
    misc = _misc_invocations(cli_tmp)
    quick_art, k8g4_fork, k8g4_real = cli_tmp / "quickstart_art", cli_tmp / "k8g4_fork", cli_tmp / "k8g4_real"
    quick = str(SPECS / "quickstart_fmnist.yaml")
    k8g4 = str(SPECS / "resnet32_k8g4.yaml")
    happy = {"compile_table": ["compile", quick, "-o", str(quick_art)],
             "recompile": ["compile", quick, "-o", str(quick_art)],
             "inspect_json": ["inspect", str(quick_art), "--json"],
             "compile_json": ["compile", k8g4, "-o", str(k8g4_fork), "--json"],
             "inspect": ["inspect", str(k8g4_fork)],
             "schema": ["schema"]}
    invocations = [_corpus_args(f, out_root) for f in BAD_FILES] + list(misc.values()) + list(happy.values())
    real_args = {name: _corpus_args(BAD_SPECS / f"{name}.yaml", out_root) for name in REAL_SAMPLE}
    real_args["unwritable_output"] = misc["unwritable_output"]
    real_args["compile_json"] = ["compile", k8g4, "-o", str(k8g4_real), "--json"]
    real_args["schema"] = ["schema"]

    def plain():
        return {name: real_run(args, REPO) for name, args in real_args.items()}

    with ThreadPoolExecutor(max_workers=2) as ex:
        fut_fork = ex.submit(fork_run, invocations, cli_tmp / "fork", REPO)
        fut_real = ex.submit(plain)
        results, real = fut_fork.result(), fut_real.result()
    n, m = len(BAD_FILES), len(misc)
    return {"corpus": dict(zip(BAD_FILES, results[:n])), "misc": dict(zip(misc, results[n:n + m])),
            "happy": dict(zip(happy, results[n + m:])), "real": real, "out_root": out_root,
            "quick_art": quick_art, "k8g4_fork": k8g4_fork, "k8g4_real": k8g4_real}


# ----------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("path", _corpus_params())
def test_bad_spec_is_refused_by_api_and_cli(path: Path, runs):
    exp = read_expectations(path)
    # --- Python API
    with pytest.raises(GndglError) as info:
        compile_spec(load_spec(path))
    err = info.value
    msg = str(err)
    assert isinstance(err, SpecError), f"{type(err).__name__}: {msg}"
    for frag in exp["expect"]:
        assert frag in msg, f"expected {frag!r} in: {msg}"
    if exp["line"] is not None:
        assert f"{path.name}:{exp['line']}" in msg, f"expected line {exp['line']} in: {msg}"
    assert "Traceback" not in msg
    # --- CLI (gndgl compile PATH -o OUT)
    res = runs["corpus"][path]
    try:
        assert_clean_failure(res, *exp["expect"])
        if exp["line"] is not None:
            assert f"{path.name}:{exp['line']}" in res.stderr
        assert not (runs["out_root"] / path.stem).exists(), "a failed compile must not write its output"
    except AssertionError:
        if exp["xfail_cli"]:
            pytest.xfail(exp["xfail_cli"])
        raise


@pytest.mark.parametrize("name", REAL_SAMPLE)
def test_fork_runner_matches_plain_subprocess(name, runs):
    a, b = runs["corpus"][BAD_SPECS / f"{name}.yaml"], runs["real"][name]
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert_clean_failure(b)


def test_plain_subprocess_unwritable_output(runs):
    a, b = runs["misc"]["unwritable_output"], runs["real"]["unwritable_output"]
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert_clean_failure(b, "cannot write the artifact", "/proc/gndgl_x/out")


# ----------------------------------------------------------------------------- bad invocations

BAD_INVOCATIONS = {
    "missing_spec": ["does not exist", "nope.yaml"],
    "spec_is_directory": ["is a directory", "give a spec file"],
    "unwritable_output": ["cannot write the artifact to '/proc/gndgl_x/out'"],
    "output_is_non_artifact_dir": ["exists and is not a gndgl artifact", NOT_ARTIFACT],
    "output_is_a_file": ["exists and is not a gndgl artifact", "a_file"],
    "inspect_non_artifact": ["has no manifest.json", "not a gndgl artifact"],
    "inspect_missing_dir": ["does not exist", "gndgl compile"],
    "inspect_a_file": ["is not a directory"],
}


@pytest.mark.parametrize("name", sorted(BAD_INVOCATIONS))
def test_bad_invocation_exits_2_with_clean_message(name, runs, cli_tmp):
    assert_clean_failure(runs["misc"][name], *BAD_INVOCATIONS[name])
    if name == "output_is_non_artifact_dir":  # the user's directory is left alone
        assert sorted(p.name for p in (cli_tmp / NOT_ARTIFACT).iterdir()) == ["notes.txt"]
    if name == "output_is_a_file":
        assert (cli_tmp / "a_file").read_text() == "x\n"


@pytest.mark.parametrize("name", ["usage_missing_argument", "usage_unknown_command", "usage_bad_option_value",
                                  "usage_unknown_option", "usage_no_arguments"])
def test_usage_error_exits_2_without_traceback(name, runs):
    res = runs["misc"][name]
    assert "Traceback" not in res.stdout + res.stderr, res
    assert res.returncode == 2, res


# ----------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("how", ["plain", "fork"])
def test_cli_compile_json_k8g4(runs, how):
    res = runs["real"]["compile_json"] if how == "plain" else runs["happy"]["compile_json"]
    art_dir = runs["k8g4_real"] if how == "plain" else runs["k8g4_fork"]
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    data = json.loads(res.stdout)
    assert data["name"] == "resnet32_k8g4"
    assert data["modules"] == 8 and data["groups"] == [4] * 8 and data["final_mode"] == "separate"
    assert len(data["partitions"]) == 33 == data["summary"]["partitions"]
    assert data["summary"]["training_speedup"] == pytest.approx(30.47, rel=0.05)
    assert data["summary"]["inference_speedup"] == pytest.approx(2.324, rel=0.05)
    assert Path(data["path"]) == art_dir
    assert (art_dir / "manifest.json").is_file()
    names = [p["name"] for p in data["partitions"]]
    assert names[0] == "m1.g0" and names[-1] == "head" and len(set(names)) == 33
    for p in data["partitions"]:
        assert {"fwd_macs", "bwd_macs", "params", "bytes_in", "bytes_out", "device", "worker"} <= set(p)


def test_plain_and_forked_compile_agree(runs):
    a = json.loads(runs["real"]["compile_json"].stdout)
    b = json.loads(runs["happy"]["compile_json"].stdout)
    a.pop("path"), b.pop("path")
    assert a == b
    ma = json.loads((runs["k8g4_real"] / "manifest.json").read_text())["files"]
    mb = json.loads((runs["k8g4_fork"] / "manifest.json").read_text())["files"]
    assert ma == mb  # same spec, same seed: byte-identical artifacts


def test_cli_inspect(runs):
    res = runs["happy"]["inspect"]
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "resnet32_k8g4" in res.stdout
    assert "33" in res.stdout and "speed-up" in res.stdout


@pytest.mark.parametrize("how", ["plain", "fork"])
def test_cli_schema_is_json_with_properties(runs, how):
    res = runs["real"]["schema"] if how == "plain" else runs["happy"]["schema"]
    assert res.returncode == 0, res.stderr
    schema = json.loads(res.stdout)
    assert {"name", "model", "cuts", "local", "placement", "train"} <= set(schema["properties"])
    assert "Cuts" in schema["$defs"] and "properties" in schema["$defs"]["Cuts"]


def test_cli_compile_table_recompile_and_inspect_json(runs):
    """Human-readable compile output, recompiling over an artifact, inspect --json."""
    res, art = runs["happy"], runs["quick_art"]
    for key in ("compile_table", "recompile", "inspect_json"):
        assert res[key].returncode == 0 and "Traceback" not in res[key].stdout + res[key].stderr, res[key]
    assert "quickstart_fmnist" in res["compile_table"].stdout and "speed-up" in res["compile_table"].stdout
    assert f"wrote {art}" in res["recompile"].stdout.replace("\n", "")
    data = json.loads(res["inspect_json"].stdout)
    assert data["name"] == "quickstart_fmnist" and len(data["partitions"]) == 5
    assert data["summary"]["partitions"] == 5


@pytest.mark.parametrize("spec", sorted([*SPECS.glob("*.yaml"), *SPECS.glob("auglocal/*.yaml")]),
                         ids=lambda p: p.stem)
def test_every_example_spec_compiles(spec):
    art = compile_spec(spec)
    s = art.summary
    assert s["partitions"] == len(art.plan.partitions) == len(art.modules)
    assert s["training_speedup"] >= 1.0 - 1e-9
    assert s["inference_speedup"] >= 1.0 - 1e-9
    assert art.plan.name == spec.stem
