"""The agent process of the guest, run on this machine on a Unix socket (no VM, no vsock):
it serves the default services, announces readiness, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsockrpc import rpc
from vsockrpc.agent import markers
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc


@pytest.mark.timeout(60)
def test_agent_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    with subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", f"unix:{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
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
        finally:
            if proc.poll() is None:
                proc.kill()
