"""The muxer's shared state: the connection table, the work queues one loop pass consumes, and
the operations every part of the data path needs (add, drop, reset a connection).

:class:`ConnectionTable` is the base of the muxer's parts (:mod:`~vsockrpc.vhost.flow`,
:mod:`~vsockrpc.vhost.dispatch`, :mod:`~vsockrpc.vhost.rxfill`): they are combined into one
:class:`~vsockrpc.vhost.muxer.Muxer` object by inheritance rather than composition because they
share these queues on the hot path, where an extra attribute hop per packet shows in the
back-end-alone figures.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from vsockrpc.vhost import packet
from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.packet import HOST_CID, Op
from vsockrpc.vhost.reactor import ERR, ET, IN, OUT, Reactor
from vsockrpc.vhost.virtqueue import Chain, Virtqueue

__all__ = ["LOCAL_PORT_END", "LOCAL_PORT_FIRST", "MAX_STATELESS_RST", "ConnectionTable"]

#: Firecracker allocates host-side ports for CONNECT round-robin in [2**30, 2**31).
LOCAL_PORT_FIRST = 1 << 30
LOCAL_PORT_END = 1 << 31
MAX_STATELESS_RST = 1024  # RSTs for packets that match no connection, waiting for rx buffers


#: Seconds a connection stays registered for EPOLLOUT after output last waited for the socket.
OUT_LINGER = 0.05


class ConnectionTable:
    """Connections keyed by ``(local_cid, local_port, peer_port)`` (host connections have
    ``local_cid`` 2, sibling ones the other guest's CID) and the per-pass work sets."""

    def __init__(self, reactor: Reactor, guest_cid: int, *, buf_alloc: int) -> None:
        self.reactor = reactor
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self.conns: dict[tuple[int, int, int], Connection] = {}
        self.sibling_counts: dict[int, int] = {}  # sibling CID → its connections here
        # Ordered sets (dicts): the work a pass does, each entry at most once.
        self._readable: dict[Connection, None] = {}  # host sockets with data for the guest
        self._ctl_conns: dict[Connection, None] = {}  # connections with control packets due
        self._writable: dict[Connection, None] = {}  # pending_out to flush to the host
        self._deadlines: dict[Connection, None] = {}  # LOCAL_INIT / CLOSING timeouts
        self._credit_waiters: dict[Connection, None] = {}  # stalled for credit (credit_stall)
        self._sibling_pending: dict[Connection, bytes] = {}  # REMOTE_INIT: OK line so far
        self._stateless: deque[bytes] = deque()  # RST headers for unknown connections
        self._held_rx: deque[Chain] = deque()  # popped rx chains we could not fill yet
        self._next_port = itertools.count()
        self.stats_packets_rx = 0  # packets written to the guest
        self.stats_packets_direct = 0  # ... of which cut through from another guest (link.py)
        self.stats_packets_tx = 0  # packets read from the guest
        self.stats_passes = 0  # data-path passes
        self.stats_rx_signals = 0  # rx call-eventfd writes (interrupts the guest will take)
        self.stats_credit_requests = 0

    def clear(self) -> None:
        """Drop every connection (clients see EOF) and forget all queued work."""
        for conn in list(self.conns.values()):
            self._drop(conn)
        self._stateless.clear()
        self._held_rx.clear()
        self._readable.clear()
        self._ctl_conns.clear()
        self._writable.clear()
        self._deadlines.clear()
        self._credit_waiters.clear()
        self._sibling_pending.clear()
        self.sibling_counts.clear()

    def alloc_port(self, peer_port: int) -> int:
        span = LOCAL_PORT_END - LOCAL_PORT_FIRST
        while True:
            port = LOCAL_PORT_FIRST + next(self._next_port) % span
            if (HOST_CID, port, peer_port) not in self.conns:
                return port

    @property
    def running(self) -> bool:
        return self.rx is not None and self.tx is not None and self.rx.ready and self.tx.ready

    def _add(self, conn: Connection) -> None:
        self.conns[conn.key] = conn
        if conn.local_cid != HOST_CID:
            self.sibling_counts[conn.local_cid] = self.sibling_counts.get(conn.local_cid, 0) + 1
        self._watch(conn)
        if conn.lifeline is not None:
            # Any event on a lifeline is its client leaving (it sends nothing after CONNECT).
            self.reactor.register(
                conn.lifeline.fileno(), IN | ERR, lambda mask: self._on_lifeline(conn)
            )

    def _on_lifeline(self, conn: Connection) -> None:
        """The client that passed ``conn``'s stream closed its own connection: end the stream
        as the relay it replaced would have (RST to the guest, the stream closed)."""
        if self.running and conn.state is not ConnState.CLOSED:
            self._reset_conn(conn)
        else:
            self._drop(conn)

    def _watch(self, conn: Connection, *, out: bool = False) -> None:
        """The data path's registration of a connection's socket, edge-triggered: IN always,
        OUT only while output is pending or was lately (:meth:`_sync_out`)."""
        conn.out_watched = out
        mask = IN | ERR | ET | (OUT if out else 0)
        self.reactor.register(conn.fd, mask, lambda mask: self._on_host(conn, mask))

    def _sync_out(self, conn: Connection) -> None:
        """Watch for EPOLLOUT while ``pending_out`` holds bytes and for :data:`OUT_LINGER`
        after. An edge-triggered OUT fires each time the peer reads and frees buffer space: on
        a request/response stream, where nothing waits, that woke the loop once per round trip
        for nothing (a third epoll_wait per guest↔guest round trip in each device). Adding OUT
        re-checks the socket (epoll_ctl MOD), so space freed before it is not missed; it is
        dropped on the first idle OUT event after the linger, not at every drain (a bulk
        stream fills the socket again at once: two epoll_ctl per fill cost it ~7 %)."""
        if conn.pending_out:
            conn.out_pending_at = time.monotonic()
            if not conn.out_watched and conn.state is not ConnState.CLOSED:
                self._watch(conn, out=True)

    def _drop(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            cid = conn.local_cid
            if cid != HOST_CID:
                left = self.sibling_counts.pop(cid, 1) - 1
                if left > 0:
                    self.sibling_counts[cid] = left
        self.reactor.unregister(conn.fd)
        if conn.lifeline is not None:
            self.reactor.unregister(conn.lifeline.fileno())
        conn.close_socket()
        self._readable.pop(conn, None)
        self._ctl_conns.pop(conn, None)
        self._writable.pop(conn, None)
        self._deadlines.pop(conn, None)
        self._credit_waiters.pop(conn, None)
        self._sibling_pending.pop(conn, None)

    def _reset_conn(self, conn: Connection) -> None:
        """Tell the guest RST and forget the connection."""
        self._stateless_rst(conn.local_port, conn.peer_port, conn.local_cid)
        self._drop(conn)

    def _stateless_rst(self, local_port: int, peer_port: int, local_cid: int = HOST_CID) -> None:
        if len(self._stateless) < MAX_STATELESS_RST:
            self._stateless.append(
                packet.pack(local_cid, self.guest_cid, local_port, peer_port, 0, Op.RST, 0, 0, 0)
            )

    def _queue_ctl(self, conn: Connection, op: int, flags: int = 0) -> None:
        conn.add_ctl(op, flags)
        self._ctl_conns[conn] = None

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
        elif mask & OUT and time.monotonic() - conn.out_pending_at > OUT_LINGER:
            self._watch(conn)  # nothing waits to be written, lately: stop the OUT wake-ups
