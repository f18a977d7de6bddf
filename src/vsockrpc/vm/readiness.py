"""Waiting for a guest's agent to accept a gRPC connection while a stop request can cut in.

``rpc.wait_until_ready`` blocks for its whole timeout, and closing its channel joins the
relay's dial, which may wait up to the dial timeout (10 s by default) for the device's answer:
a stop signal landing in there went unnoticed for that long. Here one channel serves the whole
wait, its readiness is polled in :data:`SLICE` steps (checking ``cancel`` and the caller's
``check`` in between), and the relay dials with a :data:`DIAL_TIMEOUT` bound, so closing the
channel on the way out waits no longer than that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from vsockrpc import rpc
from vsockrpc.addresses import Address
from vsockrpc.errors import TransportTimeout
from vsockrpc.vm import signals

__all__ = ["DIAL_TIMEOUT", "SLICE", "wait_answer"]

SLICE = 0.2  # seconds between two looks at the stop flag
# One relayed connection attempt (connect + the device's OK, which comes within milliseconds
# once the agent listens, or at once as a refusal): bounds the wait when closing the channel.
DIAL_TIMEOUT = 2.0


def wait_answer(
    address: Address,
    deadline: float,
    *,
    cancel: threading.Event | None,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Until a gRPC connection to ``address`` is up: KeyboardInterrupt once ``cancel`` is
    set, whatever ``check`` raises (a guest that died), :class:`TransportTimeout` after the
    monotonic ``deadline``."""
    with rpc.channel(address, options=rpc.RETRY_OPTIONS, connect_timeout=DIAL_TIMEOUT) as ch:
        ready = grpc.channel_ready_future(ch)
        try:
            while True:
                signals.check(cancel)
                left = deadline - time.monotonic()
                try:
                    ready.result(timeout=min(max(left, 0.01), SLICE))
                    return
                except grpc.FutureTimeoutError:
                    pass
                check()
                if time.monotonic() > deadline:
                    last = getattr(ch, "last_error", None)
                    detail = f": {last}" if last else ""
                    raise TransportTimeout(f"{address} not ready{detail}")
        finally:
            ready.cancel()
