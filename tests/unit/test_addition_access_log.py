"""Addition's per-call log line exists only when the access log is on (zero cost when off)."""

from __future__ import annotations

import dis
import logging
from typing import Any

import pytest

from vsockrpc.addresses import VsockAddress
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.services import addition


class _Recorder:
    def __init__(self) -> None:
        self.servicers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.servicers.append(handlers["Addition"].unary_unary.__self__)


def registered(access_log: bool) -> object:
    recorder = _Recorder()
    addition.registrar(access_log=access_log)(recorder)
    return recorder.servicers[0]


def names_used(function: object) -> set[object]:
    return {instruction.argval for instruction in dis.get_instructions(function)}  # type: ignore[arg-type]


def test_off_registers_a_servicer_without_any_logging_call() -> None:
    assert type(registered(access_log=False)) is addition.AdditionServicer
    assert type(registered(access_log=True)) is addition.LoggingAdditionServicer
    quiet = names_used(addition.AdditionServicer.Addition)
    assert not {"info", "log", "debug"} & quiet
    assert "info" in names_used(addition.LoggingAdditionServicer.Addition)


def test_the_line_names_the_caller_when_a_peer_resolver_is_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sibling VM's call shows its own CID (the resolver sees through the relay)."""
    context = object()
    seen: list[object] = []

    def peer(ctx: object) -> VsockAddress:
        seen.append(ctx)
        return VsockAddress(4, 1025)

    servicer = addition.LoggingAdditionServicer(peer)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger=addition.__name__):
        reply = servicer.Addition(pb.AdditionRequest(a=5, b=7), context)  # type: ignore[arg-type]
        addition.LoggingAdditionServicer().Addition(pb.AdditionRequest(a=1, b=2), context)  # type: ignore[arg-type]
    assert reply.c == 12 and seen == [context]
    assert [r.getMessage() for r in caplog.records] == [
        "Addition: 5 + 7 = 12 (from vsock:4:1025)",
        "Addition: 1 + 2 = 3",
    ]
