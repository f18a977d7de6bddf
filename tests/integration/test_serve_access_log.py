"""`vsockrpc serve` logs a line per call only with --access-log; the guest agent keeps it on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration._serve_helpers import cli_server
from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

CALLS = 200


def call_many(address: str) -> None:
    with rpc.channel(address) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        for n in range(CALLS):
            assert stub.Addition(pb.AdditionRequest(a=n, b=1), timeout=20).c == n + 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("options", "lines"), [((), 0), (("--access-log",), CALLS)])
def test_access_log_is_off_by_default_and_one_line_per_call_with_the_flag(
    tmp_path: Path, options: tuple[str, ...], lines: int
) -> None:
    log = tmp_path / "serve.log"
    address = f"unix:{tmp_path}/s.sock"
    with cli_server(address, *options, log=log):
        call_many(address)
    text = log.read_text()
    assert text.count("Addition: ") == lines, text[-1000:]
    assert len(text.splitlines()) == lines + 1  # + "stopping"
    if lines:
        assert "Addition: 5 + 1 = 6" in text
