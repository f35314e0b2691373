"""SIGTERM and SIGHUP handled as Ctrl-C is: a job scheduler's or a closed terminal's stop
ends a run as an interrupted one (locks freed, log closed, the resume command printed)
instead of killing it mid-step. No torch here (the CLI imports it)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: signals that stop a command as Ctrl-C does
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Terminated(KeyboardInterrupt):
    """A stop signal arrived: the command ends as an interrupted run does
    (``diffnas.cli.main`` exits with ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[dict[int, Any]]:
    """Inside the block, :data:`STOP_SIGNALS` raise :class:`Terminated` in the main thread
    (elsewhere signal handlers cannot be set: nothing changes). A signal ignored stays
    ignored (``nohup``'s SIGHUP must not stop the run). Yields the handlers replaced, which
    are put back on leaving."""
    handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, raise_terminated) for sig in STOP_SIGNALS
                    if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield handlers
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
