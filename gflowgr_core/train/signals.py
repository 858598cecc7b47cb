"""Graceful stop on SIGTERM / SIGINT: the first signal asks training to stop at the next step boundary.

Cluster schedulers send SIGTERM before killing a job (and ``torchrun`` forwards it to every worker); Ctrl-C
sends SIGINT. :class:`StopRequest` turns the first of either into a flag that the training loop polls after
every optimisation step, where it writes a resumable checkpoint and returns. A second signal of the same kind
is not deferred: the handler that was installed before runs (Ctrl-C twice raises ``KeyboardInterrupt``,
SIGTERM twice terminates the process).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger("gflowgr")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A stop flag raised by a signal or by :meth:`request`; a context manager that installs the handlers.

    Handlers can only be installed from the main thread; elsewhere (or with ``install=False``) the flag is
    raised only by :meth:`request`.
    """

    def __init__(self, install: bool = True):
        self.install = install
        self.reason: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary (first reason wins)."""
        if self.reason is None:
            self.reason = reason

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and self.reason == name:
            previous = self._previous.get(signum, signal.SIG_DFL)
            log.warning("second %s: stopping now without a checkpoint", name)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        log.warning("%s received: stopping at the end of the current step and saving a resumable checkpoint "
                    "(send it again to stop immediately)", name)
        self.request(name)

    def __enter__(self) -> "StopRequest":
        if self.install and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        elif self.install:
            log.debug("not on the main thread: SIGTERM/SIGINT handlers not installed")
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
