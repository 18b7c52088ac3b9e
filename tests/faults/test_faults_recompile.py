"""Fault injection: a compile killed while replacing an existing artifact.

The guarantee (README, "Artifacts"):

5. a compile killed while replacing an artifact leaves the old or the new artifact, never a mix
   (where the file system lacks an atomic exchange, the error says where the old one was left).
   (A tampered run directory: ``tests/faults/test_faults_tamper.py``.)

``gndgl compile`` runs as children forked from the helper process (``tests/fault_process.py``)
whose file system SIGKILLs them after the N-th file-system change; N is drawn with the seeded RNG
of ``GNDGL_FAULT_SEED``.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from fault_helpers import SEED, SPEC, assert_clean_cli_error, assert_ok, cli_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and /proc (Linux)")


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
