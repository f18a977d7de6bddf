"""The System sub-client: ping, guest facts, clock, power."""

from __future__ import annotations

import time

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError
from vsockrpc.sdk._common import unary
from vsockrpc.sdk._types import GuestInfo

__all__ = ["SystemClient"]


class SystemClient:
    """Calls of ``vsockrpc.agent.v1.System`` (documented on :class:`~vsockrpc.sdk.Guest`)."""

    def __init__(self, channel: grpc.Channel, call_timeout: float) -> None:
        self._stub = pb_grpc.SystemStub(channel)  # type: ignore[no-untyped-call]
        self._timeout = call_timeout

    def ping(self, payload: bytes) -> float:
        start = time.perf_counter()
        reply = unary(self._stub.Ping, pb.PingRequest(payload=payload), "ping", self._timeout)
        elapsed = time.perf_counter() - start
        if reply.payload != payload:
            raise AgentError("ping: the agent echoed a different payload", code="DATA_LOSS")
        return elapsed

    def info(self) -> GuestInfo:
        r = unary(self._stub.Info, pb.InfoRequest(), "info", self._timeout)
        return GuestInfo(
            agent_version=r.agent_version,
            kernel_release=r.kernel_release,
            kernel_version=r.kernel_version,
            machine=r.machine,
            hostname=r.hostname,
            os_pretty_name=r.os_pretty_name,
            cpus=r.cpus,
            memory_total_bytes=r.memory_total_bytes,
            memory_available_bytes=r.memory_available_bytes,
            uptime_seconds=r.uptime_seconds,
            time_ns=r.time_ns,
            agent_pid=r.agent_pid,
            python_version=r.python_version,
            os_release=dict(r.os_release),
        )

    def sync_time(self) -> float:
        now = time.time_ns()
        request = pb.SetTimeRequest(time_ns=now)
        reply = unary(self._stub.SetTime, request, "set time", self._timeout)
        return float((reply.previous_time_ns - now) / 1e9)

    def shutdown(self, *, reboot: bool) -> None:
        action = pb.POWER_ACTION_REBOOT if reboot else pb.POWER_ACTION_POWEROFF
        unary(self._stub.Shutdown, pb.ShutdownRequest(action=action), "shutdown", self._timeout)
