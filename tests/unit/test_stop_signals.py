"""StopSignals: stop signals become a flag; with ``absorb_after`` a stopped CLI ignores later
ones (a second Ctrl-C while the interpreter shuts down printed a traceback). The entry points
that use it are stopped by bursts of signals in tests/integration/test_stop_signal_bursts.py."""

from __future__ import annotations

import os
import signal

import pytest

from vsockrpc._stopsignals import StopSignals


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


@pytest.mark.timeout(20)
def test_a_signal_while_the_event_lock_is_held_does_not_deadlock() -> None:
    """Python runs the handler between two bytecodes of the main thread, which may be inside
    ``Event.wait`` holding the Event's internal (non-reentrant) lock: a handler calling
    ``Event.set`` there blocked forever, and a stopped launcher hung."""
    with StopSignals() as stop:
        held = vars(stop.event)["_cond"]  # the lock Event.wait holds around its checks
        with held:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecode boundaries: the handler runs in here
                pass
        assert stop.event.wait(5)
        assert stop.received == signal.SIGTERM


def test_the_launcher_uses_the_shared_stop_signals() -> None:
    from vsockrpc.vm import signals

    assert signals.StopSignals is StopSignals
