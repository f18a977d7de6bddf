"""The vsock side of the device: guest packets ↔ host Unix sockets ("hybrid vsock", as in
Firecracker ``docs/vsock.md`` and rust-vmm vhost-device-vsock).

* Host-initiated: a client connects to ``uds_path`` and writes ``CONNECT <port>\\n``; we send the
  guest a REQUEST from ``2:<local_port>``; on RESPONSE we write ``OK <local_port>\\n`` and then
  forward bytes; on RST or after 2 s we close the client without a message.
* Guest-initiated to CID 2 port P: we connect to ``<uds_path>_P``; RESPONSE on success, RST at
  once when nothing listens there.

The data path, per loop pass (:meth:`Muxer.run_pass`): consume the tx ring (guest packets,
payload written straight from guest memory to the host socket), then fill the rx ring (control
packets first, then data read with ``recv_into`` straight into guest buffers), then publish each
used ring and signal its call fd once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import socket
import time
from collections import deque

from vsockrpc.vhost import packet
from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.packet import HDR, HDR_SIZE, HOST_CID, Op
from vsockrpc.vhost.reactor import ERR, ET, IN, OUT, Reactor
from vsockrpc.vhost.virtqueue import Chain, RingError, Virtqueue

__all__ = ["Muxer"]

log = logging.getLogger(__name__)

#: Firecracker allocates host-side ports for CONNECT round-robin in [2**30, 2**31).
LOCAL_PORT_FIRST = 1 << 30
LOCAL_PORT_END = 1 << 31
CONNECT_TIMEOUT = 2.0  # seconds to wait for the guest's RESPONSE / to flush before RST
CREDIT_REQUEST_DELAY = 0.02  # seconds without credit before we send CREDIT_REQUEST
READ_BATCH = 16  # rx buffers filled by one recvmsg_into ...
READ_BATCH_BYTES = 64 * 1024  # ... up to this much payload (big buffers need no batching)
RX_SIGNAL_BATCH = 32  # data packets per rx signal within one pass
TX_SIGNAL_DELAY = 0.002  # seconds a tx completion signal may wait for company
MAX_COMMAND = 64  # "CONNECT 4294967295\n" is 19 bytes
MAX_STATELESS_RST = 1024  # RSTs for packets that match no connection, waiting for rx buffers
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

_U32 = 0xFFFFFFFF


class Muxer:
    def __init__(
        self,
        reactor: Reactor,
        uds_path: str,
        guest_cid: int,
        *,
        buf_alloc: int,
        max_connections: int,
    ) -> None:
        self.reactor = reactor
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        # Send CREDIT_UPDATE once the guest's view of our fwd_cnt is this stale: the guest never
        # asks (observed with Linux 6.1), so we must offer (see VHOST-USER-VSOCK.md).
        # Half of buf_alloc keeps the guest streaming with one update per ~2 packets of 64 KiB.
        self.credit_threshold = max(1, buf_alloc // 2)
        self.max_connections = max_connections
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self.conns: dict[tuple[int, int], Connection] = {}
        self._readable: dict[Connection, None] = {}  # ordered set: host sockets with data
        self._ctl_conns: dict[Connection, None] = {}  # connections with control packets due
        self._stateless: deque[bytes] = deque()  # RST headers for unknown connections
        self._writable: dict[Connection, None] = {}  # pending_out to flush
        self._held_rx: deque[Chain] = deque()  # popped rx chains we could not fill yet
        self._next_port = itertools.count()
        self._clients: dict[int, tuple[socket.socket, float]] = {}  # awaiting CONNECT line
        self._deadlines: dict[Connection, None] = {}
        self._credit_waiters: dict[Connection, None] = {}  # stalled for credit (credit_stall)
        self.tx_kicked = False
        self.rx_kicked = False
        self.stats_packets_rx = 0  # packets written to the guest
        self.stats_packets_tx = 0  # packets read from the guest
        self.stats_passes = 0  # data-path passes
        self.stats_rx_signals = 0  # rx call-eventfd writes (interrupts the guest will take)
        self.stats_credit_requests = 0

    # ================================================================ attach / detach
    @property
    def running(self) -> bool:
        return self.rx is not None and self.tx is not None and self.rx.ready and self.tx.ready

    def attach(self, rx: Virtqueue, tx: Virtqueue) -> None:
        self.rx, self.tx = rx, tx
        self.tx_kicked = self.rx_kicked = True  # scan both once: buffers may predate any kick

    def reset(self) -> None:
        """Guest reset / ring stop / disconnect: drop every connection (clients see EOF)."""
        for conn in list(self.conns.values()):
            self._drop(conn)
        self._stateless.clear()
        self._held_rx.clear()
        self._readable.clear()
        self._ctl_conns.clear()
        self._writable.clear()
        self._deadlines.clear()
        self._credit_waiters.clear()

    def close(self) -> None:
        self.reset()
        for fd, (sock, _) in list(self._clients.items()):
            self.reactor.unregister(fd)
            sock.close()
        self._clients.clear()

    # ================================================================ hybrid listener
    def on_listener(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep serving the rest
                log.warning("hybrid accept failed: %s", err)
                return
            client.setblocking(False)
            fd = client.fileno()
            self._clients[fd] = (client, time.monotonic() + CONNECT_TIMEOUT)
            self.reactor.register(fd, IN, functools.partial(self._on_client_event, fd))

    def _on_client_event(self, fd: int, mask: int) -> None:
        self._on_client(fd)

    def _on_client(self, fd: int) -> None:
        """Read ``CONNECT <port>\\n`` without consuming anything after the newline."""
        sock, _ = self._clients[fd]
        try:
            peek = sock.recv(MAX_COMMAND, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        nl = peek.find(b"\n")
        if nl < 0:
            if not peek or len(peek) >= MAX_COMMAND:
                self._reject_client(fd)
            return
        line = sock.recv(nl + 1)  # exactly the command line; payload stays queued
        port = _parse_connect(line)
        self._clients.pop(fd)
        self.reactor.unregister(fd)
        if port is None or not self.running or len(self.conns) >= self.max_connections:
            sock.close()  # EOF before OK: the client retries (guest not ready) or gives up
            return
        local_port = self._alloc_port(port)
        conn = Connection(sock, local_port, port, ConnState.LOCAL_INIT, self.buf_alloc)
        self._add(conn)
        conn.deadline = time.monotonic() + CONNECT_TIMEOUT
        self._deadlines[conn] = None
        conn.add_ctl(Op.REQUEST)
        self._ctl_conns[conn] = None

    def _reject_client(self, fd: int) -> None:
        sock, _ = self._clients.pop(fd)
        self.reactor.unregister(fd)
        sock.close()

    def _alloc_port(self, peer_port: int) -> int:
        span = LOCAL_PORT_END - LOCAL_PORT_FIRST
        while True:
            port = LOCAL_PORT_FIRST + next(self._next_port) % span
            if (port, peer_port) not in self.conns:
                return port

    # ================================================================ connection table
    def _add(self, conn: Connection) -> None:
        self.conns[conn.key] = conn
        self.reactor.register(conn.fd, IN | OUT | ERR | ET, lambda mask: self._on_host(conn, mask))

    def _drop(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self.reactor.unregister(conn.fd)
        conn.close_socket()
        self._readable.pop(conn, None)
        self._ctl_conns.pop(conn, None)
        self._writable.pop(conn, None)
        self._deadlines.pop(conn, None)
        self._credit_waiters.pop(conn, None)

    def _reset_conn(self, conn: Connection) -> None:
        """Tell the guest RST and forget the connection."""
        self._stateless_rst(conn.local_port, conn.peer_port)
        self._drop(conn)

    def _stateless_rst(self, local_port: int, peer_port: int) -> None:
        if len(self._stateless) < MAX_STATELESS_RST:
            self._stateless.append(
                packet.pack(HOST_CID, self.guest_cid, local_port, peer_port, 0, Op.RST, 0, 0, 0)
            )

    def _on_host(self, conn: Connection, mask: int) -> None:
        if conn.state is ConnState.CLOSED:
            return
        if mask & ERR:
            conn.host_hup = True
        if mask & (IN | ERR):
            conn.host_readable = True
            if conn.wants_host_read():
                self._readable[conn] = None
        if mask & (OUT | ERR) and conn.pending_out:
            self._writable[conn] = None

    # ================================================================ timers
    def has_timers(self) -> bool:
        return bool(self._deadlines or self._clients or self._credit_waiters)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self._deadlines if c.deadline is not None]
        times += [t for _, t in self._clients.values()]
        times += [c.credit_stall for c in self._credit_waiters if c.credit_stall is not None]
        return min(times) if times else None

    def expire(self, now: float) -> None:
        for conn in [c for c in self._credit_waiters if (c.credit_stall or 0.0) <= now]:
            del self._credit_waiters[conn]
            conn.credit_stall = None
            if conn.peer_free() <= 0 and conn.state is ConnState.ESTABLISHED:
                conn.credit_requested = True
                conn.add_ctl(Op.CREDIT_REQUEST)
                self._ctl_conns[conn] = None
                self.stats_credit_requests += 1
        for conn in [c for c in self._deadlines if c.deadline is not None and c.deadline <= now]:
            log.debug("connection %s timed out in %s", conn.key, conn.state.value)
            self._reset_conn(conn)
        for fd in [fd for fd, (_, t) in self._clients.items() if t <= now]:
            self._reject_client(fd)

    # ================================================================ the pass
    def has_work(self) -> bool:
        """True if another pass could make progress without waiting for an fd."""
        if not self.running:
            return False
        if self._writable:
            return True
        if self._stateless or self._ctl_conns or self._readable:
            assert self.rx is not None
            return bool(self._held_rx) or self.rx.has_avail()
        return False

    def run_pass(self) -> None:
        rx, tx = self.rx, self.tx
        if rx is None or tx is None or not (rx.ready and tx.ready):
            return
        for ring, phase in ((tx, self._tx_phase), (rx, self._rx_phase)):
            try:
                phase()
            except RingError as err:
                # vhost-user.rst: the back-end signals the vring's err fd on an error; the ring
                # stays stopped until the front-end reconfigures it (guest reset).
                log.warning("guest corrupted a virtqueue: %s", err)
                ring.break_ring()
                self.reset()
                break
        # tx completions are not urgent for the guest (they only free its buffers): signal when
        # a quarter of the ring is waiting, or TX_SIGNAL_DELAY after the first (device loop).
        # That spares a TCG guest one interrupt per round trip; rx is signalled at once.
        tx.flush(defer_below=max(1, tx.num // 4))
        if rx.flush():
            self.stats_rx_signals += 1
        self.stats_passes += 1

    def tx_signal_due(self, now: float) -> float | None:
        """Seconds until the deferred tx signal is due (0: now), or None if none is pending."""
        tx = self.tx
        if tx is None or not tx.signal_pending:
            return None
        return max(0.0, tx.unsignaled_since + TX_SIGNAL_DELAY - now)

    def _tx_phase(self) -> None:
        assert self.tx is not None
        if self.tx_kicked:
            self.tx_kicked = False
            self._drain_tx(self.tx)
        if self._writable:
            for conn in list(self._writable):
                self._flush_out(conn)

    def _rx_phase(self) -> None:
        assert self.rx is not None
        if self._stateless or self._ctl_conns or self._readable:
            self._fill_rx(self.rx)

    # ---------------------------------------------------------------- guest → host (tx)
    def _drain_tx(self, tx: Virtqueue) -> None:
        while True:
            chain = tx.pop()
            if chain is None:
                return
            head, segments = chain
            self.stats_packets_tx += 1
            try:
                self._on_guest_packet(segments)
            finally:
                tx.push(head, 0)  # tx buffers are only read (2.7.8: used len = bytes written)

    def _on_guest_packet(self, segments: list[memoryview]) -> None:
        first = segments[0]
        if len(first) >= HDR_SIZE:
            hdr = HDR.unpack_from(first)
            body_segments = [first[HDR_SIZE:], *segments[1:]]
        else:
            # Odd layout: the header spans descriptors. Copy just its 44 bytes out, once (the
            # guest may change guest memory under us; never re-read it).
            raw = b"".join(bytes(s) for s in _truncate(segments, HDR_SIZE))
            if len(raw) < HDR_SIZE:
                log.debug("dropping a %d-byte tx packet", len(raw))
                return
            hdr = HDR.unpack(raw)
            body_segments = _skip(segments, HDR_SIZE)
        src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = hdr
        # 5.10.6.1: the device drops packets not addressed host-wards from the guest's own CID.
        if dst_cid != HOST_CID or src_cid != self.guest_cid:
            return
        total = sum(len(s) for s in body_segments)
        if length > total or length > packet.MAX_PAYLOAD:
            if op != Op.RST:
                self._stateless_rst(dst_port, src_port)
            conn = self.conns.get((dst_port, src_port))
            if conn is not None:
                self._drop(conn)
            return
        conn = self.conns.get((dst_port, src_port))
        if ptype != packet.TYPE_STREAM:
            if op != Op.RST:
                self._stateless_rst(dst_port, src_port)
            return
        if conn is None:
            if op == Op.REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:  # never answer RST with RST
                self._stateless_rst(dst_port, src_port)
            return
        conn.update_peer_credit(buf_alloc, fwd_cnt)
        if conn.peer_free() > 0 and (conn.credit_requested or conn.credit_stall is not None):
            conn.credit_requested = False
            conn.credit_stall = None
            self._credit_waiters.pop(conn, None)
        if conn.wants_host_read() and conn.peer_free() > 0:
            self._readable[conn] = None
        if op == Op.RW:
            if conn.state is not ConnState.ESTABLISHED or conn.peer_shut_send:
                self._reset_conn(conn)
                return
            self._guest_data(conn, body_segments, length)
        elif op == Op.RESPONSE:
            if conn.state is not ConnState.LOCAL_INIT:
                self._reset_conn(conn)
                return
            conn.state = ConnState.ESTABLISHED
            conn.deadline = None
            self._deadlines.pop(conn, None)
            reply = f"OK {conn.local_port}\n".encode()
            conn.pending_out.append(reply)
            conn.pending_bytes += len(reply)
            conn.rx_cnt = conn.fwd_cnt = 0  # the OK line is not guest payload
            self._flush_out(conn, count=False)
            if conn.host_readable:
                self._readable[conn] = None
        elif op == Op.RST:
            self._drop(conn)
        elif op == Op.SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == Op.CREDIT_REQUEST:
            conn.add_ctl(Op.CREDIT_UPDATE)
            self._ctl_conns[conn] = None
        elif op == Op.CREDIT_UPDATE:
            pass  # credit already taken from the header
        elif op == Op.REQUEST:
            self._reset_conn(conn)  # a second REQUEST on a live connection
        else:
            self._reset_conn(conn)

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        path = f"{self.uds_path}_{local_port}"
        if len(self.conns) >= self.max_connections or len(path.encode()) > SUN_PATH_MAX:
            self._stateless_rst(local_port, peer_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as err:
            # ENOENT/ECONNREFUSED: nobody listens. EAGAIN: backlog full. All → RST now, so the
            # guest's connect() fails at once instead of hanging (unlike vhost-device-vsock).
            log.debug("guest connect to %s failed: %s", path, errno.errorcode.get(err.errno or 0))
            sock.close()
            self._stateless_rst(local_port, peer_port)
            return
        conn = Connection(sock, local_port, peer_port, ConnState.ESTABLISHED, self.buf_alloc)
        conn.update_peer_credit(buf_alloc, fwd_cnt)
        self._add(conn)
        conn.add_ctl(Op.RESPONSE)
        self._ctl_conns[conn] = None

    def _guest_data(self, conn: Connection, segments: list[memoryview], length: int) -> None:
        if length == 0:
            return
        # 5.10.6.3: the guest must not exceed our buf_alloc; one that does is reset.
        if conn.in_flight() + length > conn.buf_alloc:
            log.debug("guest overran buf_alloc on %s", conn.key)
            self._reset_conn(conn)
            return
        conn.rx_cnt = (conn.rx_cnt + length) & _U32
        remaining = length
        for whole in segments:
            if remaining <= 0:
                break
            seg = whole[:remaining] if len(whole) > remaining else whole
            remaining -= len(seg)
            if not len(seg):
                continue
            if conn.pending_out or conn.write_shut:
                conn.pending_out.append(bytes(seg))
                conn.pending_bytes += len(seg)
                continue
            try:
                sent = conn.sock.send(seg)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset_conn(conn)  # host side gone: the guest learns by RST
                return
            conn.fwd_cnt = (conn.fwd_cnt + sent) & _U32
            if sent < len(seg):
                rest = bytes(seg[sent:])  # copy before the buffer goes back to the guest
                conn.pending_out.append(rest)
                conn.pending_bytes += len(rest)
        self._after_forward(conn)

    def _flush_out(self, conn: Connection, *, count: bool = True) -> None:
        """Write what we hold for the host socket; credit the guest for what went out."""
        self._writable.pop(conn, None)
        if conn.state is ConnState.CLOSED:
            return
        out = conn.pending_out
        while out:
            chunk = out[0]
            try:
                sent = conn.sock.send(chunk)
            except BlockingIOError:
                break
            except OSError:
                self._reset_conn(conn)
                return
            conn.pending_bytes -= sent
            if count:
                conn.fwd_cnt = (conn.fwd_cnt + sent) & _U32
            if sent < len(chunk):
                out[0] = chunk[sent:]
                break
            out.popleft()
        self._after_forward(conn)

    def _after_forward(self, conn: Connection) -> None:
        if conn.pending_out:
            return
        if conn.state is ConnState.CLOSING:
            # The guest closed both ways and everything it sent is written: RST completes it.
            self._reset_conn(conn)
            return
        if conn.peer_shut_send and not conn.write_shut:
            conn.write_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            if conn.host_eof:  # both directions finished
                self._reset_conn(conn)
                return
        if conn.credit_update_due(self.credit_threshold) and not conn.peer_shut_send:
            conn.add_ctl(Op.CREDIT_UPDATE)
            self._ctl_conns[conn] = None

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & packet.SHUTDOWN_RCV:
            conn.peer_shut_rcv = True
            self._readable.pop(conn, None)
        if flags & packet.SHUTDOWN_SEND:
            conn.peer_shut_send = True
        if conn.peer_shut_rcv and conn.peer_shut_send:
            # Linux close(): SHUTDOWN RCV|SEND, expects RST once we are done.
            conn.state = ConnState.CLOSING
            conn.deadline = time.monotonic() + CONNECT_TIMEOUT
            self._deadlines[conn] = None
        self._after_forward(conn)

    # ---------------------------------------------------------------- host → guest (rx)
    def release_held_rx(self) -> None:
        """Give back a popped-but-unfilled rx buffer (empty) before the memory table changes."""
        if self._held_rx and self.rx is not None:
            for head, _ in self._held_rx:
                self.rx.push(head, 0)
            self.rx.flush()
        self._held_rx.clear()

    def _pop_rx(self, rx: Virtqueue) -> Chain | None:
        if self._held_rx:
            return self._held_rx.popleft()
        return rx.pop()

    def _fill_rx(self, rx: Virtqueue) -> None:
        # Control packets first, every pass: a credit update stuck behind a blocked host socket
        # deadlocks the guest (seen at ~64 MiB in the prototype).
        while self._stateless:
            chain = self._pop_rx(rx)
            if chain is None:
                return
            self._write_header(rx, chain, self._stateless.popleft())
        for conn in list(self._ctl_conns):
            while conn.ctl:
                chain = self._pop_rx(rx)
                if chain is None:
                    return
                op, flags = conn.ctl.pop(0)
                if op in (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.RESPONSE, Op.REQUEST):
                    conn.last_fwd_cnt_sent = conn.fwd_cnt
                self._write_header(
                    rx,
                    chain,
                    packet.pack(
                        HOST_CID,
                        self.guest_cid,
                        conn.local_port,
                        conn.peer_port,
                        0,
                        op,
                        flags,
                        conn.buf_alloc,
                        conn.fwd_cnt,
                    ),
                )
            del self._ctl_conns[conn]
        # Data: one packet per readable connection per round (fair), while buffers last.
        readable = self._readable
        while readable:
            for conn in list(readable):
                if not conn.wants_host_read():
                    del readable[conn]
                    continue
                credit = conn.peer_free()
                if credit <= 0:
                    # 5.10.6.3: out of credit: stop reading the host socket until the guest
                    # gives credit. Linux sends CREDIT_UPDATE by itself once its reader has
                    # drained buf_alloc - 64 KiB; asking at once (CREDIT_REQUEST) would make it
                    # answer with whatever little was read so far, a round trip per few KiB.
                    # So ask only if the stall lasts CREDIT_REQUEST_DELAY (other guests).
                    del readable[conn]
                    if conn.credit_stall is None and not conn.credit_requested:
                        conn.credit_stall = time.monotonic() + CREDIT_REQUEST_DELAY
                        self._credit_waiters[conn] = None
                    continue
                chain = self._pop_rx(rx)
                if chain is None:
                    return  # no buffers: wait for an rx kick
                segments = chain[1]
                if len(segments) == 1 and len(segments[0]) > HDR_SIZE:
                    self._read_host_batch(rx, conn, chain, credit)
                else:
                    self._read_host(rx, conn, chain, credit)

    def _read_host_batch(self, rx: Virtqueue, conn: Connection, chain: Chain, credit: int) -> None:
        """Fill up to READ_BATCH single-descriptor rx buffers with one ``recvmsg_into``.

        Linux posts ~3.7 KiB rx buffers; one syscall per buffer made the back-end's CPU, not the
        guest, the limit on a busy host. The payload areas of several buffers are scattered into
        by one read; each filled buffer becomes one RW packet (5.10.6: len = payload bytes)."""
        chains = [chain]
        bufs: list[memoryview] = []
        budget = credit
        while True:
            first = chain[1][0]
            cap = len(first) - HDR_SIZE
            cap = min(cap, budget)
            cap = min(cap, packet.MAX_PAYLOAD)
            bufs.append(first[HDR_SIZE : HDR_SIZE + cap])
            budget -= cap
            if budget <= 0 or len(chains) >= READ_BATCH or credit - budget >= READ_BATCH_BYTES:
                break
            nxt = self._pop_rx(rx)
            if nxt is None:
                break
            if len(nxt[1]) != 1 or len(nxt[1][0]) <= HDR_SIZE:
                self._held_rx.appendleft(nxt)  # odd layout: the general path takes it next
                break
            chains.append(nxt)
            chain = nxt
        if len(chains) == 1:
            self._read_host(rx, conn, chains[0], credit)
            return
        capacity = credit - budget
        try:
            n = conn.sock.recvmsg_into(bufs)[0]
        except BlockingIOError:
            conn.host_readable = False
            self._readable.pop(conn, None)
            self._held_rx.extendleft(reversed(chains))
            return
        except OSError:
            n = -1
        if n <= 0:  # EOF or reset: the general path writes SHUTDOWN / RST into one buffer
            self._held_rx.extendleft(reversed(chains[1:]))
            self._read_host_end(rx, conn, chains[0], n)
            return
        if n < capacity and not conn.host_hup:
            conn.host_readable = False  # drained (see _read_host)
            self._readable.pop(conn, None)
        conn.tx_cnt = (conn.tx_cnt + n) & _U32
        fwd_cnt = conn.last_fwd_cnt_sent = conn.fwd_cnt
        remaining = n
        for i, (head, segments) in enumerate(chains):
            if remaining <= 0:
                self._held_rx.extendleft(reversed(chains[i:]))  # unused: next time
                break
            length = len(bufs[i]) if len(bufs[i]) < remaining else remaining
            remaining -= length
            HDR.pack_into(
                segments[0],
                0,
                HOST_CID,
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                length,
                packet.TYPE_STREAM,
                Op.RW,
                0,
                conn.buf_alloc,
                fwd_cnt,
            )
            rx.push(head, HDR_SIZE + length)
            self.stats_packets_rx += 1
            if rx.unflushed >= RX_SIGNAL_BATCH:
                rx.flush()
                self.stats_rx_signals += 1

    def _read_host(self, rx: Virtqueue, conn: Connection, chain: Chain, credit: int) -> None:
        head, segments = chain
        first = segments[0]
        limit = credit if credit < packet.MAX_PAYLOAD else packet.MAX_PAYLOAD
        single = len(segments) == 1 and len(first) > HDR_SIZE
        if single:  # the common Linux layout: header and payload in one buffer
            bufs = [first[HDR_SIZE : HDR_SIZE + limit]]
        else:
            bufs = _truncate(_skip(segments, HDR_SIZE), limit)
            if not bufs:
                # A buffer too small for any payload (a hostile or odd guest): hand it back.
                rx.push(head, 0)
                return
        capacity = len(bufs[0]) if single else sum(len(b) for b in bufs)
        try:
            n = conn.sock.recv_into(bufs[0]) if len(bufs) == 1 else conn.sock.recvmsg_into(bufs)[0]
        except BlockingIOError:
            conn.host_readable = False
            self._readable.pop(conn, None)
            self._held_rx.appendleft(chain)
            return
        except OSError:
            n = -1
        if n <= 0:
            self._read_host_end(rx, conn, chain, n)
            return
        if n < capacity and not conn.host_hup:
            # A short stream read drained the socket; edge-triggered epoll reports new data.
            # (Not after HUP/RDHUP: the EOF still waits behind the data and raises no new edge.)
            conn.host_readable = False
            self._readable.pop(conn, None)
        conn.tx_cnt = (conn.tx_cnt + n) & _U32
        fwd_cnt = conn.last_fwd_cnt_sent = conn.fwd_cnt
        if len(first) >= HDR_SIZE:
            HDR.pack_into(
                first,
                0,
                HOST_CID,
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                n,
                packet.TYPE_STREAM,
                Op.RW,
                0,
                conn.buf_alloc,
                fwd_cnt,
            )
        else:
            _scatter(
                segments,
                packet.pack(
                    HOST_CID,
                    self.guest_cid,
                    conn.local_port,
                    conn.peer_port,
                    n,
                    Op.RW,
                    0,
                    conn.buf_alloc,
                    fwd_cnt,
                ),
            )
        rx.push(head, HDR_SIZE + n)
        self.stats_packets_rx += 1
        if rx.unflushed >= RX_SIGNAL_BATCH:
            # Let the guest start on a batch while we fill the rest (it is the bottleneck
            # under TCG); one signal per batch, not per packet.
            rx.flush()
            self.stats_rx_signals += 1

    def _read_host_end(self, rx: Virtqueue, conn: Connection, chain: Chain, n: int) -> None:
        """The host socket hit EOF (``n == 0``) or an error (``n < 0``): tell the guest."""
        self._readable.pop(conn, None)
        if n < 0:  # reset by the host side
            hdr = packet.pack(
                HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, 0, Op.RST, 0, 0, 0
            )
            self._drop(conn)
        else:  # EOF: the host will send no more (SHUTDOWN SEND; the guest's recv → 0)
            conn.host_eof = True
            hdr = packet.pack(
                HOST_CID,
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                0,
                Op.SHUTDOWN,
                packet.SHUTDOWN_SEND,
                conn.buf_alloc,
                conn.fwd_cnt,
            )
            conn.last_fwd_cnt_sent = conn.fwd_cnt
        self._write_header(rx, chain, hdr)
        if conn.host_eof and conn.peer_shut_send and not conn.pending_out:
            self._reset_conn(conn)

    def _write_header(self, rx: Virtqueue, chain: Chain, hdr: bytes) -> None:
        head, segments = chain
        if sum(len(s) for s in segments) < HDR_SIZE:
            rx.push(head, 0)  # too small even for a header: the guest drops short packets
            return
        _scatter(segments, hdr)
        rx.push(head, HDR_SIZE)
        self.stats_packets_rx += 1


def _parse_connect(line: bytes) -> int | None:
    """``CONNECT <port>\\n`` (or ``connect``) → port, else None."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0].upper() != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= _U32 else None


def _scatter(segments: list[memoryview], data: bytes) -> None:
    pos = 0
    for seg in segments:
        if pos >= len(data):
            return
        n = min(len(seg), len(data) - pos)
        seg[:n] = data[pos : pos + n]
        pos += n


def _skip(segments: list[memoryview], count: int) -> list[memoryview]:
    out = []
    for seg in segments:
        if count >= len(seg):
            count -= len(seg)
            continue
        out.append(seg[count:])
        count = 0
    return out


def _truncate(bufs: list[memoryview], limit: int) -> list[memoryview]:
    out = []
    for whole in bufs:
        if limit <= 0:
            break
        buf = whole[:limit] if len(whole) > limit else whole
        if len(buf):
            out.append(buf)
        limit -= len(buf)
    return out
