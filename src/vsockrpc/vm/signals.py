"""Stop requests in the launcher: a signal sets a flag the launcher checks at safe points.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to
be: between starting QEMU and registering its cleanup, or in the middle of that cleanup when a
second Ctrl-C follows the first, which left QEMU, the device and the run directory behind.
Here a signal only sets :attr:`StopSignals.event` (:mod:`vsockrpc._stopsignals`, shared with
the other entry points); the launcher raises KeyboardInterrupt itself where unwinding is safe
(:func:`check`), and further signals while stopping are absorbed.
"""

from __future__ import annotations

import threading

from vsockrpc._stopsignals import STOP_SIGNALS, StopSignals

__all__ = ["STOP_SIGNALS", "StopSignals", "check"]


def check(event: threading.Event | None) -> None:
    """Raise KeyboardInterrupt when a stop was requested (call only where unwinding is safe)."""
    if event is not None and event.is_set():
        raise KeyboardInterrupt
