"""Hybrid vsock (``CONNECT <port>`` / ``OK <n>``) against a stand-in device, via API and CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration._relay_helpers import HybridPeer
from tests.integration._served import agent_registrars
from vsockrpc import rpc, transport
from vsockrpc.addresses import HybridAddress
from vsockrpc.errors import NotReadyError, TransportTimeout
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


class Greeter:
    """A 'guest' Unix listener that greets each connection, then echoes."""

    def __init__(self, path: str) -> None:
        self.listener = transport.listen(f"unix:{path}")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello from the guest\n")
                while data := conn.recv(4096):
                    conn.sendall(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[HybridPeer]:
    with HybridPeer(str(tmp_path / "vm.vsock"), {9999: str(tmp_path / "guest9999.sock")}) as peer:
        yield peer


@pytest.mark.timeout(30)
def test_ok_with_an_arbitrary_port_and_bytes_right_after_ok(
    device: HybridPeer, tmp_path: Path
) -> None:
    greeter = Greeter(str(tmp_path / "guest9999.sock"))
    try:
        with transport.connect(f"hvsock:{device.path}:9999", timeout=5) as sock:
            assert sock.gettimeout() is None
            # The greeting follows "OK 1073741824\n" in the same stream: not swallowed.
            assert sock.makefile("rb").readline() == b"hello from the guest\n"
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
    finally:
        greeter.close()
    assert device.commands == [b"CONNECT 9999"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("mode", "garbage", "match"),
    [
        ("eof", b"", "closed the connection before OK"),
        ("garbage", b"HELLO THERE\n", "answered b'HELLO THERE' instead of OK"),
        ("garbage", b"connect refused\n", "answered b'connect refused'"),
        ("garbage", b"OK\n", "answered b'OK'"),
        ("garbage", b"OK 12", "closed the connection after b'OK 12'"),
        ("garbage", b"X" * 100, "reply too long"),
    ],
)
def test_anything_but_ok_is_not_ready(
    device: HybridPeer, mode: str, garbage: bytes, match: str
) -> None:
    device.mode, device.garbage = mode, garbage
    with pytest.raises(NotReadyError, match=match):
        transport.connect(HybridAddress(device.path, 9999), timeout=5)


@pytest.mark.timeout(30)
def test_guest_not_listening_is_not_ready(device: HybridPeer) -> None:
    with pytest.raises(NotReadyError):
        transport.connect(f"hvsock:{device.path}:9999", timeout=5)


@pytest.mark.timeout(30)
def test_missing_device_socket_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(NotReadyError, match="No such file"):
        transport.connect(f"hvsock:{tmp_path}/absent.vsock:1", timeout=5)


@pytest.mark.timeout(30)
def test_silent_device_times_out(device: HybridPeer) -> None:
    device.mode = "silent"
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="waiting for OK"):
        transport.connect(f"hvsock:{device.path}:9999", timeout=0.5)
    assert time.monotonic() - start < 3


def run_add(target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "add", "5", "7", "--target", target, *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(60)
def test_cli_add_through_the_device(device: HybridPeer, tmp_path: Path) -> None:
    with rpc.serve(agent_registrars(), [f"unix:{tmp_path}/guest9999.sock"]):
        result = run_add(f"hvsock:{device.path}:9999")
    assert (result.returncode, result.stdout) == (0, "Addition result: 5 + 7 = 12\n"), result.stderr
    assert device.commands == [b"CONNECT 9999"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["proxy", "eof", "garbage"])
def test_cli_add_fails_with_unavailable_when_the_guest_is_not_there(
    device: HybridPeer, mode: str
) -> None:
    device.mode = mode
    result = run_add(f"hvsock:{device.path}:9999", "--timeout", "3")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("vsockrpc: error: UNAVAILABLE"), result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.timeout(60)
def test_cli_wait_rides_out_a_slow_guest(device: HybridPeer, tmp_path: Path) -> None:
    with subprocess.Popen(
        [*CLI, "add", "5", "7", "--target", f"hvsock:{device.path}:9999", "--wait", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as client:
        try:
            # The guest is still "booting": refused, and retried with backoff.
            deadline = time.monotonic() + 20
            while len(device.commands) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(device.commands) >= 2, device.commands
            assert client.poll() is None
            with rpc.serve(agent_registrars(), [f"unix:{tmp_path}/guest9999.sock"]):
                out, err = client.communicate(timeout=30)
        finally:
            client.kill()
    assert (client.returncode, out) == (0, "Addition result: 5 + 7 = 12\n"), err


@pytest.mark.timeout(60)
def test_wait_until_ready_reports_the_last_error(device: HybridPeer, tmp_path: Path) -> None:
    device.mode = "eof"
    with pytest.raises(TransportTimeout, match="closed the connection before OK"):
        rpc.wait_until_ready(f"hvsock:{device.path}:9999", timeout=1)
    device.mode = "proxy"

    def come_up_late() -> None:
        time.sleep(1)
        started.append(rpc.serve(agent_registrars(), [f"unix:{tmp_path}/guest9999.sock"]))

    started: list[rpc.Server] = []
    late = threading.Thread(target=come_up_late)
    late.start()
    try:
        rpc.wait_until_ready(f"hvsock:{device.path}:9999", timeout=20)
    finally:
        late.join()
        for server in started:
            server.stop()


@pytest.mark.timeout(60)
def test_serve_on_hybrid_listens_where_the_device_forwards_guest_connections(
    tmp_path: Path,
) -> None:
    device_path = str(tmp_path / "vm.vsock")
    with rpc.serve(agent_registrars(), [f"hvsock:{device_path}:5000"]) as server:
        assert server.addresses == (HybridAddress(device_path, 5000),)
        assert (tmp_path / "vm.vsock_5000").is_socket()
        # What the device does for a guest connecting to CID 2 port 5000:
        result = run_add(f"unix:{device_path}_5000")
    assert result.stdout == "Addition result: 5 + 7 = 12\n", result.stderr


@pytest.mark.timeout(60)
def test_cli_timeout_bounds_a_silent_device(device: HybridPeer) -> None:
    device.mode = "silent"
    start = time.monotonic()
    result = run_add(f"hvsock:{device.path}:9999", "--timeout", "2")
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert result.stderr.startswith("vsockrpc: error: DEADLINE_EXCEEDED"), result.stderr
    assert elapsed < 10, elapsed  # not the relay's default 10 s connect timeout on top


# ---- errors name the user's address and the real cause, never the relay's private socket ----


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["/nonexistent.sock", "missing"])
def test_cli_add_to_a_missing_device_names_it(tmp_path: Path, target: str) -> None:
    path = target if target.startswith("/") else str(tmp_path / "missing.sock")
    result = run_add(f"hvsock:{path}:9999")
    assert result.returncode == 1
    assert result.stderr == (
        f"vsockrpc: error: UNAVAILABLE: cannot connect to hvsock:{path}:9999: "
        "No such file or directory\n"
    )


@pytest.mark.timeout(60)
def test_cli_add_to_a_port_nobody_listens_on_says_so(device: HybridPeer) -> None:
    result = run_add(f"hvsock:{device.path}:9999")  # the guest side (guest9999.sock) is absent
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"hvsock:{device.path}:9999" in result.stderr
    assert "not listening" in result.stderr
    assert "vsockrpc-" not in result.stderr and "relay" not in result.stderr


@pytest.mark.timeout(60)
def test_relayed_call_errors_carry_the_dial_error(tmp_path: Path) -> None:
    address = f"hvsock:{tmp_path}/gone.sock:9999"
    expected = f"cannot connect to {address}: No such file or directory"
    with rpc.channel(address) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        request = pb.AdditionRequest(a=1, b=2)
        with pytest.raises(grpc.RpcError) as info:
            stub.Addition(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == expected
        assert expected in str(info.value)
        with pytest.raises(grpc.RpcError) as info:
            stub.Addition.with_call(request, timeout=10)
        assert info.value.details() == expected
        future = stub.Addition.future(request, timeout=10)
        error = future.exception(timeout=10)
        assert isinstance(error, grpc.RpcError) and error.details() == expected
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=10)
        assert info.value.details() == expected
        stream = ch.unary_stream("/vsockrpc.test.Stream/Nothing")(b"", timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.details() == expected
        assert stream.details() == expected
