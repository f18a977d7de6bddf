"""Addition's per-call log line exists only when the access log is on (zero cost when off)."""

from __future__ import annotations

import dis
from typing import Any

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
