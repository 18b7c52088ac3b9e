"""A worker for tests: the real distributed worker with a fault-injecting Transport around PeerComm.

``GNDGL_TEST_FAULT=kind:RANK:STEP`` (kind: kill | hang | raise), read here only: global rank RANK
SIGKILLs itself, hangs, or raises when the training loop begins global step STEP. Installed
through the launcher's seam — ``GNDGL_WORKER_MODULE=fault_worker`` with this
directory on ``PYTHONPATH`` (``tests/dist_helpers.py``, for ``tests/distributed/test_distributed_faults.py``) — or run
by torchrun as
``-m fault_worker``. Production code reads no fault variable.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "GNDGL_TEST_FAULT"


def parse(text: str, rank: int) -> tuple[str, int] | None:
    """``(kind, step)`` when ``text`` (``kind:RANK:STEP``) names this rank, else None."""
    if not text:
        return None
    kind, r, step = text.split(":")
    if kind not in ("kill", "hang", "raise"):
        raise ValueError(f"{ENV}: unknown fault kind {kind!r}")
    return (kind, int(step)) if int(r) == rank else None


class FaultyTransport:
    """Wraps a Transport; when step ``step`` begins, injects ``kind``; otherwise forwards everything."""

    def __init__(self, inner, kind: str, step: int):
        self.inner, self.kind, self.at = inner, kind, step

    def begin_step(self, step: int) -> None:
        if step == self.at:
            if self.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.kind == "hang":
                time.sleep(10 ** 6)
            else:
                raise RuntimeError(f"injected fault ({ENV})")
        self.inner.begin_step(step)

    def __getattr__(self, name: str):  # in_process, bytes_sent, drain, recv_inputs, ...
        return getattr(self.inner, name)


def wrap(comm):
    """``transport=`` of the worker's ``main``: this rank's PeerComm, faulty if ``GNDGL_TEST_FAULT`` names it."""
    fault = parse(os.environ.get(ENV, ""), comm.rank + comm.offset)  # global rank: with replicas, r·N + stage
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":  # a torchrun restart runs without the fault
        fault = None
    return comm if fault is None else FaultyTransport(comm, *fault)


def main() -> int:
    from gndgl_compiler import worker

    return worker.main(transport=wrap)


if __name__ == "__main__":
    sys.exit(main())
