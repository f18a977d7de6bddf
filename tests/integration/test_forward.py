"""Forwarding (vsockrpc.forward) against a stand-in hybrid device: host → guest ports through
``CONNECT``/``OK``, guest → host through ``<uds>_<P>``, failures, a restarted device, cleanup."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.integration._relay_helpers import HybridPeer, count_fds, wait_for
from vsockrpc import transport
from vsockrpc.errors import AddressError, AgentError, BadInputError, TransportError
from vsockrpc.forward import Forwarder, expose, forward
from vsockrpc.sdk import Guest


class EchoServer:
    """A Unix listener (a guest port, or a host service) echoing each connection until EOF."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = transport.listen(f"unix:{path}")
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def stop_accepting(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accept.join(5)
        os.unlink(self.path)

    def close(self) -> None:
        if self._accept.is_alive():
            self.stop_accepting()
        for conn in self._conns:
            with_shutdown(conn)
        for thread in self._threads:
            thread.join(5)


def with_shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def exchange(address: tuple[str, int] | str, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read until EOF (the echo proves both directions)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)

        def send() -> None:
            with contextlib.suppress(OSError):  # the forwarder may close a failed one first
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        sender.join(10)
        return b"".join(chunks)


def tcp_port(forwarder: Forwarder) -> tuple[str, int]:
    text = str(forwarder.listen_address)  # tcp:127.0.0.1:PORT
    host, _, port = text.removeprefix("tcp:").rpartition(":")
    return host, int(port)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[HybridPeer]:
    with HybridPeer(str(tmp_path / "vm.vsock"), {80: str(tmp_path / "guest80.sock")}) as peer:
        yield peer


@pytest.fixture
def guest80(tmp_path: Path) -> Iterator[EchoServer]:
    server = EchoServer(str(tmp_path / "guest80.sock"))
    yield server
    server.close()


@pytest.mark.timeout(60)
def test_host_to_guest_concurrent_connections_with_half_close(
    device: HybridPeer, guest80: EchoServer
) -> None:
    agent = f"hvsock:{device.path}:9999"
    with forward(agent, listen="tcp:127.0.0.1:0", to=80) as fwd:
        assert fwd.description.endswith("-> guest port 80")
        payloads = [bytes([i]) * (100_000 + i * 7919) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            echoed = list(pool.map(lambda p: exchange(tcp_port(fwd), p), payloads))
        assert echoed == payloads
        assert fwd.failures == 0
        # The stand-in device reads the line without ancillary data, as Firecracker does: the
        # stream passed with it is dropped, the device answers plain OK, and the forwarder relays.
        assert fwd.passed_connections == 0
    assert set(device.commands) == {b"CONNECT 80"}
    assert len(device.commands) == 16


@pytest.mark.timeout(60)
def test_a_guest_that_speaks_first_is_heard_before_the_client_sends(
    tmp_path: Path, device: HybridPeer
) -> None:
    with socket.socket(socket.AF_UNIX) as guest:  # e.g. SSH or SMTP: the server greets first
        guest.bind(str(tmp_path / "guest80.sock"))
        guest.listen()

        def greet() -> None:
            conn, _ = guest.accept()
            with conn:
                conn.sendall(b"220 hello\n")
                conn.recv(1)

        greeter = threading.Thread(target=greet)
        greeter.start()
        with (
            forward(f"hvsock:{device.path}:9999", listen="tcp:127.0.0.1:0", to=80) as fwd,
            socket.create_connection(tcp_port(fwd), timeout=10) as client,
        ):
            assert client.recv(64) == b"220 hello\n"
        greeter.join(10)


@pytest.mark.timeout(60)
def test_guest_port_nobody_listens_on_closes_that_connection_and_keeps_listening(
    device: HybridPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vsockrpc.forward")
    with forward(f"hvsock:{device.path}:9999", listen="tcp:127.0.0.1:0", to=80) as fwd:
        assert exchange(tcp_port(fwd), b"hello") == b""  # closed at once, no reply
        assert fwd.failures == 1
        assert "closed the connection before OK" in (fwd.last_error or "")
        lines = [r.getMessage() for r in caplog.records]
        assert any("guest port 80" in line and "before OK" in line for line in lines), lines
        server = EchoServer(str(tmp_path / "guest80.sock"))  # the guest starts listening
        try:
            assert exchange(tcp_port(fwd), b"hello") == b"hello"
            assert fwd.last_error is None
        finally:
            server.close()


@pytest.mark.timeout(60)
def test_one_failing_connection_leaves_the_others_alone(
    device: HybridPeer, guest80: EchoServer
) -> None:
    with forward(f"hvsock:{device.path}:9999", listen="tcp:127.0.0.1:0", to=80) as fwd:
        with socket.create_connection(tcp_port(fwd), timeout=10) as live:
            live.sendall(b"before")
            assert live.recv(6) == b"before"
            guest80.stop_accepting()  # new connections to the guest port now fail
            assert exchange(tcp_port(fwd), b"x") == b""
            broken = socket.create_connection(tcp_port(fwd), timeout=10)
            broken.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            broken.close()  # a reset while it is being dialled
            live.sendall(b"after")
            assert live.recv(5) == b"after"
        assert fwd.failures >= 1


@pytest.mark.timeout(60)
def test_survives_the_device_going_away_and_coming_back(
    tmp_path: Path, guest80: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vsockrpc.forward")
    path = str(tmp_path / "vm.vsock")
    backends = {80: guest80.path}
    with forward(f"hvsock:{path}:9999", listen="tcp:127.0.0.1:0", to=80) as fwd:
        with HybridPeer(path, backends):
            assert exchange(tcp_port(fwd), b"up") == b"up"
        # The guest (and its device) is down: a clear error per connection, nothing else.
        assert exchange(tcp_port(fwd), b"down") == b""
        assert f"cannot connect to hvsock:{path}:80" in (fwd.last_error or "")
        assert any(f"hvsock:{path}:80" in r.getMessage() for r in caplog.records)
        with HybridPeer(path, backends):  # rebooted: works again, same forwarder
            assert exchange(tcp_port(fwd), b"back") == b"back"


@pytest.mark.timeout(60)
def test_unix_listener_mode_and_removal(device: HybridPeer, guest80: EchoServer) -> None:
    agent = f"hvsock:{device.path}:9999"
    path = str(Path(device.path).parent / "web.sock")
    with forward(agent, listen=f"unix:{path}", to=80) as fwd:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert exchange(path, b"unix") == b"unix"
    assert not os.path.exists(path) and fwd.closed
    with forward(agent, listen=f"unix:{path}", to=80, mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert not os.path.exists(path)


@pytest.mark.timeout(60)
def test_listening_where_another_listens_is_a_transport_error(device: HybridPeer) -> None:
    agent = f"hvsock:{device.path}:9999"
    with (
        forward(agent, listen="tcp:127.0.0.1:0", to=80) as fwd,
        pytest.raises(TransportError, match="Address already in use"),
    ):
        forward(agent, listen=fwd.listen_address, to=80)


def test_bad_ports_and_addresses_are_address_errors(tmp_path: Path) -> None:
    agent = f"hvsock:{tmp_path}/vm.vsock:9999"
    for port in (0, -1, 2**32 - 1, 2**32):
        with pytest.raises(AddressError, match="bad guest port"):
            forward(agent, listen="tcp:127.0.0.1:0", to=port)
    with pytest.raises(AddressError):
        forward("hvsock:nowhere", listen="tcp:127.0.0.1:0", to=80)
    with pytest.raises(AddressError, match="no such socket file"):
        expose(agent, f"unix:{tmp_path}/missing.sock", port=5000)
    for agent_address in (f"unix:{tmp_path}/agent.sock", "vsock:3:9999", "tcp:127.0.0.1:1"):
        with pytest.raises(AddressError, match="expected the guest's hybrid address"):
            expose(agent_address, f"unix:{tmp_path}", port=5000)
    threads = threading.active_count()
    for timeout in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(BadInputError, match="connect_timeout must be a number of seconds"):
            forward(agent, listen=f"unix:{tmp_path}/f.sock", to=80, connect_timeout=timeout)
        with pytest.raises(BadInputError, match="connect_timeout must be a number of seconds"):
            expose(agent, f"unix:{tmp_path}", port=5000, connect_timeout=timeout)
    assert sorted(os.listdir(tmp_path)) == [] and threading.active_count() == threads


@pytest.mark.timeout(60)
def test_guest_to_host_expose_concurrent(tmp_path: Path) -> None:
    app = EchoServer(str(tmp_path / "app.sock"))
    try:
        agent = f"hvsock:{tmp_path}/vm.vsock:9999"
        with expose(agent, f"unix:{app.path}", port=5000) as exp:
            assert exp.description == f"guest CID 2 port 5000 -> unix:{app.path}"
            # Where the device connects for a guest's connect to (CID 2, port 5000).
            device_side = f"{tmp_path}/vm.vsock_5000"
            assert stat.S_IMODE(os.stat(device_side).st_mode) == 0o600
            payloads = [bytes([i]) * (50_000 + i) for i in range(12)]
            with ThreadPoolExecutor(12) as pool:
                echoed = list(pool.map(lambda p: exchange(device_side, p), payloads))
            assert echoed == payloads
            # Only what is exposed: nothing listens on another port's socket.
            assert not os.path.exists(f"{tmp_path}/vm.vsock_5001")
        assert not os.path.exists(device_side)
    finally:
        app.close()


@pytest.mark.timeout(60)
def test_expose_of_a_host_socket_that_went_away_fails_per_connection(tmp_path: Path) -> None:
    app = EchoServer(str(tmp_path / "app.sock"))
    try:
        with expose(f"hvsock:{tmp_path}/vm.vsock:9999", f"unix:{app.path}", port=5000) as exp:
            device_side = f"{tmp_path}/vm.vsock_5000"
            assert exchange(device_side, b"a") == b"a"
            app.stop_accepting()
            assert exchange(device_side, b"b") == b""
            assert f"unix:{app.path}" in (exp.last_error or "")
            app2 = EchoServer(app.path)
            try:
                assert exchange(device_side, b"c") == b"c"
            finally:
                app2.close()
    finally:
        app.close()


def _forward_threads() -> int:
    return sum(t.name.startswith("vsockrpc-forward") for t in threading.enumerate())


@pytest.mark.timeout(120)
def test_unclosed_forwarders_release_threads_fds_and_sockets(
    device: HybridPeer, guest80: EchoServer
) -> None:
    agent = f"hvsock:{device.path}:9999"
    path = str(Path(device.path).parent / "leak.sock")
    with forward(agent, listen="tcp:127.0.0.1:0", to=80) as warm:  # first-use imports, caches
        assert exchange(tcp_port(warm), b"warm") == b"warm"
    gc.collect()
    threads, fds = threading.active_count(), count_fds()
    for _ in range(50):
        fwd = forward(agent, listen=f"unix:{path}", to=80)
        assert exchange(path, b"x") == b"x"
        del fwd  # never closed
        gc.collect()
    assert not os.path.exists(path)
    assert _forward_threads() == 0
    # the test's own device and echo threads close their ends of the last connection a moment
    # after the client saw EOF; a forwarder leak would stay, so waiting for them is no escape
    assert wait_for(lambda: threading.active_count() <= threads), (
        threading.active_count(),
        threads,
    )
    assert wait_for(lambda: count_fds() <= fds), (count_fds(), fds)


@pytest.mark.timeout(60)
def test_sdk_guest_forward_and_expose(device: HybridPeer, guest80: EchoServer) -> None:
    app = EchoServer(str(Path(device.path).parent / "app.sock"))
    try:
        with Guest(f"hvsock:{device.path}:9999") as g:
            with g.forward("tcp:127.0.0.1:0", to=80) as fwd:
                assert exchange(tcp_port(fwd), b"sdk") == b"sdk"
            with g.expose(f"unix:{app.path}", port=5000) as exp:
                assert exchange(f"{device.path}_5000", b"back") == b"back"
            assert fwd.closed and exp.closed
        with (
            grpc.insecure_channel("unix:/nowhere") as ch,
            Guest(ch) as g,
            pytest.raises(AgentError, match="needs a Guest made from an address"),
        ):
            g.forward("tcp:127.0.0.1:0", to=80)
    finally:
        app.close()
