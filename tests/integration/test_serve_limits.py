"""The server-side relay under a flood of idle connections: silent connections cost one fd and
no thread, are closed after the idle timeout or evicted at the caps, and calls still get in."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration._serve_helpers import cli_server, run_cli
from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.rpc import ConnectionLimits
from vsockrpc.services import addition

IDLE = 1000


# The server starts with the kernel's default soft limit, as the guest agent did.
DEFAULT_FD_LIMIT = "ulimit -S -n 1024"


def eof_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset: closed too


def add(address: str) -> int:
    with rpc.channel(address) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        reply: pb.AdditionResponse = stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=20)
        return reply.c


@pytest.mark.timeout(180)
def test_1000_idle_connections_do_not_deny_the_agent(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE + 200:
        pytest.fail(f"this test needs an open-files hard limit over {IDLE + 200}, not {hard}")
    path = tmp_path / "agent.sock"
    address = f"unix:{path}"
    server = cli_server(address, "--agent", setup=DEFAULT_FD_LIMIT)
    with server, contextlib.ExitStack() as held:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the test's own sockets
        held.callback(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        for _ in range(IDLE):
            sock = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(str(path))
        start = time.monotonic()
        info = run_cli("info", address, timeout=60)
        info_seconds = time.monotonic() - start
        assert info.returncode == 0, info.stderr
        assert "kernel" in info.stdout.lower()
        start = time.monotonic()
        assert add(address) == 12
        add_seconds = time.monotonic() - start
        assert info_seconds < 15, info_seconds  # a CLI start (imports) is most of it
        assert add_seconds < 5, add_seconds
        print(f"with {IDLE} idle connections: info {info_seconds:.2f} s, add {add_seconds:.3f} s")


@pytest.mark.timeout(60)
def test_silent_connections_are_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    limits = ConnectionLimits(idle_timeout=0.5)
    with (
        rpc.serve(
            [addition.register], [f"unix:{path}"], peer_credentials=True, limits=limits
        ) as server,
        rpc.channel(f"unix:{path}") as ch,
    ):  # talks first: relayed, never idle-closed
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        assert stub.Addition(pb.AdditionRequest(a=1, b=2), timeout=20).c == 3
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(str(path))
            start = time.monotonic()
            assert eof_within(silent, 10)
            assert 0.4 < time.monotonic() - start < 5
        time.sleep(0.7)
        assert stub.Addition(pb.AdditionRequest(a=2, b=2), timeout=20).c == 4
        assert server.relayed_connections == 1


@pytest.mark.timeout(60)
def test_a_peer_at_its_cap_loses_its_oldest_silent_connection_and_calls_get_in(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.sock"
    limits = ConnectionLimits(max_per_peer=5, reserved_peers=frozenset(), idle_timeout=None)
    with rpc.serve([addition.register], [f"unix:{path}"], peer_credentials=True, limits=limits):
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(12)]
        with contextlib.ExitStack() as stack:
            for sock in socks:
                stack.enter_context(sock)
                sock.connect(str(path))
            assert add(f"unix:{path}") == 12  # evicts one more silent connection to get in
            closed = [eof_within(sock, 2.0) for sock in socks]
            # The oldest ones went; at most 4 silent ones are left beside the call's connection.
            assert closed[:8] == [True] * 8, closed
            assert closed.count(False) <= 4, closed


@pytest.mark.timeout(60)
def test_serve_raises_its_open_files_limit(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with cli_server(f"unix:{path}", setup=DEFAULT_FD_LIMIT) as proc:
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line


@pytest.mark.timeout(60)
def test_raise_open_files_limit_raises_soft_to_hard_and_never_lowers() -> None:
    # In a child process: the limits of the test process stay as they are.
    script = """
import resource
from vsockrpc._fdlimit import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
assert raise_open_files_limit(512) == 512
assert raise_open_files_limit(300) == 512  # never lowers
assert raise_open_files_limit() == hard
assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout == "ok\n", result.stderr
