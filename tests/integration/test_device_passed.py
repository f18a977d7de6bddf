"""Passed streams: a host client hands the device the socket the guest port should reach, with
its ``CONNECT`` (``vsockrpc.vhost.hybrid``, "Passed streams"), and ``vsockrpc forward`` and the
gRPC relay use that on our device so no relay process sits between the client and the guest.
Real device, test driver as the guest (pumped in a thread of its own)."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration._device_helpers import served_device, short_paths
from tests.integration._relay_helpers import count_fds, wait_for
from vsockrpc.addresses import HybridAddress
from vsockrpc.forward import Forwarder, forward
from vsockrpc.transport import hybrid
from vsockrpc.vhost import VsockDevice
from vsockrpc.vhost.testing import GuestDriver, GuestStream

CID = 7
PORT = 80
FORWARD_CLI = [sys.executable, "-m", "vsockrpc.cli.main", "forward"]

pytestmark = pytest.mark.timeout(60)


class EchoGuest:
    """The test driver as a booted guest: port :data:`PORT` echoes each stream, and closes it
    after the host's EOF. Pumped in its own thread; counts the streams that ended by RST."""

    def __init__(self, vhost_path: str) -> None:
        self.driver = GuestDriver(vhost_path, guest_cid=CID)
        self.driver.boot()
        self.listener = self.driver.listen(PORT)
        self.accepted = 0
        self.resets = 0
        self._streams: list[GuestStream] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver.pump(0.01)
            while self.listener.backlog:
                self._streams.append(self.listener.backlog.popleft())
                self.accepted += 1
            for stream in list(self._streams):
                if stream.reset:
                    self.resets += 1
                    self._streams.remove(stream)
                    continue
                if data := stream.recv():
                    stream.send(data)
                if stream.eof:
                    stream.close()
                    self._streams.remove(stream)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.driver.close()


@pytest.fixture
def paths() -> Iterator[tuple[str, str]]:
    with short_paths("vp") as p:
        yield p


@pytest.fixture
def device(paths: tuple[str, str]) -> Iterator[VsockDevice]:
    with served_device(paths, CID) as dev:
        yield dev


@pytest.fixture
def guest(device: VsockDevice) -> Iterator[EchoGuest]:
    assert device.vhost_path is not None
    echo = EchoGuest(device.vhost_path)
    yield echo
    echo.close()


def agent(device: VsockDevice) -> str:
    return f"hvsock:{device.uds_path}:9999"


