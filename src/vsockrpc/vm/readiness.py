"""Waiting for a guest's agent to accept a gRPC connection while a stop request can cut in.

``rpc.wait_until_ready`` blocks for its whole timeout, and closing its channel joins the
relay's dial, which may wait up to the dial timeout (10 s by default) for the device's answer:
a stop signal landing in there went unnoticed for that long. Here one channel and one call serve
the whole wait, polled in :data:`SLICE` steps (checking ``cancel`` and the caller's ``check`` in
between), and the relay dials with a :data:`DIAL_TIMEOUT` bound, so closing the channel on the
way out waits no longer than that.
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
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_NOT_AN_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def wait_answer(
    address: Address,
    deadline: float,
    *,
    cancel: threading.Event | None,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Until the gRPC server at ``address`` answers a call: KeyboardInterrupt once ``cancel``
    is set, whatever ``check`` raises (a guest that died), :class:`TransportTimeout` after the
    monotonic ``deadline``.

    The call is a health check, sent once with ``wait_for_ready`` for the whole wait, so the
    channel's connection attempts go on under grpcio's reconnect backoff and a slow guest's
    handshake is never abandoned half-way. Any answer counts, even an error status (an image
    without health checking still answers UNIMPLEMENTED); only UNAVAILABLE and the deadline do
    not. (Not ``grpc.channel_ready_future``: its polling thread can outlive the wait and raise
    on the closed channel.)"""
    with rpc.channel(address, options=rpc.RETRY_OPTIONS, connect_timeout=DIAL_TIMEOUT) as ch:
        # Bytes in, bytes out: an empty HealthCheckRequest asks about the whole server.
        probe = ch.unary_unary(HEALTH_CHECK)
        left = max(deadline - time.monotonic(), 0.01)
        call = probe.future(b"", timeout=left, wait_for_ready=True)
        try:
            while True:
                signals.check(cancel)
                try:
                    call.result(timeout=SLICE)
                    return
                except grpc.FutureTimeoutError:
                    pass
                except grpc.RpcError as err:
                    if err.code() not in _NOT_AN_ANSWER:
                        return
                    if time.monotonic() < deadline:  # the channel gave up early: ask again
                        left = max(deadline - time.monotonic(), 0.01)
                        call = probe.future(b"", timeout=left, wait_for_ready=True)
                        continue
                check()
                if time.monotonic() > deadline:
                    last = getattr(ch, "last_error", None)
                    detail = f": {last}" if last else ""
                    raise TransportTimeout(f"{address} not ready{detail}")
        finally:
            call.cancel()
