"""A real agent (all services, real grpcio server) on a Unix socket in a temp dir, for tests."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vsockrpc import rpc, transport
from vsockrpc.sdk import Guest, Process, Stdout
from vsockrpc.services.agent import (
    AGENT_SERVICE_NAMES,
    AGENT_WORKERS,
    FilesServicer,
    PeerGuard,
    PeerPolicy,
    PeerResolver,
    PowerAction,
    ProcessTable,
    agent_services,
    health_and_reflection,
)


@dataclass
class AgentUnderTest:
    address: str
    directory: str
    table: ProcessTable
    clock_calls: list[int] = field(default_factory=list)
    identity_calls: list[tuple[bytes, str, str]] = field(default_factory=list)
    power_calls: list[PowerAction] = field(default_factory=list)


@contextmanager
def running_agent(
    policy: PeerPolicy | None = None, resolver: PeerResolver = rpc.peer_address
) -> Iterator[AgentUnderTest]:
    """Serve the agent; clock, identity and power hooks record their calls instead of acting.
    ``resolver`` finds the caller (as the guest's server does), or pretends one."""
    directory = tempfile.mkdtemp(prefix="agent-", dir="/tmp")
    table = ProcessTable()
    admitted = policy if policy is not None else PeerPolicy()
    files = FilesServicer(PeerGuard(admitted, resolver), sockets=transport)
    agent = AgentUnderTest(f"unix:{directory}/agent.sock", directory, table)
    services = agent_services(
        peer_resolver=resolver,
        sockets=transport,
        policy=admitted,
        power_control=agent.power_calls.append,
        clock_setter=agent.clock_calls.append,
        identity_setter=lambda *call: agent.identity_calls.append(call),
        table=table,
        files=files,
    )
    try:
        with rpc.serve(
            [*services, health_and_reflection(AGENT_SERVICE_NAMES)],
            [agent.address],
            max_workers=AGENT_WORKERS,  # as the guest's server
            maximum_concurrent_rpcs=AGENT_WORKERS,
        ):
            yield agent
            table.close()
    finally:
        files.close()
        shutil.rmtree(directory, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stty_sizes_across_resize(
    guest: Guest, first: tuple[int, int], second: tuple[int, int], *, settle: float, tail: str = ""
) -> tuple[bytes, Process]:
    """Run ``stty size; read x; stty size{tail}`` on a PTY opened at ``first`` rows x cols, resize
    to ``second`` once the first size is printed, then let it finish. Returns all stdout and the
    finished process (the caller asserts on both)."""
    marker = f"{first[0]} {first[1]}".encode()
    with guest.exec_stream(
        ["sh", "-c", f"stty size; read x; stty size{tail}"], pty=True, window=first
    ) as proc:
        output = b""
        events = iter(proc)
        for event in events:
            if isinstance(event, Stdout):
                output += event.data
                if marker in output:
                    break
        proc.resize(*second)
        time.sleep(settle)
        proc.send(b"\n")
        for event in events:
            if isinstance(event, Stdout):
                output += event.data
    return output, proc
