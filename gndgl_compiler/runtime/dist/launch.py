"""Local launcher: ``gndgl train compiled/ --workers N`` runs N ranks on this machine.

It sets the same environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and starts ``python -m gndgl_compiler.worker`` N times.
If any rank exits non-zero, the others are stopped (SIGTERM, then SIGKILL) and
the error names the rank and its partitions; children die with the launcher
(PR_SET_PDEATHSIG), so no orphan survives.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from ...errors import DistributedError, DistributedSetupError

PR_SET_PDEATHSIG = 1
WORKER_MODULE = "gndgl_compiler.worker"
"""The module every rank runs (``python -m``) unless ``module=`` or the environment variable
:data:`WORKER_MODULE_ENV` names another: a module that calls ``gndgl_compiler.worker.main(transport=...)``
to wrap each rank's transport (``tests/fault_worker.py`` injects faults so)."""
WORKER_MODULE_ENV = "GNDGL_WORKER_MODULE"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Raise :class:`DistributedSetupError` (exit 2) if ``port`` is already taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise DistributedSetupError(f"port {port} is in use; choose another with --port or omit it") from None


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def launch_local(workers: int, worker_args: list[str], *, port: int | None = None, threads: int | None = None,
                 partitions_of: dict[int, list[str]] | None = None, poll_s: float = 0.2,
                 module: str | None = None) -> None:
    """Run ``workers`` ranks of ``python -m gndgl_compiler.worker worker_args`` and wait for all.

    Args:
        workers: number of ranks.
        worker_args: arguments of ``gndgl_compiler.worker``.
        port: rendezvous port (default: a free one).
        threads: intra-op threads per rank (default: cores // workers, at least 1).
        partitions_of: rank -> partition names, for error messages.
        module: the module each rank runs (default: ``$GNDGL_WORKER_MODULE``, else :data:`WORKER_MODULE`).

    Raises:
        DistributedSetupError: a rank refused its input (its exit status 2: the error it printed is the
            reason; exit status 2 here too).
        DistributedError: a rank failed otherwise; names it, its exit code and its partitions.
    """
    if workers < 1:
        raise DistributedSetupError(f"--workers must be at least 1, got {workers}")
    if port is None:
        port = free_port()
    else:
        check_port(port)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    module = module or os.environ.get(WORKER_MODULE_ENV) or WORKER_MODULE
    procs: list[subprocess.Popen] = []
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(workers),
                OMP_NUM_THREADS=str(threads), GNDGL_BACKEND=os.environ.get("GNDGL_BACKEND", ""))
    try:
        for r in range(workers):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(subprocess.Popen([sys.executable, "-m", module, *worker_args,
                                           "--threads", str(threads)], env=env, preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                time.sleep(min(1.0, 5 * poll_s))  # a peer that noticed first may exit first: look again
                codes = [p.poll() for p in procs]
                failed += [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and (r, c) not in failed]
                r, c = _culprit(failed)
                _stop(procs)
                names = ", ".join((partitions_of or {}).get(r, [])) or "?"
                if c == 2:  # the rank refused its input (bad data set, option, artifact) and said why above
                    raise DistributedSetupError(f"rank {r} (partitions {names}) stopped on the error above (exit "
                                                "status 2); the other ranks were stopped")
                raise DistributedError(f"rank {r} (partitions {names}) exited with code {c}; the other ranks were "
                                       "stopped. The last committed checkpoint stays resumable (--resume RUN_DIR).")
            if all(c == 0 for c in codes):
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs)
        raise


def _culprit(failed: list[tuple[int, int]]) -> tuple[int, int]:
    """The rank to blame among ``(rank, exit code)`` in the order seen: one killed by a signal
    (negative code) first, since its peers only exit because it vanished; else the first seen."""
    killed = [(r, c) for r, c in failed if c < 0]
    return (killed or failed)[0]


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def worker_args(artifact: Any, opts: Any, launch: Any) -> list[str]:
    """The arguments of every rank: the artifact, then the flags of ``opts`` (TrainOptions) and
    ``launch`` (LaunchOptions) that the worker takes (``runtime/run/options.py``)."""
    from ..run.options import worker_argv

    return [str(artifact), *worker_argv(opts, launch)]
