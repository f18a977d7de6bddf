"""The relay: both sides (client channel and server listener), streaming, breakage, leaks.

Topology for the end-to-end tests (AF_VSOCK can't be connected on this machine, so the relay's
outer side is the hybrid protocol through a stand-in device):

    grpc channel → client relay → HybridPeer ("CONNECT 5000") → <dev>_5000 → server relay → grpc
"""

from __future__ import annotations

import errno
import gc
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration._relay_helpers import (
    STREAM_SERVICE,
    HybridPeer,
    count_fds,
    register_stream_service,
    wait_for,
)
from tests.integration._served import agent_registrars
from tests.integration.agent_harness import running_agent
from vsockrpc import rpc, transport
from vsockrpc.addresses import Address, UnixAddress, VsockAddress
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.rpc._relay import Link, Relay
from vsockrpc.sdk import Guest
from vsockrpc.transport import unix

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
SERVICES = [*agent_registrars(), register_stream_service]
BIG_MESSAGES = [("grpc.max_receive_message_length", 32 * MiB)]


def add(ch: grpc.Channel, a: int = 5, b: int = 7, **kwargs: object) -> int:
    reply: pb.AdditionResponse = pb_grpc.VsockServiceStub(ch).Addition(  # type: ignore[no-untyped-call]
        pb.AdditionRequest(a=a, b=b), timeout=10, **kwargs
    )
    return reply.c


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[rpc.Server, HybridPeer, str]]:
    device = str(tmp_path / "vm.vsock")
    with (
        rpc.serve(SERVICES, [f"hvsock:{device}:5000"], options=BIG_MESSAGES) as server,
        HybridPeer(device, {5000: f"{device}_5000"}) as peer,
    ):
        yield server, peer, f"hvsock:{device}:5000"


# ---- Link: half-close and reset, on plain socket pairs -------------------------------------


def _link(
    splice: bool = True,
) -> tuple[socket.socket, socket.socket, Link, threading.Event, threading.Thread]:
    outer, a = socket.socketpair()
    b, inner = socket.socketpair()
    done = threading.Event()
    link = Link(a, b, lambda _link: done.set(), splice=splice)
    runner = threading.Thread(target=link.run)
    runner.start()
    return outer, inner, link, done, runner


@pytest.mark.timeout(30)
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_link_honours_half_close(splice: bool) -> None:
    outer, inner, link, done, runner = _link(splice)
    with outer, inner:
        outer.sendall(b"request")
        outer.shutdown(socket.SHUT_WR)
        assert inner.recv(100) == b"request"
        assert inner.recv(100) == b""  # EOF forwarded...
        inner.sendall(b"still talking back")  # ...while the other direction keeps flowing
        assert outer.recv(100) == b"still talking back"
        assert not done.is_set()
        inner.shutdown(socket.SHUT_WR)
        assert outer.recv(100) == b""
        assert done.wait(5)
    runner.join(5)
    link.join(5)
    assert not runner.is_alive()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_link_closes_both_ends_on_reset(splice: bool) -> None:
    outer, inner, link, done, runner = _link(splice)
    with inner:
        outer.sendall(b"x" * 1000)
        assert inner.recv(1000)
        # SO_LINGER 0 makes close() a reset on TCP; on a Unix socket closing with unread data
        # does the same to the peer's recv (ECONNRESET).
        outer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        inner.sendall(b"unread")
        time.sleep(0.1)
        outer.close()
        assert done.wait(5)
        assert inner.recv(100) == b""  # the relay closed its side towards inner
    runner.join(5)
    link.join(5)


