"""The vsock side of the device: guest packets ↔ host Unix sockets ("hybrid vsock", as in
Firecracker ``docs/vsock.md`` and rust-vmm vhost-device-vsock).

* Host-initiated: a client connects to ``uds_path`` and writes ``CONNECT <port>\\n``
  (:mod:`~vsockrpc.vhost.hybrid`); we send the guest a REQUEST from ``2:<local_port>``; on
  RESPONSE we write ``OK <local_port>\\n`` and then forward bytes; on RST or after 2 s we close
  the client without a message. A client that comes before the guest's driver has started the
  rings waits for them within those 2 s.
* Guest-initiated to CID 2 port P: we connect to ``<uds_path>_P``; RESPONSE on success, RST at
  once when nothing listens there.
* Guest-initiated to another guest's CID, and other guests' devices connecting to ours: sibling
  connections within shared groups (:mod:`~vsockrpc.vhost.routes`, :mod:`~vsockrpc.vhost.sibling`).

The data path, per loop pass (:meth:`Muxer.run_pass`): consume the tx ring (guest packets,
:mod:`~vsockrpc.vhost.dispatch`; payload written straight from guest memory to the host socket,
:mod:`~vsockrpc.vhost.flow`), then fill the rx ring (:mod:`~vsockrpc.vhost.rxfill`), then
publish each used ring and signal its call fd once.
"""

from __future__ import annotations

import functools
import logging
import socket
import time

from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.dispatch import GuestDispatch
from vsockrpc.vhost.hybrid import CONNECT_TIMEOUT, HybridHost
from vsockrpc.vhost.link import LinkEnd
from vsockrpc.vhost.packet import Op
from vsockrpc.vhost.reactor import Reactor
from vsockrpc.vhost.rxfill import RxFill
from vsockrpc.vhost.virtqueue import RingError, Virtqueue

__all__ = ["Muxer"]

log = logging.getLogger(__name__)

TX_SIGNAL_DELAY = 0.002  # seconds a tx completion signal may wait for company


class Muxer(GuestDispatch, RxFill):
    """Guest streams ↔ host Unix sockets: the connection table plus one pass of the data path
    (guest dispatch, flow control and rx filling are its parts, see :mod:`~.table`)."""

    def __init__(
        self,
        reactor: Reactor,
        uds_path: str,
        guest_cid: int,
        *,
        buf_alloc: int,
        max_connections: int,
    ) -> None:
        super().__init__(reactor, guest_cid, buf_alloc=buf_alloc)
        self.uds_path = uds_path
        self.max_connections = max_connections
        self.host = HybridHost(reactor, uds_path, self._on_connect)
        self.tx_kicked = False
        self.rx_kicked = False

    # ================================================================ attach / detach
    def attach(self, rx: Virtqueue, tx: Virtqueue) -> None:
        self.rx, self.tx = rx, tx
        self.tx_kicked = self.rx_kicked = True  # scan both once: buffers may predate any kick

    def reset(self) -> None:
        """Guest reset / ring stop / disconnect: drop every connection (clients see EOF)."""
        self.clear()

    def close(self) -> None:
        self.reset()
        self.host.close()
        if self.siblings is not None:
            self.siblings.close()

    def _add(self, conn: Connection) -> None:
        super()._add(conn)
        if isinstance(conn.sock, LinkEnd):  # a guest of this process: cut-through (link.py)
            conn.sock.receiver = functools.partial(self._take_direct, conn)

    # ================================================================ host-initiated
    def on_listener(self, listener: socket.socket) -> None:
        self.host.on_listener(listener)

    def _on_connect(self, sock: socket.socket, port: int, lifeline: socket.socket | None) -> None:
        """A host client's ``CONNECT <port>`` line is complete: ask the guest (REQUEST).

        Before the guest's driver has started the rings (a guest booting, rebooting, or just
        restored with its device re-plugged) the REQUEST waits in the control queue for them,
        within the same :data:`CONNECT_TIMEOUT`: the client is answered as soon as the guest can
        answer, instead of being closed and retrying on its own backoff (which cost a restored
        guest ~0.1 s, a third of its time to first answer)."""
        if len(self.conns) >= self.max_connections:
            sock.close()  # EOF before OK: the client retries or gives up
            if lifeline is not None:
                lifeline.close()
            return
        conn = Connection(sock, self.alloc_port(port), port, ConnState.LOCAL_INIT, self.buf_alloc)
        conn.lifeline = lifeline
        self._add(conn)
        conn.deadline = time.monotonic() + CONNECT_TIMEOUT
        self._deadlines[conn] = None
        self._queue_ctl(conn, Op.REQUEST)

    # ================================================================ timers
    def has_timers(self) -> bool:
        siblings = self.siblings is not None and self.siblings.has_timers()
        return bool(self._deadlines or self._credit_waiters or self.host.has_timers() or siblings)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self._deadlines if c.deadline is not None]
        times += [c.credit_stall for c in self._credit_waiters if c.credit_stall is not None]
        for pending in (self.host, self.siblings):
            when = pending.next_deadline() if pending is not None else None
            if when is not None:
                times.append(when)
        return min(times) if times else None

    def expire(self, now: float) -> None:
        self._expire_credit(now)
        for conn in [c for c in self._deadlines if c.deadline is not None and c.deadline <= now]:
            log.debug("connection %s timed out in %s", conn.key, conn.state.value)
            if self.running:
                self._reset_conn(conn)
            else:  # the guest never saw it: nothing to tell it
                self._drop(conn)
        self.host.expire(now)
        if self.siblings is not None:
            self.siblings.expire(now)

    # ================================================================ the pass
    def has_work(self) -> bool:
        """True if another pass could make progress without waiting for an fd."""
        if not self.running:
            return False
        if self._writable or self.tx_kicked:
            return True
        if self._stateless or self._ctl_conns or self._readable:
            assert self.rx is not None
            return bool(self._held_rx) or self.rx.has_avail()
        return False

    def pass_due(self) -> bool:
        """True if :meth:`run_pass` has anything to do: a tx kick, or queued work (cheap: a
        process serving several devices asks each of them every loop iteration)."""
        return bool(
            self.tx_kicked or self._writable or self._readable or self._ctl_conns or self._stateless
        )

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
                # As text: a record kept by a handler (MemoryHandler, a test's capture) would
                # otherwise keep the error's frames, and with them views of guest memory.
                log.warning("guest corrupted a virtqueue: %s", str(err))
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
