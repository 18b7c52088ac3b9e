"""The ``gndgl`` command as a user runs it, for the tests that drive it as a real process (``tests/cli/``,
``tests/runtime/run/``): the process, the check of a refused bad input, and the exit status of the command run
in a forked child (the warm runners of ``tests/fuzz_runner.py`` and ``tests/cli/test_cli_compile.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path


def gndgl(cwd: Path, *args: str, columns: int = 100, timeout: int = 300) -> subprocess.CompletedProcess:
    """``gndgl ARGS`` as a real process in ``cwd`` (one intra-op thread, a ``columns``-wide terminal, no colour)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS=str(columns), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "gndgl_cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def bad(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one-line error of a bad input (exit 2, 'error:', no traceback) that holds ``fragments``."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("error:"), r.stderr
    for f in fragments:
        assert f in err, (f, err)
    return err


def exit_status(main) -> int:
    """The exit status of ``main()`` as the interpreter gives it for ``python -m gndgl_cli.main``: 0 on return,
    ``SystemExit``'s code (a message is printed to stderr and gives 1), 1 and the traceback for any other exception."""
    try:
        main()
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
