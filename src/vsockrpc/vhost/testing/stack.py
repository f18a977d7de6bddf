"""The test driver's guest vsock stack: streams with Linux-like credit behaviour, listeners,
and raw packet access for hostile-guest tests (virtio 1.2, 5.10.6)."""

from __future__ import annotations

import contextlib
import enum
import os
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.packet import HDR, HDR_SIZE, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, Op
from vsockrpc.vhost.testing.rings import USED_ELEM, DriverRings, RxLayout

__all__ = ["GuestListener", "GuestStream", "GuestVsock", "Packet"]

_U32 = 0xFFFFFFFF


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
        self,
        driver: GuestVsock,
        local_port: int,
        peer_port: int,
        buf_alloc: int,
        peer_cid: int = HOST_CID,
    ) -> None:
        self.driver = driver
        self.local_port = local_port
        self.peer_port = peer_port
        self.peer_cid = peer_cid  # the host, or a sibling guest
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
        """Bytes this stream may still send: like Linux, never more in flight than the peer's
        buffer nor than our own (``virtio_transport_tx_buf_size`` in Debian's 6.12 kernels)."""
        window = min(self.peer_buf_alloc, self.buf_alloc)
        return max(0, window - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))

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


class GuestVsock(DriverRings):
    """The guest's vsock transport over the rings: a small, single-threaded stack."""

    guest_cid: int
    buf_alloc: int
    packets: deque[Packet]  # packets no stream or listener took
    listeners: dict[int, GuestListener]
    streams: dict[tuple[int, int, int], GuestStream]  # (peer_cid, local_port, peer_port)
    _next_port: int
    _ctl: deque[bytes]  # control headers to send

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

    def listen(self, port: int) -> GuestListener:
        listener = GuestListener(port)
        self.listeners[port] = listener
        return listener

    def accept(self, listener: GuestListener, timeout: float = 5.0) -> GuestStream:
        self.wait_for(lambda: bool(listener.backlog), timeout, "accept")
        return listener.backlog.popleft()

    def connect(self, port: int, timeout: float = 5.0, *, cid: int = HOST_CID) -> GuestStream:
        """connect() to ``cid`` (the host by default) ``port``; ConnectionRefusedError on RST."""
        stream = self.connect_start(port, cid=cid)
        self.wait_for(lambda: stream.state is not StreamState.CONNECTING, timeout, "connect")
        if stream.state is not StreamState.ESTABLISHED:
            raise ConnectionRefusedError(f"CID {cid} port {port} refused (RST)")
        return stream

    def connect_start(self, port: int, *, cid: int = HOST_CID) -> GuestStream:
        """Send the REQUEST of a connect() and return at once (pump to complete it)."""
        self._next_port += 1
        stream = GuestStream(self, self._next_port, port, self.buf_alloc, cid)
        self.streams[(cid, stream.local_port, port)] = stream
        self._control(stream, Op.REQUEST)
        return stream

    def _control(self, stream: GuestStream, op: int, flags: int = 0) -> None:
        if op in (Op.CREDIT_UPDATE, Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN):
            stream.last_fwd_cnt_sent = stream.fwd_cnt
        self._ctl.append(
            HDR.pack(
                self.guest_cid,
                stream.peer_cid,
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
        src_cid, _dst_cid, src_port, dst_port, length, _ptype, op, flags, buf_alloc, fwd_cnt = hdr
        key = (src_cid, dst_port, src_port)
        stream = self.streams.get(key)
        if stream is None:
            listener = self.listeners.get(dst_port)
            if op == Op.REQUEST and listener is not None:
                stream = GuestStream(self, dst_port, src_port, self.buf_alloc, src_cid)
                stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
                stream.state = StreamState.ESTABLISHED
                self.streams[key] = stream
                self._control(stream, Op.RESPONSE)
                listener.backlog.append(stream)
                return
            if op == Op.REQUEST:  # nobody listens on that guest port: Linux answers RST
                self._ctl.append(
                    HDR.pack(self.guest_cid, src_cid, dst_port, src_port, 0, 1, Op.RST, 0, 0, 0)
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
            del self.streams[key]
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
                    stream.peer_cid,
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
