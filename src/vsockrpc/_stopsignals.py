"""Stop signals (SIGINT, SIGTERM, SIGHUP) turned into an event; standard library only.

Every long-running entry point, host or guest (the launcher, ``vsockrpc serve`` and
``forward``, the guest's agent server and command supervisor), stops the same way: a signal
sets :attr:`StopSignals.event`, the main thread notices it at a point where stopping is safe.

The handler itself takes no lock. Python runs a handler in the main thread between two
bytecodes, which may be while that thread is inside ``Event.wait`` holding the Event's
internal (non-reentrant) lock, and these entry points wait on their stop event in short steps
all the time: a handler calling ``Event.set`` there blocked forever on that lock, and a
signalled process hung with nothing stopped (a loaded machine makes the window wide, a burst
of signals finds it). So the handler only notes the signal and writes a byte to a pipe
(``os.write``: no Python lock), and a small thread reading the pipe sets the event.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopSignals", "interrupting"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Context manager: while inside, ``signals`` set :attr:`event` instead of their default
    action, and :attr:`received` is the first of them. Installs nothing off the main thread
    (Python only runs handlers there)."""

    def __init__(
        self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *, absorb_after: bool = False
    ) -> None:
        self.signals = signals
        # For a process that exits once stopped: after a stop, later signals stay ignored
        # instead of raising KeyboardInterrupt or killing it during its own shutdown.
        self.absorb_after = absorb_after
        self.event = threading.Event()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._wake_w = -1
        self._waker: threading.Thread | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # No lock here (see the module docstring): note the signal, wake the waker thread.
        if self.received is None:
            self.received = signal.Signals(signum)
        with contextlib.suppress(OSError):  # a full pipe already has a wake-up in it
            os.write(self._wake_w, b"\0")

    def _wake(self, read_fd: int) -> None:
        """Set the event for every byte the handler writes; ends when the pipe is closed."""
        with contextlib.closing(os.fdopen(read_fd, "rb", buffering=0)) as pipe:
            while pipe.read(64):
                self.event.set()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            read_fd, self._wake_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._wake_w, False)
            self._waker = threading.Thread(
                target=self._wake, args=(read_fd,), name="vsockrpc-stop-signals", daemon=True
            )
            self._waker.start()
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        absorb = self.absorb_after and self.received is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if absorb else handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._waker is not None:
            # Our handler is no longer installed: closing the write end ends the waker (after
            # it has set the event for any byte still in the pipe).
            os.close(self._wake_w)
            self._wake_w = -1
            self._waker.join()
            self._waker = None


@contextlib.contextmanager
def interrupting() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that a command doing one
    long step (an image build, a benchmark) unwinds its ``finally`` blocks and context managers
    (its child processes, temporary directories) instead of dying where it stands. Main thread
    only, like every Python signal handler."""

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    sigs = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
