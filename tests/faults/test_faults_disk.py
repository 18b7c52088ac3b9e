"""Fault injection: a read-only run directory or a full disk.

The guarantee (README, "Training"):

3. a read-only run directory or a full disk gives a clear error that names the path, and no
   earlier checkpoint is lost: the run resumes once the condition clears.

The runs are children forked from the helper process (``tests/fault_process.py``) whose file
system makes the run directory read-only, fails every fsync with ENOSPC, or fills a real (private,
64 MiB) tmpfs after the N-th checkpoint.
"""

from __future__ import annotations

import json
import stat
import sys

import pytest

from fault_helpers import SETTINGS, Result, assert_clean_cli_error, assert_ok, cli_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, SIGKILL and /proc (Linux)")


# ---------------------------------------------------------------- 3. read-only directory, full disk


def test_read_only_run_directory_gives_a_clear_error_and_keeps_checkpoints(setup):
    from gndgl_compiler.runtime.checkpoint.directory import latest_valid_checkpoint

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
    from gndgl_compiler.runtime.checkpoint.directory import latest_valid_checkpoint

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
