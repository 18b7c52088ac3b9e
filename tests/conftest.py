"""Shared test fixtures (session fixtures: the distributed tests' ``tests/dist_fixtures.py``, the fault-injection
tests' ``tests/fault_fixtures.py``, the spec fuzzer's ``tests/fuzz_fixtures.py``)."""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["dist_fixtures", "fault_fixtures", "fuzz_fixtures"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny tensors run faster and are immune to a loaded
    machine (results are bit-exact with 2 threads too). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
