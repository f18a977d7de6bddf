"""The seed system's ``Addition`` service (``popovicu_vsock.VsockService``).

int32 semantics: the fields are int32 on the wire, so ``a + b`` outside
[-2**31, 2**31-1] cannot be represented. Rather than wrap silently (as the C++ original did, by
undefined behaviour), the call fails with ``INVALID_ARGUMENT`` naming both operands.
With the access log on (:func:`registrar` ``(access_log=True)``, ``vsockrpc serve
--access-log``, and always in the guest agent, whose console shows it), every call logs
``Addition: 5 + 7 = 12`` at INFO on the ``vsockrpc.services.addition`` logger. Off (the
default), the servicer registered is one without the logging call: nothing per call is spent on
a log line nobody reads. An overflow is a WARNING either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import grpc

from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "AdditionServicer",
    "LoggingAdditionServicer",
    "add_int32",
    "register",
    "registrar",
]

log = logging.getLogger(__name__)

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def add_int32(a: int, b: int) -> int | None:
    """``a + b``, or None when the sum does not fit in an int32."""
    c = a + b
    return c if INT32_MIN <= c <= INT32_MAX else None


def _overflow(request: pb.AdditionRequest, context: grpc.ServicerContext) -> NoReturn:
    log.warning("Addition: %d + %d overflows int32", request.a, request.b)
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{request.a} + {request.b} does not fit in an int32",
    )
    raise AssertionError("ServicerContext.abort() returned")  # it always raises


class AdditionServicer(pb_grpc.VsockServiceServicer):
    """Returns ``c = a + b``; INVALID_ARGUMENT when the sum overflows int32. Logs nothing
    per call (see :class:`LoggingAdditionServicer`)."""

    def Addition(  # the method name is fixed by the .proto
        self, request: pb.AdditionRequest, context: grpc.ServicerContext
    ) -> pb.AdditionResponse:
        c = add_int32(request.a, request.b)
        if c is None:
            _overflow(request, context)
        return pb.AdditionResponse(c=c)


class LoggingAdditionServicer(pb_grpc.VsockServiceServicer):
    """:class:`AdditionServicer` that also logs each call (the access log). With a ``peer``
    resolver (e.g. :func:`vsockrpc.rpc.peer_address`), the line names the caller:
    ``Addition: 5 + 7 = 12 (from vsock:4:1025)``: a VM of the guest's group shows its own CID."""

    def __init__(self, peer: Callable[[grpc.ServicerContext], object | None] | None = None):
        self._peer = peer

    def Addition(
        self, request: pb.AdditionRequest, context: grpc.ServicerContext
    ) -> pb.AdditionResponse:
        c = add_int32(request.a, request.b)
        if c is None:
            _overflow(request, context)
        if self._peer is None:
            log.info("Addition: %d + %d = %d", request.a, request.b, c)
        else:
            caller = self._peer(context) or "an unknown peer"
            log.info("Addition: %d + %d = %d (from %s)", request.a, request.b, c, caller)
        return pb.AdditionResponse(c=c)


def registrar(
    *,
    access_log: bool = False,
    peer: Callable[[grpc.ServicerContext], object | None] | None = None,
) -> Callable[[grpc.Server], None]:
    """A ``serve()`` service callable for Addition, with or without the per-call log line
    (naming the caller when ``peer`` is given)."""
    servicer = LoggingAdditionServicer(peer) if access_log else AdditionServicer()

    def register_addition(server: grpc.Server) -> None:
        pb_grpc.add_VsockServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return register_addition


def register(server: grpc.Server) -> None:
    """Add the Addition service to ``server`` (a ``serve()`` service callable; no access log)."""
    pb_grpc.add_VsockServiceServicer_to_server(AdditionServicer(), server)  # type: ignore[no-untyped-call]
