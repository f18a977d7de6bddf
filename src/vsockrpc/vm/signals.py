"""Stop requests: SIGINT/SIGTERM/SIGHUP turned into a flag the launcher checks at safe points.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to
be: between starting QEMU and registering its cleanup, or in the middle of that cleanup when a
second Ctrl-C follows the first, which left QEMU, the device and the run directory behind.
Here a signal only sets :attr:`StopSignals.event`; the launcher raises KeyboardInterrupt itself
where unwinding is safe, and further signals while stopping are absorbed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopSignals", "check"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Context manager: while inside, ``signals`` set :attr:`event` instead of their default
    action. Installs nothing off the main thread (Python only runs handlers there)."""

    def __init__(
        self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *, absorb_after: bool = False
    ) -> None:
        self.signals = signals
        # For a process that exits once stopped (the CLI): after a stop, later signals stay
        # ignored instead of raising KeyboardInterrupt into the interpreter's own shutdown.
        self.absorb_after = absorb_after
        self.event = threading.Event()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        self.event.set()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        absorb = self.absorb_after and self.received is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if absorb else handler)  # type: ignore[arg-type]
        self._previous.clear()


def check(event: threading.Event | None) -> None:
    """Raise KeyboardInterrupt when a stop was requested (call only where unwinding is safe)."""
    if event is not None and event.is_set():
        raise KeyboardInterrupt
