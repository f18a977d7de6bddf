"""Guest dispatch: packets the guest puts on the tx ring (virtio 1.2, 5.10.6 "Device
Operation"), parsed once and handled by op through a table (:data:`OP_HANDLERS`).

Validation order, before any connection is touched: the header is copied out once (the guest may
change its memory under us); ``src_cid`` must be the guest's (5.10.6.1) and ``dst_cid`` the host
or another guest's CID (0, 1, ``VMADDR_CID_ANY``, the guest's own and CIDs beyond 32 bits are
dropped); ``len`` must fit the chain and 64 KiB; the type must be STREAM. A packet for no
connection is a REQUEST (guest-initiated connect: to the host, or to a sibling in a shared
group, :mod:`~vsockrpc.vhost.routes`) or answered with RST; RST is never answered with RST.

``VMADDR_FLAG_TO_HOST`` (Linux ``struct sockaddr_vm.svm_flags``) only picks the guest's transport
(this virtio device rather than a nested vhost one); it is not in the packet header, so a
guest's packets to CID 2 reach the host and packets to CID ≥ 3 are sibling traffic, flag or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vsockrpc.vhost import packet
from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.hybrid import CONNECT_TIMEOUT, PASSED_REPLY, HybridHost
from vsockrpc.vhost.packet import HDR, HDR_SIZE, HOST_CID, Op
from vsockrpc.vhost.routes import SiblingRoutes
from vsockrpc.vhost.segments import skip, truncate
from vsockrpc.vhost.sibling import OK_LINE
from vsockrpc.vhost.virtqueue import Virtqueue

__all__ = ["OP_HANDLERS", "GuestDispatch"]

log = logging.getLogger(__name__)


_U32 = 0xFFFFFFFF


class GuestDispatch(SiblingRoutes):
    """Consumes the tx ring and applies each guest packet to its connection."""

    host: HybridHost  # set by the muxer: where guest-initiated connections go
    max_connections: int
    tx_kicked: bool  # the muxer's: the tx ring may hold packets (a kick, or a drain cut short)

    def _drain_tx(self, tx: Virtqueue) -> None:
        """At most one ring's worth of packets per pass: a guest adding buffers as fast as they
        are consumed gets the rest next pass (``tx_kicked`` stays set), after the other VMs of
        the process had theirs."""
        for _ in range(max(1, tx.num)):
            chain = tx.pop()
            if chain is None:
                return
            head, segments = chain
            self.stats_packets_tx += 1
            try:
                self._on_guest_packet(segments)
            finally:
                tx.push(head, 0)  # tx buffers are only read (2.7.8: used len = bytes written)
        self.tx_kicked = True

    def _on_guest_packet(self, segments: list[memoryview]) -> None:
        first = segments[0]
        if len(first) >= HDR_SIZE:
            hdr = HDR.unpack_from(first)
            body_segments = [first[HDR_SIZE:], *segments[1:]]
        else:
            # Odd layout: the header spans descriptors. Copy just its 44 bytes out, once (the
            # guest may change guest memory under us; never re-read it).
            raw = b"".join(bytes(s) for s in truncate(segments, HDR_SIZE))
            if len(raw) < HDR_SIZE:
                log.debug("dropping a %d-byte tx packet", len(raw))
                return
            hdr = HDR.unpack(raw)
            body_segments = skip(segments, HDR_SIZE)
        src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = hdr
        # 5.10.6.1: the device drops packets that do not come from the guest's own CID; we also
        # drop those to no routable CID (a sibling is any CID >= 3 but the guest's own).
        if src_cid != self.guest_cid:
            return
        if dst_cid != HOST_CID and (not HOST_CID < dst_cid < _U32 or dst_cid == src_cid):
            return
        key = (dst_cid, dst_port, src_port)
        if length > sum(len(s) for s in body_segments) or length > packet.MAX_PAYLOAD:
            if op != Op.RST:
                self._stateless_rst(dst_port, src_port, dst_cid)
            conn = self.conns.get(key)
            if conn is not None:
                self._drop(conn)
            return
        if ptype != packet.TYPE_STREAM:
            if op != Op.RST:
                self._stateless_rst(dst_port, src_port, dst_cid)
            return
        conn = self.conns.get(key)
        if conn is None:
            if op == Op.REQUEST:
                if dst_cid == HOST_CID:
                    self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
                else:
                    self._sibling_connect(dst_cid, dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:  # never answer RST with RST
                self._stateless_rst(dst_port, src_port, dst_cid)
            return
        if conn.state is ConnState.REMOTE_INIT and op != Op.RST:
            self._reset_conn(conn)  # only RST is legal before our RESPONSE
            return
        self._take_peer_credit(conn, buf_alloc, fwd_cnt)
        OP_HANDLERS.get(op, GuestDispatch._on_bad_op)(self, conn, flags, body_segments, length)

    # ---------------------------------------------------------------- one handler per op
    def _on_rw(self, conn: Connection, flags: int, body: list[memoryview], length: int) -> None:
        if conn.state is not ConnState.ESTABLISHED or conn.peer_shut_send:
            self._reset_conn(conn)
            return
        self._guest_data(conn, body, length)

    def _on_response(
        self, conn: Connection, flags: int, body: list[memoryview], length: int
    ) -> None:
        if conn.state is not ConnState.LOCAL_INIT:
            self._reset_conn(conn)
            return
        conn.state = ConnState.ESTABLISHED
        conn.deadline = None
        self._deadlines.pop(conn, None)
        if conn.lifeline is not None:  # the client passed its stream: answer on its own
            try:
                conn.lifeline.send(PASSED_REPLY.format(port=conn.local_port).encode())
            except OSError:  # it left (or can't take 20 bytes): nobody to hand the stream to
                self._reset_conn(conn)
                return
        else:
            # A host client learns its port; a sibling's device just needs the go-ahead.
            reply = OK_LINE if conn.local_cid != HOST_CID else f"OK {conn.local_port}\n".encode()
            conn.pending_out.append(reply)
            conn.pending_bytes += len(reply)
            conn.rx_cnt = conn.fwd_cnt = 0  # the OK line is not guest payload
            self._flush_out(conn, count=False)
        if conn.host_readable:
            self._readable[conn] = None

    def _on_rst(self, conn: Connection, flags: int, body: list[memoryview], length: int) -> None:
        self._drop(conn)

    def _on_shutdown(
        self, conn: Connection, flags: int, body: list[memoryview], length: int
    ) -> None:
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

    def _on_credit_request(
        self, conn: Connection, flags: int, body: list[memoryview], length: int
    ) -> None:
        self._queue_ctl(conn, Op.CREDIT_UPDATE)

    def _on_credit_update(
        self, conn: Connection, flags: int, body: list[memoryview], length: int
    ) -> None:
        pass  # credit already taken from the header

    def _on_bad_op(self, conn: Connection, flags: int, body: list[memoryview], length: int) -> None:
        self._reset_conn(conn)  # a second REQUEST on a live connection, or an unknown op

    # ---------------------------------------------------------------- guest-initiated connect
    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        sock = None if len(self.conns) >= self.max_connections else self.host.open_port(local_port)
        if sock is None:
            self._stateless_rst(local_port, peer_port)  # RST at once: no 2 s hang in the guest
            return
        conn = Connection(sock, local_port, peer_port, ConnState.ESTABLISHED, self.buf_alloc)
        conn.update_peer_credit(buf_alloc, fwd_cnt)
        self._add(conn)
        self._queue_ctl(conn, Op.RESPONSE)


_Handler = Callable[[GuestDispatch, Connection, int, list[memoryview], int], None]

#: op → handler for packets on a known connection; anything else resets it.
OP_HANDLERS: dict[int, _Handler] = {
    Op.RW: GuestDispatch._on_rw,
    Op.RESPONSE: GuestDispatch._on_response,
    Op.RST: GuestDispatch._on_rst,
    Op.SHUTDOWN: GuestDispatch._on_shutdown,
    Op.CREDIT_REQUEST: GuestDispatch._on_credit_request,
    Op.CREDIT_UPDATE: GuestDispatch._on_credit_update,
}
