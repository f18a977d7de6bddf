"""Flow control (virtio 1.2, 5.10.6.3 "Buffer Space Management"), both ways, mod 2**32.

* host → guest: every guest packet refreshes the guest's ``buf_alloc``/``fwd_cnt``; we send at
  most ``peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``. Out of credit, the host socket
  is not read; CREDIT_REQUEST goes out only if the stall lasts :data:`CREDIT_REQUEST_DELAY`.
* guest → host: payload is written straight from guest memory to the host socket; what the
  socket does not take waits in ``pending_out`` (at most our ``buf_alloc``: a guest that
  overruns it is reset). ``fwd_cnt`` counts bytes the host socket took, and CREDIT_UPDATE goes
  out once the guest's view of it is stale by half of what the guest keeps in flight at most
  (``Connection.credit_update_due``; Linux never asks).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time

from vsockrpc.vhost.connection import Connection, ConnState
from vsockrpc.vhost.packet import Op
from vsockrpc.vhost.table import ConnectionTable

__all__ = ["CREDIT_REQUEST_DELAY", "FlowControl"]

log = logging.getLogger(__name__)

CREDIT_REQUEST_DELAY = 0.02  # seconds without credit before we send CREDIT_REQUEST
_U32 = 0xFFFFFFFF


class FlowControl(ConnectionTable):
    """Credit accounting and the guest → host byte path."""

    # ---------------------------------------------------------------- host → guest credit
    def _take_peer_credit(self, conn: Connection, buf_alloc: int, fwd_cnt: int) -> None:
        """Every guest packet carries its buf_alloc/fwd_cnt (5.10.6.3): refresh our view."""
        conn.update_peer_credit(buf_alloc, fwd_cnt)
        if conn.peer_free() > 0:
            if conn.credit_requested or conn.credit_stall is not None:
                conn.credit_requested = False
                conn.credit_stall = None
                self._credit_waiters.pop(conn, None)
            if conn.wants_host_read():
                self._readable[conn] = None

    def _credit_stalled(self, conn: Connection) -> None:
        """Out of credit: stop reading the host socket until the guest gives credit.

        Linux sends CREDIT_UPDATE by itself once its reader has drained buf_alloc - 64 KiB;
        asking at once (CREDIT_REQUEST) would make it answer with whatever little was read so
        far, a round trip per few KiB. So ask only if the stall lasts CREDIT_REQUEST_DELAY."""
        self._readable.pop(conn, None)
        if conn.credit_stall is None and not conn.credit_requested:
            conn.credit_stall = time.monotonic() + CREDIT_REQUEST_DELAY
            self._credit_waiters[conn] = None

    def _expire_credit(self, now: float) -> None:
        for conn in [c for c in self._credit_waiters if (c.credit_stall or 0.0) <= now]:
            del self._credit_waiters[conn]
            conn.credit_stall = None
            if conn.peer_free() <= 0 and conn.state is ConnState.ESTABLISHED:
                conn.credit_requested = True
                self._queue_ctl(conn, Op.CREDIT_REQUEST)
                self.stats_credit_requests += 1

    # ---------------------------------------------------------------- guest → host bytes
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
        self._sync_out(conn)
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
        # The guest never asks for credit (Linux), so we must offer it: half of its window
        # keeps it streaming with one update per ~2 packets of 64 KiB at the default 256 KiB.
        if conn.credit_update_due() and not conn.peer_shut_send:
            self._queue_ctl(conn, Op.CREDIT_UPDATE)