def tcp(fwd: Forwarder) -> tuple[str, int]:
    host, _, port = str(fwd.listen_address).removeprefix("tcp:").rpartition(":")
    return host, int(port)


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read until EOF (or a reset: a connection closed with
    ``payload`` unread is reset)."""
    with socket.create_connection(address, timeout=20) as s:
        out = bytearray()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        return bytes(out)


def pump_threads() -> int:
    return sum(t.name == "vsockrpc-relay-pump" for t in threading.enumerate())


def test_forward_passes_each_connection_to_the_device(
    device: VsockDevice, guest: EchoGuest
) -> None:
    with forward(agent(device), listen="tcp:127.0.0.1:0", to=PORT) as fwd:
        payloads = [bytes([i]) * (50_000 + i * 7919) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            echoed = list(pool.map(lambda p: exchange(tcp(fwd), p), payloads))
        assert echoed == payloads  # both ways, half-close honoured
        assert fwd.passed_connections == 8 and fwd.failures == 0
        with socket.create_connection(tcp(fwd), timeout=20) as live:
            live.sendall(b"ping")
            assert live.recv(4) == b"ping"
            assert pump_threads() == 0  # nothing relayed: the device holds the stream
        assert wait_for(lambda: fwd.active_connections == 0, 10)
    assert guest.resets == 0


def test_closing_the_forwarder_ends_its_passed_streams(
    device: VsockDevice, guest: EchoGuest
) -> None:
    fwd = forward(agent(device), listen="tcp:127.0.0.1:0", to=PORT)
    with socket.create_connection(tcp(fwd), timeout=20) as live:
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        assert wait_for(lambda: fwd.active_connections == 1, 10)  # registered after the OK
        fwd.close()  # as a relayed link breaks: the device resets the guest and closes
        with contextlib.suppress(ConnectionResetError):  # EOF, or a reset: both end it
            assert live.recv(1) == b""
    assert wait_for(lambda: guest.resets == 1, 10)
    assert wait_for(lambda: not device.muxer.conns, 10)


def test_a_guest_port_nobody_listens_on_fails_that_connection_only(
    device: VsockDevice, guest: EchoGuest
) -> None:
    with forward(agent(device), listen="tcp:127.0.0.1:0", to=81) as refused:
        assert exchange(tcp(refused), b"hello") == b""
        assert refused.failures == 1 and refused.passed_connections == 0
        assert "before OK" in (refused.last_error or "")
    with forward(agent(device), listen="tcp:127.0.0.1:0", to=PORT) as fwd:
        assert exchange(tcp(fwd), b"hello") == b"hello"


def test_the_client_leaving_before_the_guest_answers_is_forgotten(device: VsockDevice) -> None:
    """No guest yet: the CONNECT waits; the client giving up closes the stream it passed."""
    client, stream = socket.socketpair()
    with client, stream:
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.connect(device.uds_path)
        socket.send_fds(control, [f"CONNECT {PORT}\n".encode()], [stream.fileno()])
        assert wait_for(lambda: len(device.muxer.conns) == 1, 10)
        control.close()
        assert wait_for(lambda: not device.muxer.conns, 10)
        stream.close()  # the device's copy is closed too: the client sees EOF
        client.settimeout(10)
        assert client.recv(1) == b""


@pytest.mark.parametrize("what", ["pipe", "datagram", "listener", "unconnected", "two sockets"])
def test_the_device_refuses_anything_but_one_connected_stream(
    device: VsockDevice, guest: EchoGuest, what: str
) -> None:
    before = count_fds()
    opened: list[int] = []
    keep: list[socket.socket] = []
    if what == "pipe":
        opened += os.pipe()
        fds = [opened[0]]
    elif what == "datagram":
        keep.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        fds = [keep[0].fileno()]
    elif what == "listener":
        keep.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        keep[0].bind(("127.0.0.1", 0))
        keep[0].listen()
        fds = [keep[0].fileno()]
    elif what == "unconnected":
        keep.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        fds = [keep[0].fileno()]
    else:
        keep += socket.socketpair()
        fds = [keep[0].fileno(), keep[1].fileno()]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(10)
        control.connect(device.uds_path)
        socket.send_fds(control, [f"CONNECT {PORT}\n".encode()], fds)
        assert control.recv(64) == b""  # closed without OK
    for fd in opened:
        os.close(fd)
    for sock in keep:
        sock.close()
    assert wait_for(lambda: count_fds() == before, 10)  # the device kept none of them
    assert guest.accepted == 0
    # ... and serves the next client as before.
    client, stream = socket.socketpair()
    with client, stream:
        lifeline, passed = hybrid.connect_passing(
            HybridAddress(device.uds_path, PORT), stream, timeout=10
        )
        stream.close()
        with lifeline:
            assert passed
            client.settimeout(10)
            client.sendall(b"again")
            assert client.recv(5) == b"again"


def test_killing_the_forwarder_process_ends_its_passed_streams(
    device: VsockDevice, guest: EchoGuest
) -> None:
    """kill -9 of ``vsockrpc forward``: the kernel closes its lifelines, and the device ends
    the streams as the forwarder's relay threads would have died with it."""
    proc = subprocess.Popen(
        [*FORWARD_CLI, agent(device), "--listen", "tcp:127.0.0.1:0", "--to", str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "forwarding tcp:127.0.0.1:PORT -> guest port 80"
        host, _, port = line.split()[1].removeprefix("tcp:").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=20) as live:
            live.sendall(b"ping")
            assert live.recv(4) == b"ping"
            proc.kill()
            proc.wait(10)
            with contextlib.suppress(ConnectionResetError):
                assert live.recv(1) == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert wait_for(lambda: guest.resets == 1, 10)
    assert wait_for(lambda: not device.muxer.conns, 10)


def test_an_unclosed_forwarder_with_a_live_passed_stream_releases_everything(
    device: VsockDevice, guest: EchoGuest
) -> None:
    with forward(agent(device), listen="tcp:127.0.0.1:0", to=PORT) as warm:  # first-use costs
        assert exchange(tcp(warm), b"warm") == b"warm"
    assert wait_for(lambda: not device.muxer.conns, 10)
    gc.collect()
    threads, fds = threading.active_count(), count_fds()
    fwd = forward(agent(device), listen="tcp:127.0.0.1:0", to=PORT)
    with socket.create_connection(tcp(fwd), timeout=20) as live:
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        del fwd  # never closed, a stream still open
        gc.collect()
        with contextlib.suppress(ConnectionResetError):
            assert live.recv(1) == b""  # the device ended it when the lifeline closed
    assert wait_for(lambda: not device.muxer.conns, 10)
    assert wait_for(lambda: threading.active_count() <= threads, 10)
    assert wait_for(lambda: count_fds() <= fds, 10), (count_fds(), fds)


def test_a_stream_passed_with_the_first_part_of_a_split_line_is_taken(
    device: VsockDevice, guest: EchoGuest
) -> None:
    client, stream = socket.socketpair()
    with client, stream, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(10)
        control.connect(device.uds_path)
        socket.send_fds(control, [b"CONN"], [stream.fileno()])
        time.sleep(0.1)  # the device reads "CONN" and the fd on their own
        control.sendall(f"ECT {PORT}\n".encode())
        assert control.recv(64).endswith(b" PASSED\n")
        stream.close()
        client.settimeout(10)
        client.sendall(b"split")
        assert client.recv(5) == b"split"


def test_a_stream_passed_with_a_garbage_line_is_closed(
    device: VsockDevice, guest: EchoGuest
) -> None:
    before = count_fds()
    client, stream = socket.socketpair()
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(10)
        control.connect(device.uds_path)
        socket.send_fds(control, [b"HELLO 80\n"], [stream.fileno()])
        stream.close()
        assert control.recv(64) == b""  # closed without a reply
        client.settimeout(10)
        assert client.recv(1) == b""  # ... and the device closed the stream it was passed
    assert wait_for(lambda: count_fds() == before, 10)
    assert guest.accepted == 0
