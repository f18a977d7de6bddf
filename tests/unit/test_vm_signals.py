"""StopSignals: stop signals become a flag; with ``absorb_after`` a stopped CLI ignores later
ones (a second Ctrl-C while the interpreter shuts down printed a traceback)."""

from __future__ import annotations

import os
import signal

from vsockrpc.vm.signals import StopSignals


def test_a_signal_sets_the_flag_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.event.wait(5)
        assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_absorb_after_ignores_later_signals_once_stopped() -> None:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with StopSignals(absorb_after=True) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.event.wait(5)
        for sig in previous:
            assert signal.getsignal(sig) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_absorb_after_without_a_stop_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(absorb_after=True):
        pass
    assert signal.getsignal(signal.SIGTERM) is before
