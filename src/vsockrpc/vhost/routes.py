"""Sibling connections in the muxer: a guest connecting to another guest of a shared group, and
another group member's device connecting to our guest (the handshake itself is
:mod:`~vsockrpc.vhost.sibling`).

Once linked, a sibling connection is a :class:`~vsockrpc.vhost.connection.Connection` whose
socket leads to the other device instead of a host client, and whose ``local_cid`` is the other
guest's CID: the flow control, half-close and reset paths are the hybrid ones. Credit is end to
end by chaining: guest A's credit ↔ A's ``pending_out`` (≤ ``buf_alloc``) ↔ the Unix socket's
buffers ↔ B's device, which reads the socket only while guest B has credit.

Bounds: at most :data:`MAX_PENDING_OUT` outgoing handshakes waiting for their ``OK`` (excess:
RST to the guest at once); at most a quarter of ``max_connections`` connections from any one
sibling CID (excess: the link is closed, the caller's guest gets RST).
"""

from __future__ import annotations

import functools
import logging
import time

from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.flow import FlowControl
from vsockrpc.vhost.hybrid import CONNECT_TIMEOUT
from vsockrpc.vhost.link import Stream
from vsockrpc.vhost.packet import Op
from vsockrpc.vhost.reactor import ERR, IN, Reactor
from vsockrpc.vhost.sibling import OK_LINE, RateLimitedLog, SiblingHub

__all__ = ["MAX_PENDING_OUT", "SIBLING_TIMEOUT", "SiblingRoutes"]

log = logging.getLogger(__name__)

MAX_PENDING_OUT = 64  # outgoing sibling handshakes awaiting OK
#: How long guest A's connect waits for the other device: a little longer than that device
#: gives its guest (CONNECT_TIMEOUT), so its verdict (OK or a close) normally arrives first.
SIBLING_TIMEOUT = CONNECT_TIMEOUT + 0.5


class SiblingRoutes(FlowControl):
    """Opens and accepts sibling connections; needs ``siblings`` (None: no groups)."""

    max_connections: int

    def __init__(self, reactor: Reactor, guest_cid: int, *, buf_alloc: int) -> None:
        super().__init__(reactor, guest_cid, buf_alloc=buf_alloc)
        self.siblings: SiblingHub | None = None
        # Refusals are policy events: WARNING, so device.log has them at the default level.
        self._refusals = RateLimitedLog(logging.WARNING)
        self.stats_sibling_refused = 0

    def sibling_limit(self) -> int:
        """Connections one sibling CID may hold with our guest."""
        return max(1, self.max_connections // 4)

    # ---------------------------------------------------------------- guest → sibling
    def _sibling_connect(
        self, dst_cid: int, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int
    ) -> None:
        """Guest REQUEST to ``dst_cid:local_port`` from its ``peer_port``."""
        hub = self.siblings
        if hub is None:
            verdict: tuple[Stream, str] | str = "not in a shared group"
        elif len(self._sibling_pending) >= MAX_PENDING_OUT:
            verdict = f"{MAX_PENDING_OUT} sibling connects already pending"
        elif len(self.conns) >= self.max_connections:
            verdict = "connection limit reached"
        else:
            verdict = hub.dial(dst_cid, peer_port, local_port)
        if isinstance(verdict, str):
            self._stateless_rst(local_port, peer_port, dst_cid)  # at once: no 2 s hang
            self._refuse_out(dst_cid, local_port, verdict)
            return
        sock, group = verdict
        conn = Connection(
            sock, local_port, peer_port, ConnState.REMOTE_INIT, self.buf_alloc, local_cid=dst_cid
        )
        conn.update_peer_credit(buf_alloc, fwd_cnt)
        self._add(conn)
        # Until the OK line, the socket is read here, level-triggered, 3 bytes at most.
        self.reactor.register(conn.fd, IN | ERR, functools.partial(self._on_sibling_reply, conn))
        self._sibling_pending[conn] = b""
        conn.deadline = time.monotonic() + SIBLING_TIMEOUT
        self._deadlines[conn] = None
        log.debug("guest CID %d → CID %d port %d: dialled in group %s", *self._out(conn), group)

    def _on_sibling_reply(self, conn: Connection, mask: int) -> None:
        got = self._sibling_pending.get(conn)
        if got is None:
            return
        try:
            data = conn.sock.recv(len(OK_LINE) - len(got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        got += data
        if not data or not OK_LINE.startswith(got):
            # The other guest refused (RST), did not answer, or its device is gone.
            self._refuse_out(conn.local_cid, conn.local_port, "the other side refused")
            self._reset_conn(conn)
            return
        if got != OK_LINE:
            self._sibling_pending[conn] = got
            return
        del self._sibling_pending[conn]
        conn.state = ConnState.ESTABLISHED
        conn.deadline = None
        self._deadlines.pop(conn, None)
        self._watch(conn)
        conn.host_readable = True  # bytes may already follow the OK line
        self._readable[conn] = None
        self._queue_ctl(conn, Op.RESPONSE)
        log.info("guest CID %d → CID %d port %d: sibling connection established", *self._out(conn))

    def _out(self, conn: Connection) -> tuple[int, int, int]:
        return self.guest_cid, conn.local_cid, conn.local_port

    def _refuse_out(self, dst_cid: int, port: int, why: str) -> None:
        self.stats_sibling_refused += 1
        self._refusals(
            "guest CID %d → CID %d port %d: %s, refused", self.guest_cid, dst_cid, port, why
        )

    # ---------------------------------------------------------------- sibling → guest
    def on_sibling(
        self, sock: Stream, group: str, src_cid: int, src_port: int, dst_port: int
    ) -> None:
        """A verified handshake from ``src_cid``'s device: ask our guest (REQUEST)."""
        limit = self.sibling_limit()
        why = ""
        if not self.running:
            why = "guest not running"
        elif len(self.conns) >= self.max_connections:
            why = "connection limit reached"
        elif self.sibling_counts.get(src_cid, 0) >= limit:
            why = f"CID {src_cid} already holds {limit} connections here"
        elif (src_cid, src_port, dst_port) in self.conns:
            why = "that connection exists"
        if why:
            sock.close()  # EOF before OK: the caller's guest gets RST
            self.stats_sibling_refused += 1
            self._refusals(
                "group %s: CID %d port %d → guest CID %d port %d: %s, refused",
                group,
                src_cid,
                src_port,
                self.guest_cid,
                dst_port,
                why,
            )
            return
        conn = Connection(
            sock, src_port, dst_port, ConnState.LOCAL_INIT, self.buf_alloc, local_cid=src_cid
        )
        self._add(conn)
        conn.deadline = time.monotonic() + CONNECT_TIMEOUT
        self._deadlines[conn] = None
        self._queue_ctl(conn, Op.REQUEST)
        log.info(
            "group %s: CID %d port %d → guest CID %d port %d: sibling connection accepted",
            group,
            src_cid,
            src_port,
            self.guest_cid,
            dst_port,
        )
