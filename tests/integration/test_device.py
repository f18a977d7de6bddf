"""The vhost-user-vsock back-end driven over its real vhost-user socket by the test driver
(memfd guest memory, real eventfds, rings laid out by the driver, QEMU's message order)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration._device_helpers import served_device, short_paths
from vsockrpc.errors import DeviceError
from vsockrpc.vhost import SessionState, VsockDevice
from vsockrpc.vhost.packet import SHUTDOWN_SEND, Op
from vsockrpc.vhost.protocol import (
    MEM_REGION,
    MEM_TABLE_HEAD,
    PROTOCOL_FEATURES,
    U64,
    Request,
)
from vsockrpc.vhost.testing import GuestDriver, GuestStream, RxLayout, serving
from vsockrpc.vhost.virtqueue import AVAIL_F_NO_INTERRUPT

CID = 7
MiB = 1 << 20


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_host_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def track(s: socket.socket) -> socket.socket:
    _OPEN.append(s)
    return s


@pytest.fixture
def paths() -> Iterator[tuple[str, str]]:
    with short_paths("vd") as p:
        yield p


@pytest.fixture
def device(paths: tuple[str, str]) -> Iterator[VsockDevice]:
    with served_device(paths, CID) as dev:
        yield dev


@contextlib.contextmanager
def booted(device: VsockDevice, **kw: object) -> Iterator[GuestDriver]:
    assert device.vhost_path is not None
    with GuestDriver(device.vhost_path, guest_cid=CID, **kw) as guest:  # type: ignore[arg-type]
        guest.boot()
        yield guest


@pytest.fixture
def guest(device: VsockDevice) -> Iterator[GuestDriver]:
    with booted(device) as g:
        yield g


def host_connect(device: VsockDevice, port: int, extra: bytes = b"") -> socket.socket:
    s = track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    s.settimeout(10)
    for _ in range(500):
        try:
            s.connect(device.uds_path)
            break
        except BlockingIOError:  # backlog full for a moment: a real client retries too
            time.sleep(0.01)
    s.sendall(f"CONNECT {port}\n".encode() + extra)
    return s


def read_ok(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            raise EOFError(f"EOF before OK (got {line!r})")
        line += c
    return line


def open_pair(
    device: VsockDevice,
    guest: GuestDriver,
    port: int = 1234,
) -> tuple[socket.socket, GuestStream]:
    listener = guest.listeners.get(port) or guest.listen(port)
    s = host_connect(device, port)
    stream = guest.accept(listener)
    # The OK line arrives once the RESPONSE was processed: pump until then.
    guest.pump(0.05)
    line = read_ok(s)
    assert line.startswith(b"OK ")
    return s, stream


def host_reader(s: socket.socket, n: int) -> tuple[threading.Thread, bytearray]:
    """A started thread reading ``n`` bytes (or to EOF) from host socket ``s`` into the
    returned buffer."""
    got = bytearray()

    def read() -> None:
        while len(got) < n:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=read)
    t.start()
    return t, got


def recv_all_guest(guest: GuestDriver, stream: GuestStream, n: int, timeout: float = 60) -> bytes:
    out = bytearray()

    def enough() -> bool:
        out.extend(stream.recv())
        return len(out) >= n

    guest.wait_for(enough, timeout, f"{n} bytes")
    return bytes(out)


# --------------------------------------------------------------------------- handshake
@pytest.mark.timeout(20)
def test_handshake_in_qemu_order(device: VsockDevice) -> None:
    assert device.vhost_path is not None
    with GuestDriver(device.vhost_path, guest_cid=CID) as g:
        g.handshake()
        assert g.config_cid == CID  # GET_CONFIG: le64 guest_cid
        assert g.queue_num == 2
        assert g.features == (1 << 32) | (1 << 30)
        g.start()
        assert device.state is SessionState.RUNNING
        # One REQUEST to a closed guest port: one rx buffer used, one tx (the guest's RST).
        s = host_connect(device, 4321)
        g.wait_for(lambda: any(p.op == Op.REQUEST for p in g.packets), 5)
        g.pump(0.1)
        assert s.recv(10) == b""
        bases = g.stop_rings()  # GET_VRING_BASE replies last_avail_idx per ring
        assert bases == [1, 1]
        assert device.state is not SessionState.RUNNING


@pytest.mark.timeout(20)
def test_memory_table_before_set_owner_is_refused(device: VsockDevice) -> None:
    assert device.vhost_path is not None
    with GuestDriver(device.vhost_path, guest_cid=CID) as g:
        g._req(Request.GET_PROTOCOL_FEATURES, reply=True)
        g._req(Request.SET_PROTOCOL_FEATURES, U64.pack(PROTOCOL_FEATURES))
        table = MEM_TABLE_HEAD.pack(1, 0) + MEM_REGION.pack(0, 4096, 0, 0)
        with pytest.raises(DeviceError, match="REPLY_ACK"):
            g._req(Request.SET_MEM_TABLE, table, [g.memfd], ack=True)
        assert not device.memory.regions
        g.boot()  # the session carries on normally afterwards
        assert device.state is SessionState.RUNNING


@pytest.mark.timeout(20)
def test_qemu_disconnect_then_next_frontend(device: VsockDevice) -> None:
    with booted(device) as g:
        s, _stream = open_pair(device, g)
    # Front-end gone: connections dropped, memory unmapped.
    assert s.recv(10) == b""
    deadline = time.monotonic() + 5
    while device.state is not SessionState.WAITING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.state is SessionState.WAITING
    assert not device.memory.regions
    with booted(device) as g2:
        s2, stream2 = open_pair(device, g2, 99)
        s2.sendall(b"again")
        assert recv_all_guest(g2, stream2, 5) == b"again"
    assert device.sessions == 2


# --------------------------------------------------------------------------- connections
@pytest.mark.timeout(20)
def test_host_initiated_keeps_bytes_after_command(device: VsockDevice, guest: GuestDriver) -> None:
    listener = guest.listen(1234)
    s = host_connect(device, 1234, extra=b"early bytes")
    stream = guest.accept(listener)
    assert (stream.local_port, stream.peer_port >= 1 << 30) == (1234, True)
    guest.pump(0.05)
    assert read_ok(s) == f"OK {stream.peer_port}\n".encode()
    assert recv_all_guest(guest, stream, 11) == b"early bytes"
    stream.send(b"from guest")
    guest.pump(0.05)
    assert s.recv(100) == b"from guest"


@pytest.mark.timeout(20)
def test_host_connect_to_closed_guest_port_gets_eof(
    device: VsockDevice, guest: GuestDriver
) -> None:
    s = host_connect(device, 4321)
    guest.wait_for(lambda: any(p.op == Op.REQUEST for p in guest.packets), 5)
    guest.pump(0.1)  # the guest's RST goes out
    with pytest.raises(EOFError):
        read_ok(s)


@pytest.mark.timeout(20)
def test_host_connect_times_out_without_response(device: VsockDevice, guest: GuestDriver) -> None:
    guest.listen(1)  # listener exists, but the driver never pumps: no RESPONSE
    s = host_connect(device, 5555)
    t0 = time.monotonic()
    # Nobody runs the guest: the REQUEST sits in rx; after 2 s the device gives up.
    with pytest.raises(EOFError):
        read_ok(s)
    assert 1.5 < time.monotonic() - t0 < 5


@pytest.mark.timeout(20)
def test_host_connect_before_the_guest_driver_waits_for_it(device: VsockDevice) -> None:
    """A restored guest's device is re-plugged while the host is already dialling: a CONNECT
    that comes before the driver starts the rings is answered once it has, not closed."""
    s = host_connect(device, 1234)
    time.sleep(0.3)  # the device has read the line; no front-end, no rings yet
    assert len(device.muxer.conns) == 1 and not device.muxer.running
    with booted(device) as guest:
        listener = guest.listen(1234)
        stream = guest.accept(listener)
        guest.pump(0.05)
        assert read_ok(s) == f"OK {stream.peer_port}\n".encode()
        s.sendall(b"hello")
        assert recv_all_guest(guest, stream, 5) == b"hello"


@pytest.mark.timeout(20)
def test_host_connect_with_no_guest_ends_after_the_connect_timeout(device: VsockDevice) -> None:
    s = host_connect(device, 1234)
    t0 = time.monotonic()
    with pytest.raises(EOFError):
        read_ok(s)
    assert 1.5 < time.monotonic() - t0 < 5
    # Nothing is left behind, and a guest that starts later sees no stale REQUEST or RST.
    deadline = time.monotonic() + 5
    while device.muxer.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not device.muxer.conns
    with booted(device) as guest:
        guest.pump(0.2)
        assert not guest.packets


@pytest.mark.timeout(20)
def test_garbage_command_is_closed(device: VsockDevice, guest: GuestDriver) -> None:
    s = track(socket.socket(socket.AF_UNIX))
    s.settimeout(5)
    s.connect(device.uds_path)
    s.sendall(b"HELLO there\n")
    assert s.recv(10) == b""


@pytest.mark.timeout(20)
@pytest.mark.parametrize("split", [1, 20, 43, 44])
def test_tx_header_split_across_descriptors(
    device: VsockDevice, guest: GuestDriver, split: int
) -> None:
    s, stream = open_pair(device, guest)
    guest.send_packet(Op.RW, stream.local_port, stream.peer_port, b"odd layout", split_header=split)
    assert s.recv(100) == b"odd layout"


@pytest.mark.timeout(20)
def test_guest_initiated_reaches_unix_listener(device: VsockDevice, guest: GuestDriver) -> None:
    srv = track(socket.socket(socket.AF_UNIX))
    srv.bind(f"{device.uds_path}_5000")
    srv.listen()
    srv.settimeout(5)
    stream = guest.connect(5000)
    peer = track(srv.accept()[0])
    peer.settimeout(5)
    stream.send(b"ping from guest")
    guest.pump(0.05)
    assert peer.recv(100) == b"ping from guest"
    peer.sendall(b"pong")
    assert recv_all_guest(guest, stream, 4) == b"pong"
    srv.close()


@pytest.mark.timeout(10)
def test_guest_connect_with_no_listener_is_refused_at_once(guest: GuestDriver) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        guest.connect(5001, timeout=3)
    assert time.monotonic() - t0 < 1.0  # RST at once, no 2 s hang


# --------------------------------------------------------------------------- bulk
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("rx_buf_size", "layout"),
    [(3776, RxLayout.SINGLE), (44 + 4096, RxLayout.SPLIT), (44 + 65536, RxLayout.SINGLE)],
    ids=["linux-3776", "split-44+4096", "large-64k"],
)
def test_16mib_each_way_checksummed(
    device: VsockDevice, rx_buf_size: int, layout: RxLayout
) -> None:
    size = 16 * MiB
    data_h2g = os.urandom(size)
    data_g2h = os.urandom(size)
    with booted(device, rx_buf_size=rx_buf_size, rx_layout=layout) as g:
        s, stream = open_pair(device, g)
        got_host = hashlib.sha256()
        received = [0]

        def host_side() -> None:
            s.sendall(data_h2g)

        def host_reader() -> None:
            while received[0] < size:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got_host.update(chunk)
                received[0] += len(chunk)

        writer = threading.Thread(target=host_side)
        reader = threading.Thread(target=host_reader)
        writer.start()
        reader.start()
        stream.send(data_g2h)
        got_guest = hashlib.sha256()
        n = 0

        def progress() -> bool:
            nonlocal n
            chunk = stream.recv()
            got_guest.update(chunk)
            n += len(chunk)
            return n >= size and received[0] >= size

        g.wait_for(progress, 100, "16 MiB each way")
        writer.join(10)
        reader.join(10)
        assert n == size and received[0] == size
        assert got_guest.digest() == hashlib.sha256(data_h2g).digest()
        assert got_host.digest() == hashlib.sha256(data_g2h).digest()


@pytest.mark.timeout(30)
def test_small_messages_take_one_rx_buffer_each(device: VsockDevice, guest: GuestDriver) -> None:
    """Request/response traffic reads each message into one rx buffer. The batch read (up to
    16 buffers per recvmsg_into) is for reads that fill whole buffers; for 64-byte messages it
    popped 16 buffers and held 15 of them back, unused, after every read."""
    s, stream = open_pair(device, guest)
    for i in range(20):
        msg = f"{i:02d}".encode() * 32
        s.sendall(msg)
        assert recv_all_guest(guest, stream, 64) == msg
        stream.send(msg[:8])
        guest.pump(0.01)
        got = b""
        while len(got) < 8:
            got += s.recv(8 - len(got))
        assert got == msg[:8]
    guest.sync()
    rx = device.rings[0]
    assert (rx.last_avail_idx - rx.used_idx) & 0xFFFF == 0  # no rx buffer popped and held
    s.close()


@pytest.mark.timeout(30)
def test_a_guest_that_asks_for_no_interrupts_gets_its_bytes_without_one(
    device: VsockDevice, guest: GuestDriver
) -> None:
    """2.7.7.2: while the guest's rx ring says NO_INTERRUPT (Linux sets it while it drains the
    ring), the device publishes what arrives without signalling; cleared, it signals again."""
    s, stream = open_pair(device, guest)
    rx, call = device.rings[0], guest.call[0]
    guest.set_avail_flags(0, AVAIL_F_NO_INTERRUPT)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(call)  # what the handshake signalled
    published = guest._used_idx(0)
    s.sendall(b"q" * 100)
    deadline = time.monotonic() + 10
    while guest._used_idx(0) == published:  # the device filled an rx buffer
        assert time.monotonic() < deadline, "the device did not deliver the bytes"
        time.sleep(0.005)
    assert not select.select([call], [], [], 0.2)[0], "signalled although the guest said not to"
    assert rx.signals_suppressed == 1
    assert recv_all_guest(guest, stream, 100) == b"q" * 100  # found in the used ring all the same

    guest.set_avail_flags(0, 0)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(call)
    s.sendall(b"r" * 100)
    assert select.select([call], [], [], 10)[0], "no signal once the guest wanted one again"
    assert recv_all_guest(guest, stream, 100) == b"r" * 100
    s.close()


@pytest.mark.timeout(30)
def test_the_host_reading_what_the_guest_sent_does_not_wake_the_device(
    device: VsockDevice, guest: GuestDriver
) -> None:
    """With nothing waiting to be written, the device does not watch a host socket for
    EPOLLOUT: edge-triggered, it fired each time the host read and freed buffer space, one
    idle loop pass per round trip of a request/response stream."""

    def settled() -> int:
        """The device's pass count once it has stayed put for 50 ms (the guest's packet and
        the deferred tx-completion signal are handled by then)."""
        passes = -1
        while passes != device.muxer.stats_passes:
            passes = device.muxer.stats_passes
            time.sleep(0.05)
        return passes

    s, stream = open_pair(device, guest)
    for i in range(10):
        msg = f"{i:02d}".encode() * 32
        stream.send(msg)
        guest.pump(0.05)
        passes = settled()
        got = b""
        while len(got) < len(msg):
            got += s.recv(len(msg) - len(got))
        assert got == msg
        assert settled() == passes, f"round {i}: the host's read woke the device"
    s.close()


# --------------------------------------------------------------------------- credit
@pytest.mark.timeout(60)
def test_credit_exhaustion_and_recovery_host_to_guest(device: VsockDevice) -> None:
    buf_alloc = 64 * 1024
    with booted(device, buf_alloc=buf_alloc) as g:
        s, stream = open_pair(device, g)
        payload = os.urandom(2 * MiB)
        writer = threading.Thread(target=s.sendall, args=(payload,))
        writer.start()
        # The guest app does not read: the device must stop at the guest's buf_alloc.
        g.wait_for(lambda: len(stream.rxbuf) >= buf_alloc, 10, "buffer full")
        for _ in range(20):
            g.pump(0.02)
        assert len(stream.rxbuf) == buf_alloc  # never more than the credit granted
        assert stream.credit_requests_seen >= 1  # 5.10.6.3: the device asked for credit
        conn = next(iter(device.muxer.conns.values()))
        assert conn.peer_free() == 0
        # Recovery: the app reads, the guest sends CREDIT_UPDATE, data flows again.
        got = recv_all_guest(g, stream, len(payload))
        writer.join(10)
        assert got == payload


@pytest.mark.timeout(60)
def test_slow_host_reader_stalls_guest_through_credit(paths: tuple[str, str]) -> None:
    vpath, upath = paths
    buf_alloc = 128 * 1024
    with (
        VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=CID, buf_alloc=buf_alloc) as dev,
        serving(dev),
        booted(dev) as g,
    ):
        s, stream = open_pair(dev, g)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        payload = os.urandom(8 * MiB)
        stream.send(payload)
        for _ in range(100):
            g.pump(0.01)
        conn = next(iter(dev.muxer.conns.values()))
        # The host reads nothing: the guest is stalled by credit, the device holds ≤ buf_alloc.
        assert stream.unsent > 6 * MiB
        assert conn.pending_bytes <= buf_alloc
        assert stream.peer_buf_alloc == buf_alloc
        t, got = host_reader(s, len(payload))
        g.wait_for(lambda: len(got) >= len(payload), 50, "slow reader catch-up")
        t.join(5)
        assert bytes(got) == payload


@pytest.mark.timeout(60)
@pytest.mark.parametrize("guest_buf_alloc", [16 * 1024, 64 * 1024])
def test_guest_with_a_smaller_buffer_streams_to_the_host(
    device: VsockDevice, guest_buf_alloc: int
) -> None:
    # The driver sends as Linux does: never more in flight than its own buffer either. The
    # device's credit updates must come within that window, or the stream stops for good.
    with booted(device, buf_alloc=guest_buf_alloc) as g:
        s, stream = open_pair(device, g)
        payload = os.urandom(2 * MiB)
        stream.send(payload)
        t, got = host_reader(s, len(payload))
        g.wait_for(lambda: len(got) >= len(payload) or not t.is_alive(), 20, "the whole stream")
        t.join(5)
        assert bytes(got) == payload
        conn = next(iter(device.muxer.conns.values()))
        assert conn.credit_window() == guest_buf_alloc


@pytest.mark.timeout(20)
def test_connection_cap(paths: tuple[str, str]) -> None:
    vpath, upath = paths
    with (
        VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=CID, max_connections=2) as dev,
        serving(dev),
        booted(dev) as g,
    ):
        open_pair(dev, g, 1)
        open_pair(dev, g, 2)
        with pytest.raises(EOFError):  # a third host client: closed without OK
            read_ok(host_connect(dev, 3))
        srv = track(socket.socket(socket.AF_UNIX))
        srv.bind(f"{upath}_4000")
        srv.listen()
        with pytest.raises(ConnectionRefusedError):  # a third guest connection: RST
            g.connect(4000, timeout=3)
        assert len(dev.muxer.conns) == 2


@pytest.mark.timeout(20)
def test_guest_overrunning_buf_alloc_is_reset(paths: tuple[str, str]) -> None:
    vpath, upath = paths
    with (
        VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=CID, buf_alloc=4096) as dev,
        serving(dev),
        booted(dev) as g,
    ):
        s, stream = open_pair(dev, g)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        for _ in range(64):  # ignore credit: raw RW packets
            g.send_packet(Op.RW, stream.local_port, stream.peer_port, b"x" * 4096)
        g.wait_for(lambda: stream.reset, 5, "RST")
        assert not dev.muxer.conns


# --------------------------------------------------------------------------- close paths
@pytest.mark.timeout(20)
def test_half_close_guest_shut_wr(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    stream.send(b"last words")
    stream.shutdown(SHUTDOWN_SEND)
    guest.pump(0.05)
    got = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    assert got == b"last words"  # EOF after the data: host sees the half-close
    s.sendall(b"still open the other way")
    assert recv_all_guest(guest, stream, 24) == b"still open the other way"


@pytest.mark.timeout(20)
def test_half_close_host_shut_wr(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    s.sendall(b"bye")
    s.shutdown(socket.SHUT_WR)
    guest.wait_for(lambda: stream.eof, 5, "SHUTDOWN")
    assert stream.peer_shutdown == SHUTDOWN_SEND
    assert stream.recv() == b"bye"
    stream.send(b"reply after half close")
    guest.pump(0.05)
    assert s.recv(100) == b"reply after half close"


@pytest.mark.timeout(20)
def test_guest_close_gets_rst_after_flush(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    stream.send(b"flushed before RST")
    stream.close()
    guest.wait_for(lambda: stream.reset, 5, "RST after close")
    got = b""
    while chunk := s.recv(100):
        got += chunk
    assert got == b"flushed before RST"
    assert not device.muxer.conns


@pytest.mark.timeout(20)
def test_guest_rst_closes_host_socket(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    guest.send_packet(Op.RST, stream.local_port, stream.peer_port)
    assert s.recv(10) == b""
    guest.pump(0.05)
    assert not device.muxer.conns
    assert not any(p.op == Op.RST for p in guest.packets)  # never answer RST with RST


@pytest.mark.timeout(20)
def test_host_close_sends_shutdown(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    s.close()
    guest.wait_for(lambda: stream.eof, 5, "SHUTDOWN")
    stream.close()
    guest.wait_for(lambda: not device.muxer.conns, 5, "connection gone")


# --------------------------------------------------------------------------- reset / scale
@pytest.mark.timeout(60)
def test_guest_reset_mid_transfer(device: VsockDevice, guest: GuestDriver) -> None:
    s, stream = open_pair(device, guest)
    stop = threading.Event()
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            while not stop.is_set():
                s.sendall(b"z" * 65536)
        except OSError as err:
            errors.append(err)

    t = threading.Thread(target=flood)
    t.start()
    recv_all_guest(guest, stream, 1 * MiB)
    guest.reset()  # ENABLE 0, GET_VRING_BASE x2, fresh start: every connection dropped
    t.join(10)
    stop.set()
    assert errors and isinstance(errors[0], (BrokenPipeError, ConnectionResetError))
    assert not device.muxer.conns
    s2, stream2 = open_pair(device, guest, 77)
    s2.sendall(b"after reset")
    assert recv_all_guest(guest, stream2, 11) == b"after reset"


@pytest.mark.timeout(120)
def test_200_concurrent_connections(device: VsockDevice, guest: GuestDriver) -> None:
    listener = guest.listen(2000)
    clients = [host_connect(device, 2000) for _ in range(200)]
    streams = [guest.accept(listener, 20) for _ in range(200)]
    for _ in range(5):
        guest.pump(0.02)
    by_port = {}
    for c in clients:
        port = int(read_ok(c).split()[1])
        by_port[port] = c
    assert sorted(by_port) == sorted(st.peer_port for st in streams)
    assert len(device.muxer.conns) == 200
    for st in streams:
        st.send(f"hello {st.peer_port}".encode())
    for port, c in by_port.items():
        c.sendall(f"to guest {port}".encode())
    guest.wait_for(
        lambda: all(len(st.rxbuf) >= len(f"to guest {st.peer_port}") for st in streams),
        30,
        "200 streams",
    )
    for st in streams:
        assert st.recv() == f"to guest {st.peer_port}".encode()
    guest.wait_for(lambda: not any(st.txq for st in streams), 30, "guest sends")
    guest.sync()  # the device has taken every tx packet once it answers
    for port, c in by_port.items():
        want = f"hello {port}".encode()
        got = b""
        while len(got) < len(want):
            got += c.recv(100)
        assert got == want
    for c in clients:
        c.close()
    guest.wait_for(lambda: all(st.eof for st in streams), 30, "all EOF")
    for st in streams:
        st.close()
    guest.wait_for(lambda: not device.muxer.conns, 30, "all closed")
