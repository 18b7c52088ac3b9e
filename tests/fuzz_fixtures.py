"""Session-scoped fixtures the spec-fuzzing test files (``tests/fuzz/test_fuzz_specs.py``,
``tests/fuzz/test_fuzz_regressions.py``) share (a pytest plugin: ``tests/conftest.py`` lists it in
``pytest_plugins``), so the warm worker starts once.

    fuzz_root   the sandbox directory of every example
    runner      the warm forking worker (``tests/fuzz_runner.py``: ``ForkRunner``)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuzz_runner import ForkRunner


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="session")
def runner(fuzz_root):
    if not hasattr(os, "fork") or not Path("/proc/self/status").exists():
        pytest.skip("the fuzz runner needs fork() and /proc (Linux)")
    r = ForkRunner(fuzz_root / "worker.log")
    yield r
    r.close()
