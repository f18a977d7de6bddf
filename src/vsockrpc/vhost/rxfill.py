"""Filling the rx ring (device → guest, virtio 1.2 5.10.6): control packets first, every pass
(a credit update queued behind a blocked host socket deadlocked the guest at ~64 MiB in the
prototype), then data read from the host sockets with ``recv_into``/``recvmsg_into`` straight
into the guest's buffers, one packet per readable connection per round (fair), while buffers
and credit last.
"""

from __future__ import annotations

import logging

from vsockrpc.vhost import packet
from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.flow import FlowControl
from vsockrpc.vhost.packet import HDR, HDR_SIZE, Op
from vsockrpc.vhost.reactor import Reactor
from vsockrpc.vhost.segments import scatter, skip, truncate
from vsockrpc.vhost.virtqueue import Chain, RingError, Virtqueue

__all__ = ["READ_BATCH", "RX_SIGNAL_BATCH", "RxFill"]

READ_BATCH = 16  # rx buffers filled by one recvmsg_into ...
READ_BATCH_BYTES = 64 * 1024  # ... up to this much payload (big buffers need no batching)
RX_SIGNAL_BATCH = 32  # data packets per rx signal within one pass
_U32 = 0xFFFFFFFF

log = logging.getLogger(__name__)


class RxFill(FlowControl):
    """Writes control packets and host data into the guest's rx buffers."""

    def __init__(self, reactor: Reactor, guest_cid: int, *, buf_alloc: int) -> None:
        super().__init__(reactor, guest_cid, buf_alloc=buf_alloc)
        self._signal_soon = False  # a signal for cut-through bytes is queued (call_soon)

    def release_held_rx(self) -> None:
        """Give back a popped-but-unfilled rx buffer (empty) before the memory table changes."""
        if self._held_rx and self.rx is not None:
            for head, _ in self._held_rx:
                self.rx.push(head, 0)
            self.rx.flush()
        self._held_rx.clear()

    def _take_direct(self, conn: Connection, data: memoryview) -> int:
        """Cut-through from a guest of this process (:mod:`~vsockrpc.vhost.link`): write what
        fits of ``data`` for ``conn`` straight into rx buffers as RW packets; the bytes taken.

        Only when nothing must go first: the connection is established with no control packet
        waiting (a RESPONSE must precede data) and this guest has no control packet or RST
        waiting either (control first, as in :meth:`_fill_rx`); then while credit (5.10.6.3)
        and single-descriptor rx buffers last. Anything else takes the link's inbox and this
        device's own pass, as before. The guest is signalled once the pass that sent the bytes
        is over (:meth:`Reactor.call_soon`), or every :data:`RX_SIGNAL_BATCH` packets before."""
        rx = self.rx
        if (
            rx is None
            or not self.running
            or conn.state is not ConnState.ESTABLISHED
            or conn.ctl
            or conn.host_eof
            or conn.peer_shut_rcv
            or self._ctl_conns
            or self._stateless
        ):
            return 0
        credit = conn.peer_free()
        total = len(data)
        taken = 0
        try:
            while taken < total and credit > 0:
                chain = self._pop_rx(rx)  # buffers popped earlier and not filled go first
                if chain is None:
                    break
                head, segments = chain
                first = segments[0]
                if len(segments) != 1 or len(first) <= HDR_SIZE:
                    self._held_rx.appendleft(chain)  # odd layout: the general path takes it
                    break
                n = min(len(first) - HDR_SIZE, credit, total - taken, packet.MAX_PAYLOAD)
                first[HDR_SIZE : HDR_SIZE + n] = data[taken : taken + n]
                taken += n
                credit -= n
                conn.tx_cnt = (conn.tx_cnt + n) & _U32
                self._rw_header(first, conn, n)
                rx.push(head, HDR_SIZE + n)
                self.stats_packets_rx += 1
                self.stats_packets_direct += 1
                if rx.unflushed >= RX_SIGNAL_BATCH:  # a long drain: let the guest start
                    rx.flush()
                    self.stats_rx_signals += 1
        except RingError as err:
            # This guest's ring, found corrupt during another guest's pass: stop it here, as
            # run_pass would (the sender's link end then finds the stream gone).
            log.warning("guest corrupted a virtqueue: %s", str(err))
            rx.break_ring()
            self.clear()
            return 0
        if taken:
            conn.last_fwd_cnt_sent = conn.fwd_cnt
            if not self._signal_soon:
                self._signal_soon = True
                self.reactor.call_soon(self._signal_direct)
        return taken

    def _rw_header(self, buf: memoryview, conn: Connection, length: int) -> None:
        """An RW header for ``length`` payload bytes of ``conn`` at the start of ``buf``."""
        HDR.pack_into(
            buf,
            0,
            conn.local_cid,
            self.guest_cid,
            conn.local_port,
            conn.peer_port,
            length,
            packet.TYPE_STREAM,
            Op.RW,
            0,
            conn.buf_alloc,
            conn.fwd_cnt,
        )

    def _signal_direct(self) -> None:
        self._signal_soon = False
        if self.rx is not None and self.rx.flush():
            self.stats_rx_signals += 1

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
                        conn.local_cid,
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
                    self._credit_stalled(conn)  # 5.10.6.3: wait for the guest's credit
                    continue
                chain = self._pop_rx(rx)
                if chain is None:
                    return  # no buffers: wait for an rx kick
                segments = chain[1]
                if len(segments) == 1 and len(segments[0]) > HDR_SIZE and not conn.read_short:
                    self._read_host_batch(rx, conn, chain, credit)
                else:
                    self._read_host(rx, conn, chain, credit)

    def _read_host_batch(self, rx: Virtqueue, conn: Connection, chain: Chain, credit: int) -> None:
        """Fill up to READ_BATCH single-descriptor rx buffers with one ``recvmsg_into``.

        Only while the connection's reads fill whole buffers (``conn.read_short`` is False): a
        64-byte message would otherwise cost popping and handing back 15 unused buffers.

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
        conn.read_short = n < len(bufs[0])
        conn.tx_cnt = (conn.tx_cnt + n) & _U32
        conn.last_fwd_cnt_sent = conn.fwd_cnt
        remaining = n
        for i, (head, segments) in enumerate(chains):
            if remaining <= 0:
                self._held_rx.extendleft(reversed(chains[i:]))  # unused: next time
                break
            length = len(bufs[i]) if len(bufs[i]) < remaining else remaining
            remaining -= length
            self._rw_header(segments[0], conn, length)
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
            bufs = truncate(skip(segments, HDR_SIZE), limit)
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
        conn.read_short = n < capacity
        if n < capacity and not conn.host_hup:
            # A short stream read drained the socket; edge-triggered epoll reports new data.
            # (Not after HUP/RDHUP: the EOF still waits behind the data and raises no new edge.)
            conn.host_readable = False
            self._readable.pop(conn, None)
        conn.tx_cnt = (conn.tx_cnt + n) & _U32
        fwd_cnt = conn.last_fwd_cnt_sent = conn.fwd_cnt
        if len(first) >= HDR_SIZE:
            self._rw_header(first, conn, n)
        else:
            scatter(
                segments,
                packet.pack(
                    conn.local_cid,
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
                conn.local_cid, self.guest_cid, conn.local_port, conn.peer_port, 0, Op.RST, 0, 0, 0
            )
            self._drop(conn)
        else:  # EOF: the host will send no more (SHUTDOWN SEND; the guest's recv → 0)
            conn.host_eof = True
            hdr = packet.pack(
                conn.local_cid,
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
        scatter(segments, hdr)
        rx.push(head, HDR_SIZE)
        self.stats_packets_rx += 1
