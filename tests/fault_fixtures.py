"""Session-scoped fixtures the fault-injection test files (``tests/faults/``) share (a pytest
plugin: ``tests/conftest.py`` lists it in ``pytest_plugins``), so the reference run is trained once.

    setup   the tiny spec compiled once, the helper process (``tests/fault_process.py``) and an
            uninterrupted reference run every faulted run must end equal to

Helpers: ``tests/fault_helpers.py``.
"""

from __future__ import annotations

import pytest
import torch

from fault_helpers import SETTINGS, SPEC, Driver, Setup, assert_ok, cli_job


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    from gndgl_compiler import compile_spec

    root = tmp_path_factory.mktemp("faults")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        art = compile_spec(SPEC.replace("SEED", "3"), out_dir=root / "artifact").path
    finally:
        torch.set_num_threads(n)
    driver = Driver(root)
    try:
        ref = root / "reference"
        (res,) = driver.run(cli_job("reference", root, "train", art, "--run-dir", ref, *SETTINGS))
        assert_ok(res)
        yield Setup(driver, root, art, ref)
    finally:
        driver.close()
