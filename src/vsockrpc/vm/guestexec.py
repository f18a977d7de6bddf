"""Running a short ``python3`` in a guest through its agent's ``Exec`` service.

What a snapshot or a restore asks of the guest (reseed its RNG, free its page cache) is a few
lines of stdlib Python run there: ``python3 -IS -c SCRIPT`` with ``stdin``. Only the agent
contract and ``rpc/`` are used (``vm/`` sits below the SDK).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import VmError

__all__ = ["guest_python"]

EXEC_TIMEOUT = 30  # s the guest's process may run


def _requests(argv: list[str], stdin: bytes) -> Iterator[Any]:
    yield pb.ExecRequest(
        start=pb.ExecStart(argv=[a.encode() for a in argv], timeout_seconds=EXEC_TIMEOUT)
    )
    if stdin:
        yield pb.ExecRequest(stdin=stdin)
    yield pb.ExecRequest(close_stdin=True)


def guest_python(
    channel: grpc.Channel, script: str, *, stdin: bytes = b"", what: str, timeout: float
) -> bytes:
    """Run ``script`` in the guest behind ``channel``; its stdout. :class:`VmError` naming
    ``what`` (and the last stderr line) when it fails or does not exit 0; gRPC errors as is."""
    stub: Any = pb_grpc.ExecStub(channel)  # type: ignore[no-untyped-call]
    stdout, stderr = b"", b""
    exited: Any = None
    for event in stub.Exec(_requests(["python3", "-IS", "-c", script], stdin), timeout=timeout):
        kind = event.WhichOneof("event")
        if kind == "stdout":
            stdout += event.stdout
        elif kind == "stderr":
            stderr += event.stderr
        elif kind == "exited":
            exited = event.exited
    if exited is None or exited.WhichOneof("status") != "exit_code" or exited.exit_code != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise VmError(f"{what} failed in the guest: {last[0]}")
    return stdout
