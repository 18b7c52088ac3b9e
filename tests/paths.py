"""Where things are, for every test and helper (instead of ``__file__`` arithmetic in each file): the
repository, its shipped specs, this tests folder and the data files the tests keep next to them."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent  # on sys.path in every test (pytest's prepend mode: conftest.py's folder)
REPO = TESTS.parent
SPECS = REPO / "specs"
BAD_SPECS = TESTS / "cli" / "bad_specs"  # the bad-input corpus of tests/cli/test_cli_compile.py
FUZZ_REGRESSIONS = TESTS / "fuzz" / "fuzz_regressions"  # the fuzzer's failures, replayed by tests/fuzz/
RUN_JSON_V0 = TESTS / "runtime" / "run" / "run_json_v0.json"
"""A run.json written by the code before the settings were declared (a 3-step run of the tiny spec)."""
