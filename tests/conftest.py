"""Shared test fixtures (session fixtures: the distributed tests' ``tests/dist_fixtures.py``, the fault-injection
tests' ``tests/fault_fixtures.py``, the spec fuzzer's ``tests/fuzz_fixtures.py``)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

pytest_plugins = ["dist_fixtures", "fault_fixtures", "fuzz_fixtures"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def pytest_report_header(config) -> str:
    """Which machine and kernels ran the float tests: a tolerance failure can then be traced to a CPU."""
    return (f"cpu: {cpu_model()}; torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny tensors run faster and are immune to a loaded
    machine (results are bit-exact with 2 threads too). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
