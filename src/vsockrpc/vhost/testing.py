"""A test driver that plays QEMU *and* the guest against a :class:`~vsockrpc.vhost.VsockDevice`,
over the device's real vhost-user socket, with no VM.

Like httpcore's ``MockBackend``, this is real API, shipped so tests and ``bench/`` share it:

* guest memory is a memfd (``os.memfd_create``) shared with the back-end through
  SET_MEM_TABLE, laid out in two regions the way QEMU 7.2 does (a low region and the rest);
* kick/call/err notifiers are real eventfds;
* the split rings (virtio 2.7) are laid out and driven by this driver, like a guest kernel;
* the handshake follows the order QEMU 7.2 really sends (``GUEST-BOOT.md``);
* a small guest vsock stack (:class:`GuestStream`) speaks the stream protocol with credit, so
  tests can transfer data both ways; :meth:`GuestDriver.send_packet` /
  :attr:`GuestDriver.packets` give raw packet access, and :attr:`GuestDriver.mem` the raw guest
  memory, for hostile-guest tests.

Typical use::

    with VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=3) as dev, \\
         serving(dev), GuestDriver(vpath, guest_cid=3) as guest:
        guest.boot()
        listener = guest.listen(1234)
        ...  # host: connect upath, send b"CONNECT 1234\\n"
        stream = guest.accept(listener, timeout=5)

The driver is single-threaded: call :meth:`GuestDriver.pump` (or a method that pumps, like
:meth:`GuestDriver.wait_for`) to move packets.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from vsockrpc.errors import DeviceError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.packet import HDR, HDR_SIZE, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, Op
from vsockrpc.vhost.protocol import Request

__all__ = [
    "GuestDriver",
    "GuestListener",
    "GuestStream",
    "Packet",
    "RxLayout",
    "serving",
]

U16 = struct.Struct("<H")
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
DESC_F_NEXT, DESC_F_WRITE = 1, 2
_U32 = 0xFFFFFFFF

#: QEMU's low region ends below the VGA hole; the rest starts at 0xc0000 (as observed).
LOW_END = 0xA0000
HIGH_START = 0xC0000
FAKE_UADDR = 0x7F00_0000_0000  # "QEMU virtual address" of the memfd's first byte


class RxLayout(enum.Enum):
    """How rx buffers are posted: Linux ≥ 6.3 / 6.1 Debian posts one buffer with header and
    payload together; older kernels post a [44][payload] pair."""

    SINGLE = "single"
    SPLIT = "split"


@dataclass(slots=True)
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes = b""


@contextlib.contextmanager
def serving(device: Any) -> Iterator[threading.Thread]:
    """Run ``device.serve_forever()`` in a thread for the duration of the block."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            device.serve_forever()
        except BaseException as err:  # surfaced when the block exits
            errors.append(err)

    thread = threading.Thread(target=run, name="vsock-device", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        device.stop()
        thread.join(10)
        if errors:
            raise errors[0]


class StreamState(enum.Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSED = "closed"


class GuestListener:
    def __init__(self, port: int) -> None:
        self.port = port
        self.backlog: deque[GuestStream] = deque()


class GuestStream:
    """One guest-side stream socket, with Linux-like credit behaviour."""

    def __init__(
        self, driver: GuestDriver, local_port: int, peer_port: int, buf_alloc: int
    ) -> None:
        self.driver = driver
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = StreamState.CONNECTING
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0  # bytes the app consumed
        self.rx_cnt = 0
        self.last_fwd_cnt_sent = 0
        self.rxbuf = bytearray()
        self.discard = False  # count received bytes without keeping them (benchmarks)
        self.received = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.txq: deque[memoryview] = deque()
        self.peer_shutdown = 0
        self.reset = False
        self.shut_sent = 0
        self.shut_pending = 0
        self.credit_requests_seen = 0

    @property
    def eof(self) -> bool:
        return bool(self.peer_shutdown & 2) or self.reset

    def peer_free(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32)

    def send(self, data: bytes | memoryview) -> None:
        """Queue data; :meth:`GuestDriver.pump` sends it as credit allows."""
        if data:
            self.txq.append(
                memoryview(bytes(data)) if isinstance(data, bytearray) else memoryview(data)
            )

    @property
    def unsent(self) -> int:
        return sum(len(m) for m in self.txq)

    def recv(self, max_bytes: int = 1 << 30) -> bytes:
        """Take buffered data (non-blocking) and give the host credit back like Linux does."""
        data = bytes(self.rxbuf[:max_bytes])
        del self.rxbuf[:max_bytes]
        self._consumed(len(data))
        return data

    def _consumed(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & _U32
        # Like Linux: tell the host about freed space once its view of our free space is low.
        host_view_free = self.buf_alloc - ((self.rx_cnt - self.last_fwd_cnt_sent) & _U32)
        if n and host_view_free < min(64 * 1024, self.buf_alloc // 2):
            self.driver._control(self, Op.CREDIT_UPDATE)

    def shutdown(self, flags: int) -> None:
        """SHUTDOWN ``flags``, sent after the data already queued (like Linux)."""
        self.shut_pending |= flags

    def close(self) -> None:
        """Linux close(): SHUTDOWN RCV|SEND; the host answers RST."""
        if self.state is not StreamState.CLOSED:
            self.shutdown(SHUTDOWN_BOTH)


class GuestDriver:
    """Plays the vhost-user front-end (QEMU) and a guest virtio-vsock driver."""

    def __init__(
        self,
        vhost_path: str,
        *,
        guest_cid: int = 3,
        mem_size: int = 64 << 20,
        queue_size: int = 128,
        rx_buf_size: int = 3776,
        rx_layout: RxLayout = RxLayout.SINGLE,
        buf_alloc: int = 256 * 1024,
        connect_timeout: float = 5.0,
    ) -> None:
        self.guest_cid = guest_cid
        self.num = queue_size
        self.rx_buf_size = rx_buf_size
        self.rx_layout = rx_layout
        self.buf_alloc = buf_alloc
        self.mem_size = mem_size
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self._mmap = mmap.mmap(self.memfd, mem_size)
        self.mem = memoryview(self._mmap)  # raw guest memory: gpa == offset here
        self._brk = HIGH_START
        try:
            self._layout()
        except DeviceError:  # memory too small: nothing else is open yet
            self.mem.release()
            self._mmap.close()
            os.close(self.memfd)
            raise
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(vhost_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock.settimeout(10)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.err = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.config_cid: int | None = None
        self.packets: deque[Packet] = deque()  # packets no stream or listener took
        self.listeners: dict[int, GuestListener] = {}
        self.streams: dict[tuple[int, int], GuestStream] = {}
        self._next_port = 50000
        self._ctl: deque[bytes] = deque()  # control headers to send

    # ------------------------------------------------------------------ memory layout
    def _alloc(self, size: int, align: int = 4096) -> int:
        addr = (self._brk + align - 1) // align * align
        self._brk = addr + size
        if self._brk > self.mem_size:
            raise DeviceError("test guest memory too small for this layout")
        return addr

    def _layout(self) -> None:
        num = self.num
        self._brk = HIGH_START
        self.desc = [self._alloc(16 * num) for _ in range(2)]
        self.avail = [self._alloc(6 + 2 * num) for _ in range(2)]
        self.used = [self._alloc(6 + 8 * num) for _ in range(2)]
        per_rx = 2 if self.rx_layout is RxLayout.SPLIT else 1
        self.rx_slots = num // per_rx
        self.rx_bufs = [self._alloc(self.rx_buf_size, 64) for _ in range(self.rx_slots)]
        self.tx_slots = num // 2  # [44][payload] pairs like Linux
        self.tx_bufs = [self._alloc(HDR_SIZE + MAX_PAYLOAD, 64) for _ in range(self.tx_slots)]
        self.tx_free: deque[int] = deque(range(self.tx_slots))
        self.avail_idx = [0, 0]
        self.last_used_idx = [0, 0]
        # avail.idx / used.idx as single native u16s: the device reads avail.idx while we write
        # it, so it is published with one 16-bit store; struct.pack_into zero-fills its target
        # first and the device once saw avail.idx == 0 (→ "more than num ahead", ring broken,
        # every connection reset). See vsockrpc.vhost.virtqueue for the device side.
        self._avail_idx_view = [self.mem[a + 2 : a + 4].cast("H") for a in self.avail]
        self._used_idx_view = [self.mem[u + 2 : u + 4].cast("H") for u in self.used]

    def _reset_rings(self) -> None:
        for q in range(2):
            self.mem[self.avail[q] : self.avail[q] + 6 + 2 * self.num] = bytes(6 + 2 * self.num)
            self.mem[self.used[q] : self.used[q] + 6 + 8 * self.num] = bytes(6 + 8 * self.num)
        self.tx_free = deque(range(self.tx_slots))
        self.avail_idx = [0, 0]
        self.last_used_idx = [0, 0]

    # ------------------------------------------------------------------ vhost-user front-end
    def _req(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        reply: bool = False,
        ack: bool = False,
    ) -> bytes:
        """Send a request; read its reply (``reply``) or REPLY_ACK (``ack``, like QEMU does for
        SET_MEM_TABLE), raising DeviceError on a non-zero ack."""
        vu.send_message(self.sock, request, payload, fds, need_reply=ack)
        if not reply and not ack:
            return b""
        data = _recv_exact(self.sock, vu.HEADER.size)
        req, flags, size = vu.HEADER.unpack(data)
        if req != request or flags != (vu.FLAG_VERSION | vu.FLAG_REPLY):
            raise DeviceError(f"bad reply to {request}: request {req} flags {flags:#x}")
        body = _recv_exact(self.sock, size)
        if ack and not reply and body != vu.U64.pack(0):
            raise DeviceError(f"request {request} failed (REPLY_ACK {body.hex()})")
        return body

    def sync(self) -> None:
        """Round-trip with the back-end (GET_FEATURES): everything sent before is processed."""
        self._req(Request.GET_FEATURES, reply=True)

    def _vring_fd(self, request: int, index: int, fd: int) -> None:
        self._req(request, vu.U64.pack(index), [fd])

    def handshake(self) -> None:
        """What QEMU 7.2 sends at start-up, before the guest driver loads."""
        features = vu.U64.unpack(self._req(Request.GET_FEATURES, reply=True))[0]
        if not features & vu.F_PROTOCOL_FEATURES:
            raise DeviceError("device lacks VHOST_USER_F_PROTOCOL_FEATURES")
        pf = vu.U64.unpack(self._req(Request.GET_PROTOCOL_FEATURES, reply=True))[0]
        self._req(Request.SET_PROTOCOL_FEATURES, vu.U64.pack(pf & vu.PROTOCOL_FEATURES))
        self.queue_num: int = vu.U64.unpack(self._req(Request.GET_QUEUE_NUM, reply=True))[0]
        self._req(Request.SET_OWNER)
        self.features = vu.U64.unpack(self._req(Request.GET_FEATURES, reply=True))[0]
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
            self._vring_fd(Request.SET_VRING_ERR, q, self.err[q])
        cfg = self._req(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 8, 0) + bytes(8), reply=True)
        self.config_cid = int.from_bytes(
            cfg[vu.CONFIG_HEAD.size : vu.CONFIG_HEAD.size + 8], "little"
        )

    def start(self, *, post_rx: bool = True) -> None:
        """What QEMU sends when the guest loads vmw_vsock_virtio_transport; posts rx buffers."""
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self._req(Request.SET_FEATURES, vu.U64.pack(self.features & vu.DEVICE_FEATURES))
        regions = [
            (0, LOW_END, FAKE_UADDR, 0),
            (HIGH_START, self.mem_size - HIGH_START, FAKE_UADDR + HIGH_START, HIGH_START),
        ]
        table = vu.MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            vu.MEM_REGION.pack(*r) for r in regions
        )
        self._req(Request.SET_MEM_TABLE, table, [self.memfd, self.memfd], ack=True)
        if post_rx:
            self.post_rx()
        for q in range(2):
            self._req(Request.SET_VRING_NUM, vu.VRING_STATE.pack(q, self.num))
            self._req(Request.SET_VRING_BASE, vu.VRING_STATE.pack(q, 0))
            self._req(
                Request.SET_VRING_ADDR,
                vu.VRING_ADDR.pack(
                    q,
                    0,
                    FAKE_UADDR + self.desc[q],
                    FAKE_UADDR + self.used[q],
                    FAKE_UADDR + self.avail[q],
                    0,
                ),
            )
            self._vring_fd(Request.SET_VRING_KICK, q, self.kick[q])
        for q in range(2):
            self._req(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 1))
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self.sync()

    def boot(self) -> None:
        """:meth:`handshake` then :meth:`start`."""
        self.handshake()
        self.start()

    def stop_rings(self) -> list[int]:
        """Guest reset / power-off: ENABLE 0 x2, GET_VRING_BASE x2 (replied), CALL x2."""
        for q in range(2):
            self._req(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 0))
        bases = []
        for q in range(2):
            reply = self._req(Request.GET_VRING_BASE, vu.VRING_STATE.pack(q, 0), reply=True)
            bases.append(vu.VRING_STATE.unpack(reply)[1])
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self.sync()
        return bases

    def reset(self) -> None:
        """A guest reboot: rings stopped, streams gone, a fresh start with clean rings."""
        self.stop_rings()
        self.streams.clear()
        self.listeners.clear()
        self.packets.clear()
        self._ctl.clear()
        self._reset_rings()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in (*self.kick, *self.call, *self.err):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick = self.call = self.err = []
        for view in (*self._avail_idx_view, *self._used_idx_view):
            view.release()
        self.mem.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        with contextlib.suppress(OSError):
            os.close(self.memfd)

    def __enter__(self) -> GuestDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ rings (driver side)
    def _avail_push(self, q: int, head: int) -> None:
        base = self.avail[q]
        U16.pack_into(self.mem, base + 4 + 2 * (self.avail_idx[q] % self.num), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self._avail_idx_view[q][0] = self.avail_idx[q]  # 2.7.13.3: idx after the entry, 1 store

    def post_rx(self, slots: list[int] | None = None) -> None:
        """Post rx buffers (all by default) without kicking."""
        d = self.desc[0]
        for slot in range(self.rx_slots) if slots is None else slots:
            addr = self.rx_bufs[slot]
            if self.rx_layout is RxLayout.SINGLE:
                DESC.pack_into(self.mem, d + 16 * slot, addr, self.rx_buf_size, DESC_F_WRITE, 0)
                self._avail_push(0, slot)
            else:
                i = 2 * slot
                DESC.pack_into(
                    self.mem, d + 16 * i, addr, HDR_SIZE, DESC_F_WRITE | DESC_F_NEXT, i + 1
                )
                DESC.pack_into(
                    self.mem,
                    d + 16 * (i + 1),
                    addr + HDR_SIZE,
                    self.rx_buf_size - HDR_SIZE,
                    DESC_F_WRITE,
                    0,
                )
                self._avail_push(0, i)

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def err_signalled(self, q: int) -> bool:
        try:
            return os.eventfd_read(self.err[q]) > 0
        except BlockingIOError:
            return False

    def _tx_packet(
        self, hdr: bytes, payload: memoryview | bytes = b"", split_header: int | None = None
    ) -> bool:
        if not self.tx_free:
            return False
        slot = self.tx_free.popleft()
        addr = self.tx_bufs[slot]
        self.mem[addr : addr + HDR_SIZE] = hdr
        i = 2 * slot
        d = self.desc[1]
        if split_header is not None:  # [hdr[:k]] [hdr[k:] + payload]: an unusual but legal layout
            end = addr + HDR_SIZE + len(payload)
            self.mem[addr + HDR_SIZE : end] = payload
            DESC.pack_into(self.mem, d + 16 * i, addr, split_header, DESC_F_NEXT, i + 1)
            DESC.pack_into(
                self.mem, d + 16 * (i + 1), addr + split_header, end - addr - split_header, 0, 0
            )
        elif payload:
            self.mem[addr + HDR_SIZE : addr + HDR_SIZE + len(payload)] = payload
            DESC.pack_into(self.mem, d + 16 * i, addr, HDR_SIZE, DESC_F_NEXT, i + 1)
            DESC.pack_into(self.mem, d + 16 * (i + 1), addr + HDR_SIZE, len(payload), 0, 0)
        else:
            DESC.pack_into(self.mem, d + 16 * i, addr, HDR_SIZE, 0, 0)
        self._avail_push(1, i)
        return True

    def send_packet(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int | None = None,
        fwd_cnt: int = 0,
        ptype: int = 1,
        src_cid: int | None = None,
        dst_cid: int = HOST_CID,
        length: int | None = None,
        kick: bool = True,
        split_header: int | None = None,
    ) -> None:
        """Put one raw packet on the tx ring (any field may be forged)."""
        hdr = HDR.pack(
            self.guest_cid if src_cid is None else src_cid,
            dst_cid,
            src_port,
            dst_port,
            len(payload) if length is None else length,
            ptype,
            op,
            flags,
            self.buf_alloc if buf_alloc is None else buf_alloc,
            fwd_cnt & _U32,
        )
        while not self._tx_packet(hdr, payload, split_header):
            self.pump(0.05)
        if kick:
            self.kick_queue(1)

    # ------------------------------------------------------------------ guest vsock stack
    def listen(self, port: int) -> GuestListener:
        listener = GuestListener(port)
        self.listeners[port] = listener
        return listener

    def accept(self, listener: GuestListener, timeout: float = 5.0) -> GuestStream:
        self.wait_for(lambda: bool(listener.backlog), timeout, "accept")
        return listener.backlog.popleft()

    def connect(self, port: int, timeout: float = 5.0) -> GuestStream:
        """connect() to CID 2 ``port``; raises ConnectionRefusedError on RST."""
        self._next_port += 1
        stream = GuestStream(self, self._next_port, port, self.buf_alloc)
        self.streams[(stream.local_port, port)] = stream
        self._control(stream, Op.REQUEST)
        self.wait_for(lambda: stream.state is not StreamState.CONNECTING, timeout, "connect")
        if stream.state is not StreamState.ESTABLISHED:
            raise ConnectionRefusedError(f"host port {port} refused (RST)")
        return stream

    def _control(self, stream: GuestStream, op: int, flags: int = 0) -> None:
        if op in (Op.CREDIT_UPDATE, Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN):
            stream.last_fwd_cnt_sent = stream.fwd_cnt
        self._ctl.append(
            HDR.pack(
                self.guest_cid,
                HOST_CID,
                stream.local_port,
                stream.peer_port,
                0,
                1,
                op,
                flags,
                stream.buf_alloc,
                stream.fwd_cnt,
            )
        )

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"guest driver: timed out waiting for {what or predicate}")
            self.pump(min(remaining, 0.05))

    def pump(self, timeout: float = 0.0) -> int:
        """One driver pass: reclaim tx, read rx, send what credit allows. Waits up to ``timeout``
        for a call notification when there is nothing to do. Returns packets received."""
        got = self._reap_rx()
        self._reap_tx()
        sent = self._send_pending()
        if not got and not sent and timeout > 0:
            poller = select.poll()
            for fd in self.call:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(timeout * 1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
            got = self._reap_rx()
            self._reap_tx()
            self._send_pending()
        return got

    def _used_idx(self, q: int) -> int:
        """Read used.idx once; like a guest driver, refuse a device that publishes entries it
        was never given (Linux marks such a ring broken: "id is not a head")."""
        idx: int = self._used_idx_view[q][0]
        ahead = (idx - self.last_used_idx[q]) & 0xFFFF
        if ahead > self.num:
            raise DeviceError(
                f"vring {q}: device published used.idx {idx}, {ahead} entries past "
                f"{self.last_used_idx[q]} (queue size {self.num})"
            )
        return idx

    def _reap_tx(self) -> None:
        used = self.used[1]
        idx = self._used_idx(1)
        while self.last_used_idx[1] != idx:
            head, _ = USED_ELEM.unpack_from(
                self.mem, used + 4 + 8 * (self.last_used_idx[1] % self.num)
            )
            self.last_used_idx[1] = (self.last_used_idx[1] + 1) & 0xFFFF
            self.tx_free.append(head // 2)

    def _reap_rx(self) -> int:
        used = self.used[0]
        mem = self.mem
        idx = self._used_idx(0)
        count = 0
        reposted: list[int] = []
        while self.last_used_idx[0] != idx:
            head, length = USED_ELEM.unpack_from(
                mem, used + 4 + 8 * (self.last_used_idx[0] % self.num)
            )
            self.last_used_idx[0] = (self.last_used_idx[0] + 1) & 0xFFFF
            if head >= self.num:
                raise DeviceError(f"vring 0: device returned descriptor {head} >= {self.num}")
            slot = head if self.rx_layout is RxLayout.SINGLE else head // 2
            if length >= HDR_SIZE:
                addr = self.rx_bufs[slot]
                self._on_packet(HDR.unpack_from(mem, addr), mem[addr + HDR_SIZE : addr + length])
            reposted.append(slot)
            count += 1
        if reposted:
            self.post_rx(reposted)
            self.kick_queue(0)
        return count

    def _on_packet(self, hdr: tuple[int, ...], body: memoryview) -> None:
        _src_cid, _dst_cid, src_port, dst_port, length, _ptype, op, flags, buf_alloc, fwd_cnt = hdr
        stream = self.streams.get((dst_port, src_port))
        if stream is None:
            listener = self.listeners.get(dst_port)
            if op == Op.REQUEST and listener is not None:
                stream = GuestStream(self, dst_port, src_port, self.buf_alloc)
                stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
                stream.state = StreamState.ESTABLISHED
                self.streams[(dst_port, src_port)] = stream
                self._control(stream, Op.RESPONSE)
                listener.backlog.append(stream)
                return
            if op == Op.REQUEST:  # nobody listens on that guest port: Linux answers RST
                self._ctl.append(
                    HDR.pack(self.guest_cid, HOST_CID, dst_port, src_port, 0, 1, Op.RST, 0, 0, 0)
                )
            self.packets.append(_packet(hdr, bytes(body[:length])))
            return
        stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == Op.RW:
            data = body[:length]
            stream.rx_cnt = (stream.rx_cnt + length) & _U32
            stream.received += length
            if (stream.rx_cnt - stream.fwd_cnt) & _U32 > stream.buf_alloc:
                raise DeviceError(f"device overran guest buf_alloc on {stream.local_port}")
            if stream.discard:
                stream._consumed(length)
            else:
                stream.rxbuf += data
        elif op == Op.RESPONSE:
            stream.state = StreamState.ESTABLISHED
        elif op == Op.RST:
            stream.reset = True
            stream.state = StreamState.CLOSED
            del self.streams[(dst_port, src_port)]
        elif op == Op.SHUTDOWN:
            stream.peer_shutdown |= flags
        elif op == Op.CREDIT_REQUEST:
            stream.credit_requests_seen += 1
            self._control(stream, Op.CREDIT_UPDATE)
        if op not in (Op.RW, Op.CREDIT_UPDATE):
            self.packets.append(_packet(hdr))

    def _send_pending(self) -> bool:
        sent = False
        while self._ctl and self.tx_free:
            self._tx_packet(self._ctl.popleft())
            sent = True
        for stream in list(self.streams.values()):
            while stream.txq and self.tx_free and stream.state is StreamState.ESTABLISHED:
                credit = stream.peer_free()
                if credit <= 0:
                    break
                chunk = stream.txq[0]
                n = min(len(chunk), credit, MAX_PAYLOAD)
                stream.last_fwd_cnt_sent = stream.fwd_cnt
                hdr = HDR.pack(
                    self.guest_cid,
                    HOST_CID,
                    stream.local_port,
                    stream.peer_port,
                    n,
                    1,
                    Op.RW,
                    0,
                    stream.buf_alloc,
                    stream.fwd_cnt,
                )
                self._tx_packet(hdr, chunk[:n])
                stream.tx_cnt = (stream.tx_cnt + n) & _U32
                if n == len(chunk):
                    stream.txq.popleft()
                else:
                    stream.txq[0] = chunk[n:]
                sent = True
            if stream.shut_pending and not stream.txq:
                stream.shut_sent |= stream.shut_pending
                self._control(stream, Op.SHUTDOWN, stream.shut_pending)
                stream.shut_pending = 0
                while self._ctl and self.tx_free:
                    self._tx_packet(self._ctl.popleft())
                sent = True
        if sent:
            self.kick_queue(1)
        return sent


def _packet(hdr: tuple[int, ...], payload: bytes = b"") -> Packet:
    return Packet(
        hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7], hdr[8], hdr[9], payload
    )


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise DeviceError("vhost-user back-end closed the connection")
        buf += chunk
    return bytes(buf)
