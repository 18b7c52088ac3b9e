"""Ctrl-C / SIGTERM during training: checkpoint and stop, or interrupt at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

from ...errors import GndglError


class Interrupted(GndglError):
    """Training was stopped by Ctrl-C / SIGTERM after writing a checkpoint."""

    exit_code = 130
    is_error = False


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second one interrupts at once."""

    def __init__(self, immediate: bool = False) -> None:
        self.requested = False
        self.immediate = immediate
        """Interrupt at the first signal (distributed ranks: the launcher stops every rank together)."""
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self.requested or self.immediate:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
