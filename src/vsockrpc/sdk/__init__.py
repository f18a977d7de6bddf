"""Python SDK for the vsockrpc guest agent.

::

    from vsockrpc.sdk import Guest

    with Guest("hvsock:/run/vm.vsock:9999", wait=30) as g:
        r = g.run(["uname", "-a"])           # ExecResult: exit_code, stdout, stderr...
        g.put("local/dir", "/srv/dir")        # files and directory trees, checksummed
        g.get("/var/log/syslog", "syslog")
        for event in g.exec_stream(["make"]): # Started, Stdout, Stderr, Exited as they happen
            ...

Every failure raises :class:`vsockrpc.errors.AgentError` (``.code`` = gRPC status name).
"""

from __future__ import annotations

from vsockrpc.errors import AgentError
from vsockrpc.sdk._guest import CHUNK_SIZE, Guest, Process
from vsockrpc.sdk._types import (
    ExecEvent,
    ExecResult,
    Exited,
    FileInfo,
    FileType,
    GuestInfo,
    ProcessSummary,
    Started,
    Stderr,
    Stdout,
    TransferStats,
)

__all__ = [
    "CHUNK_SIZE",
    "AgentError",
    "ExecEvent",
    "ExecResult",
    "Exited",
    "FileInfo",
    "FileType",
    "Guest",
    "GuestInfo",
    "Process",
    "ProcessSummary",
    "Started",
    "Stderr",
    "Stdout",
    "TransferStats",
]
