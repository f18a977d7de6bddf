"""The agent process of the guest, run on this machine on a Unix socket (no VM, no vsock):
it serves the default services, announces readiness, and stops cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vsockrpc import rpc
from vsockrpc.agent import markers
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc


@contextlib.contextmanager
def _agent(sock: Path) -> Iterator[subprocess.Popen[str]]:
    """The agent process serving ``unix:sock``. A test that fails with it still running stops
    it with SIGTERM, so that it removes its private socket directory, and kills it only if it
    does not exit."""
    with subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", f"unix:{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.mark.timeout(60)
def test_agent_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    with _agent(sock) as proc:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert ready.startswith(markers.READY), ready
        assert f"unix:{sock}" in ready
        with rpc.channel(f"unix:{sock}") as ch:
            stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            assert stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=10).c == 12
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 10
        assert "Addition: 5 + 7 = 12" in proc.stderr.read()


def _mapped(pid: int, *names: str) -> list[str]:
    """Which of the extension modules ``names`` process ``pid`` has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if f"/{n}." in maps]


@pytest.mark.timeout(60)
def test_agent_serves_health_and_reflection_without_loading_asyncio(tmp_path: Path) -> None:
    # asyncio (and ssl, which it imports) is start-up time in a TCG guest that the agent's
    # threaded server never uses (vsockrpc.guest.deferred), and so is hashlib's OpenSSL until a
    # transfer asks for SHA-256 or a ticket. Their C halves show in the maps.
    import _asyncio
    import _hashlib
    import _ssl

    if not all(getattr(m, "__file__", None) for m in (_asyncio, _hashlib, _ssl)):
        pytest.skip("this Python has _asyncio/_hashlib/_ssl built in: nothing shows in the maps")
    sock = tmp_path / "agent.sock"
    with _agent(sock) as proc:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(markers.READY)
        with rpc.channel(f"unix:{sock}") as ch:
            health = health_pb2_grpc.HealthStub(ch)  # type: ignore[no-untyped-call]
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)  # type: ignore[no-untyped-call]
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            names = {s.name for s in reply.list_services_response.service}
            assert {"popovicu_vsock.VsockService", "grpc.health.v1.Health"} <= names
            adder = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            assert adder.Addition(pb.AdditionRequest(a=5, b=7), timeout=10).c == 12
        assert _mapped(proc.pid, "_asyncio", "_hashlib", "_ssl") == []
        assert _mapped(os.getpid(), "_asyncio") == ["_asyncio"]  # the check itself works
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
