"""Fault injection: a damaged or tampered run directory.

The guarantees (README, "Training" and "Artifacts"):

2. a truncated or corrupted newest checkpoint falls back to the previous one with a warning
   that names the file;
5. a tampered run directory is refused with a message naming the file (exit status 2, no
   traceback). (A compile killed while replacing an artifact: ``tests/faults/test_faults_recompile.py``.)

The commands run as children forked from the helper process (``tests/fault_process.py``) on
copies of one partial run (``partial_run``), each damaged in its own way.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fault_helpers import SETTINGS, assert_clean_cli_error, assert_ok, cli_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and /proc (Linux)")


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