@pytest.mark.timeout(30)
def test_link_falls_back_to_copying_when_splice_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused: list[int] = []

    def no_splice(*_args: object) -> int:
        refused.append(1)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "splice", no_splice)
    outer, inner, link, done, runner = _link()
    with outer, inner:
        payload = os.urandom(3 * MiB)
        sender = threading.Thread(target=outer.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            received += inner.recv(MiB)
        sender.join(5)
        assert received == payload
        inner.sendall(b"back")
        assert outer.recv(4) == b"back"
        outer.shutdown(socket.SHUT_WR)
        inner.shutdown(socket.SHUT_WR)
        assert done.wait(5)
    runner.join(5)
    link.join(5)
    assert len(refused) == 2  # each direction tried splice once, then copied


@pytest.mark.timeout(30)
def test_relay_keeps_serving_after_a_failed_dial(tmp_path: Path) -> None:
    target = unix.listen_path(str(tmp_path / "target.sock"))
    attempts: list[int] = []

    def dial(_conn: socket.socket, _peer: object) -> socket.socket:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionRefusedError("first dial fails")
        return unix.connect_path(str(tmp_path / "target.sock"))

    with target, Relay(unix.listen_path(str(tmp_path / "front.sock")), dial) as relay:
        first = unix.connect_path(str(tmp_path / "front.sock"))
        assert first.recv(1) == b""  # dropped
        first.close()
        with unix.connect_path(str(tmp_path / "front.sock")) as second:
            conn, _ = target.accept()
            with conn:
                second.sendall(b"ok")
                assert conn.recv(2) == b"ok"
        assert relay.last_error and "first dial fails" in relay.last_error


# ---- gRPC end to end through both relays ----------------------------------------------------


@pytest.mark.timeout(120)
def test_large_streams_both_ways(stack: tuple[rpc.Server, HybridPeer, str]) -> None:
    _, _, address = stack
    chunk = os.urandom(MiB)
    total = 64 * MiB
    with rpc.channel(address, options=BIG_MESSAGES) as ch:
        sent = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            for i in range(total // MiB):
                piece = chunk[i:] + chunk[:i]
                sent.update(piece)
                yield piece

        received = hashlib.sha256()
        size = 0
        for piece in ch.stream_stream(f"/{STREAM_SERVICE}/Echo")(chunks(), timeout=100):
            received.update(piece)
            size += len(piece)
        assert size == total
        assert received.hexdigest() == sent.hexdigest()

        # One message larger than the relay buffer and the pipe, both ways.
        big = os.urandom(24 * MiB)
        echoed = list(ch.stream_stream(f"/{STREAM_SERVICE}/Echo")(iter([big]), timeout=100))
        assert echoed == [big]
        assert (
            ch.stream_unary(f"/{STREAM_SERVICE}/Upload")(iter([big] * 2), timeout=100)
            == str(2 * len(big)).encode()
        )


@pytest.mark.timeout(60)
def test_client_disconnect_mid_stream(stack: tuple[rpc.Server, HybridPeer, str]) -> None:
    server, _, address = stack
    with rpc.channel(address) as other:
        assert add(other) == 12
        ch = rpc.channel(address)
        stream = ch.unary_stream(f"/{STREAM_SERVICE}/Download")(
            f"{1024 * 1024 * MiB} {MiB}".encode(), timeout=50
        )
        assert len(next(stream)) == MiB
        assert server.relayed_connections == 2
        ch.close()  # mid-stream: the relays see the connection go away
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert wait_for(lambda: server.relayed_connections == 1)
        assert add(other, 1, 2) == 3  # the other connection is untouched
    # A client that resets in the middle of its HTTP/2 preface doesn't disturb the server.
    raw = unix.connect_path(f"{stack[1].path}_5000")
    raw.sendall(b"PRI * HTTP/2.0\r\n")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    with rpc.channel(address) as again:
        assert add(again, 2, 2) == 4
    assert wait_for(lambda: server.relayed_connections == 0)


@pytest.mark.timeout(60)
def test_server_restart(tmp_path: Path) -> None:
    device = str(tmp_path / "vm.vsock")
    listen = f"hvsock:{device}:5000"
    with HybridPeer(device, {5000: f"{device}_5000"}), rpc.channel(listen) as ch:
        with rpc.serve(SERVICES, [listen]):
            assert add(ch) == 12
        with pytest.raises(grpc.RpcError) as info:
            add(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with rpc.serve(SERVICES, [listen]):
            # The same channel reconnects through its relay to the new server.
            assert add(ch, 40, 2, wait_for_ready=True) == 42


@pytest.mark.timeout(60)
def test_peer_address_survives_the_relay(
    stack: tuple[rpc.Server, HybridPeer, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, _, address = stack
    peer_call = f"/{STREAM_SERVICE}/Peer"
    with rpc.channel(address) as ch:
        # A hybrid listener can't know the guest's CID: unknown, never a made-up address.
        assert ch.unary_unary(peer_call)(b"", timeout=10) == b"None"
    # What an AF_VSOCK accept() hands the server relay (the host, CID 2): conveyed by name.
    monkeypatch.setattr(
        transport, "accepted_peer", lambda _listening, _conn, _peer: VsockAddress(2, 61234)
    )
    with rpc.channel(address) as ch:
        assert ch.unary_unary(peer_call)(b"", timeout=10) == b"VsockAddress(cid=2, port=61234)"
    # Direct Unix clients are reported as such.
    with (
        rpc.serve(SERVICES, [f"unix:{tmp_path}/direct.sock"]),
        rpc.channel(f"unix:{tmp_path}/direct.sock") as ch,
    ):
        assert ch.unary_unary(peer_call)(b"", timeout=10) == b"None"  # unbound client


@pytest.mark.timeout(300)
def test_no_fd_or_thread_leak_after_1000_connections(
    stack: tuple[rpc.Server, HybridPeer, str],
) -> None:
    server, peer, address = stack
    with rpc.channel(address) as ch:  # warm up grpcio's lazily started threads
        assert add(ch) == 12
    assert wait_for(lambda: server.relayed_connections == 0)
    time.sleep(0.2)
    fds, threads = count_fds(), threading.active_count()
    for i in range(1000):
        with rpc.channel(address) as ch:
            assert add(ch, i, 1) == i + 1
    assert len(peer.commands) == 1001
    assert wait_for(lambda: server.relayed_connections == 0)
    assert wait_for(lambda: threading.active_count() <= threads), (
        threading.active_count(),
        threads,
        [t.name for t in threading.enumerate()],
    )
    assert wait_for(lambda: count_fds() <= fds), (count_fds(), fds)


# ---- unclosed channels: nothing outlives them, nothing outlives the process ------------------

_DROPPED_CHANNELS = r"""
import gc, glob, json, os, resource, sys, tempfile, threading, time
from tests.integration._relay_helpers import HybridPeer, count_fds
from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb, vsock_service_pb2_grpc as pb_grpc
from tests.integration._served import agent_registrars

resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
device = sys.argv[1]
address = f"hvsock:{device}:5000"

def dirs():
    return len(glob.glob(os.path.join(tempfile.gettempdir(), "vsockrpc-*")))

def use_and_drop(i):
    # Neither the channel nor its stub is closed: both just go out of scope.
    stub = pb_grpc.VsockServiceStub(rpc.channel(address))
    assert stub.Addition(pb.AdditionRequest(a=i, b=1), timeout=10).c == i + 1

def settle(fds, threads):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        gc.collect()
        if count_fds() <= fds and threading.active_count() <= threads:
            return
        time.sleep(0.05)

peer = HybridPeer(device, {5000: device + "_5000"})
with rpc.serve(agent_registrars(), [address]), peer:
    use_and_drop(-1)  # warm up grpcio's lazily started threads
    gc.collect()
    time.sleep(0.5)
    before = (count_fds(), threading.active_count(), dirs())
    for i in range(int(sys.argv[2])):
        use_and_drop(i)
    settle(*before[:2])
    after = (count_fds(), threading.active_count(), dirs())
print(json.dumps({"before": before, "after": after, "end_dirs": dirs()}))
"""


@pytest.mark.timeout(600)
def test_dropped_channels_release_relay_threads_fds_and_dirs(tmp_path: Path) -> None:
    tmpdir = tempfile.mkdtemp(prefix="t", dir="/tmp")  # the relay's sockets live below it
    try:
        result = subprocess.run(
            [sys.executable, "-c", _DROPPED_CHANNELS, str(tmp_path / "vm.vsock"), "1000"],
            capture_output=True,
            check=False,
            text=True,
            timeout=580,
            env={**os.environ, "TMPDIR": tmpdir},
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        counts = json.loads(result.stdout)
        fds, threads, dirs = counts["before"]
        assert counts["after"][0] <= fds, counts
        assert counts["after"][1] <= threads, counts
        assert counts["after"][2] <= dirs <= 1, counts  # the server's own, at most
        assert counts["end_dirs"] == 0, counts
        assert "Exception" not in result.stderr, result.stderr[-3000:]
        assert os.listdir(tmpdir) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_a_stub_keeps_its_channel_alive(stack: tuple[rpc.Server, HybridPeer, str]) -> None:
    _, _, address = stack
    stub = pb_grpc.VsockServiceStub(rpc.channel(address))  # type: ignore[no-untyped-call]
    gc.collect()
    reply: pb.AdditionResponse = stub.Addition(pb.AdditionRequest(a=2, b=3), timeout=10)
    assert reply.c == 5


_HOLD_A_CHANNEL = r"""
import signal, sys, time
from vsockrpc import rpc
if sys.argv[2] == "own-handler":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
ch = rpc.channel(sys.argv[1])
print("ready", flush=True)
# Short sleeps: a signal whose C handler runs (in any thread) just before a long sleep starts
# is only acted on once that sleep returns (CPython checks pending handlers between bytecodes).
for _ in range(600):
    time.sleep(0.1)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("handler", "status"), [("default", -signal.SIGTERM), ("own-handler", 3)])
def test_sigterm_leaves_no_private_directory(tmp_path: Path, handler: str, status: int) -> None:
    tmpdir = tempfile.mkdtemp(prefix="t", dir="/tmp")
    try:
        with subprocess.Popen(
            [sys.executable, "-c", _HOLD_A_CHANNEL, f"hvsock:{tmp_path}/absent.sock:1", handler],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": tmpdir},
        ) as proc:
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline() == "ready\n"
                assert len(glob.glob(f"{tmpdir}/vsockrpc-*/relay-*")) == 1
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=20) == status  # the signal's usual outcome
            finally:
                proc.kill()
        assert os.listdir(tmpdir) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---- dialing is injectable -------------------------------------------------------------------


class _LoopbackDialer:
    """Reaches any address through one Unix socket, recording what it was asked for."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dialled: list[tuple[Address, float | None]] = []

    def connect(self, address: Address, *, timeout: float | None = None) -> socket.socket:
        self.dialled.append((address, timeout))
        return unix.connect_path(self.path, timeout=timeout)


@pytest.mark.timeout(60)
def test_channel_dials_through_an_injected_dialer(tmp_path: Path) -> None:
    path = str(tmp_path / "server.sock")
    dialer = _LoopbackDialer(path)
    with rpc.serve(SERVICES, [f"unix:{path}"]):
        # A vsock address: only the dialer is asked to reach it (no AF_VSOCK socket here).
        with rpc.channel("vsock:7:1234", dialer=dialer, connect_timeout=4) as ch:
            assert add(ch) == 12
        with rpc.channel(f"unix:{tmp_path}/elsewhere.sock", dialer=dialer) as ch:
            assert add(ch, 1, 1) == 2
    assert dialer.dialled[0] == (VsockAddress(7, 1234), 4)
    assert dialer.dialled[-1][0] == UnixAddress(f"{tmp_path}/elsewhere.sock")


@pytest.mark.timeout(600)
def test_unclosed_guests_release_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue: 1,000 Guest(addr).run(["true"]) without close left 4 fds, a thread and a directory
    # each (with ulimit -n 1024, calls failed from the 253rd). A hybrid address: relayed.
    device = str(tmp_path / "vm.vsock")
    base = tempfile.mkdtemp(prefix="t", dir="/tmp")  # relay directories: ours alone here
    monkeypatch.setattr(tempfile, "tempdir", base)
    with running_agent() as agent, HybridPeer(device, {9999: agent.address.removeprefix("unix:")}):
        address = f"hvsock:{device}:9999"
        assert Guest(address).run(["true"]).exit_code == 0  # warm up
        gc.collect()
        fds, threads, dirs = count_fds(), _client_threads(), set(_relay_dirs())
        for _ in range(1000):
            assert Guest(address).run(["true"]).exit_code == 0
        assert wait_for(lambda: gc.collect() >= 0 and _client_threads() <= threads), [
            t.name for t in threading.enumerate()
        ]
        assert wait_for(lambda: count_fds() <= fds), (count_fds(), fds)
        assert set(_relay_dirs()) <= dirs
    assert _relay_dirs() == []
    os.rmdir(base)


def _client_threads() -> int:
    """Threads besides the agent server's worker pool (which grows up to max_workers)."""
    return sum(not t.name.startswith("vsockrpc-rpc_") for t in threading.enumerate())


def _relay_dirs() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "vsockrpc-*"))
