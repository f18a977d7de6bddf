"""A real agent (all services, real grpcio server) on a Unix socket in a temp dir, for tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vsockrpc import rpc
from vsockrpc.services.agent import (
    AGENT_SERVICE_NAMES,
    FilesServicer,
    PeerPolicy,
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
    power_calls: list[PowerAction] = field(default_factory=list)


@contextmanager
def running_agent(policy: PeerPolicy | None = None) -> Iterator[AgentUnderTest]:
    """Serve the agent; clock and power hooks record their calls instead of acting."""
    directory = tempfile.mkdtemp(prefix="agent-", dir="/tmp")
    table = ProcessTable()
    admitted = policy if policy is not None else PeerPolicy()
    files = FilesServicer(admitted)
    agent = AgentUnderTest(f"unix:{directory}/agent.sock", directory, table)
    services = agent_services(
        policy=admitted,
        power_control=agent.power_calls.append,
        clock_setter=agent.clock_calls.append,
        table=table,
        files=files,
    )
    try:
        with rpc.serve([*services, health_and_reflection(AGENT_SERVICE_NAMES)], [agent.address]):
            yield agent
            table.close()
    finally:
        files.close()
        shutil.rmtree(directory, ignore_errors=True)
