"""Replays of the failures the spec fuzzer (``tests/fuzz/test_fuzz_specs.py``) found.

Each file in ``tests/fuzz/fuzz_regressions/`` (raw bytes) is one document that once compiled with a
traceback, a hang or another disallowed outcome; it is compiled again through the same forking
runner (``tests/fuzz_runner.py``) and must end in an allowed outcome (exit 0 with only the artifact
written, or exit 2 with a clean ``error:``). Optional leading ``# expect: FRAGMENT`` lines name
words the message must hold, ``# expect-rc: N`` the exit status.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_runner import compile_document
from paths import FUZZ_REGRESSIONS


# ----------------------------------------------------------------------------- regressions

REGRESSION_FILES = sorted(p for p in FUZZ_REGRESSIONS.glob("*") if p.is_file() and p.name != "README.md") \
    if FUZZ_REGRESSIONS.is_dir() else []


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
    assert REGRESSION_FILES, "tests/fuzz/fuzz_regressions/ holds the failures the fuzzer found"
