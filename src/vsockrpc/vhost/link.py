"""In-process links: a stream between two guests served by the same device process.

When one device process serves several VMs of a group (``vsockrpc device --vm … --vm …``,
docs/device.md "One process per group"), a sibling connection between two of them needs no
Unix socket: :func:`link_pair` makes two :class:`LinkEnd` objects that the connection table uses
exactly as it uses a socket (``send``, ``recv_into``, ``recvmsg_into``, ``recv``, ``shutdown``,
``close``, ``fileno``), and whose readiness is posted to the shared
:class:`~vsockrpc.vhost.reactor.Reactor` under a virtual (negative) fd instead of coming from
epoll. A byte then goes from guest A's tx buffer into the link and from the link into guest B's
rx buffer in the same loop iteration: no system call, no second process to wake.

Hand-written (rather than ``socket.socketpair``) because a socket pair still costs a ``send``,
an epoll wake-up and a ``recv`` per packet, which is what this path exists to avoid. The
semantics follow a non-blocking ``AF_UNIX`` stream socket where the table relies on them:
``BlockingIOError`` when there is nothing to read or no room to write, ``0`` from a read at
end-of-stream (after the other end's ``shutdown(SHUT_WR)`` or ``close``, once what it sent is
read), ``BrokenPipeError`` when writing to a closed peer, edge-style IN/OUT/HUP events, and the
current readiness reported again when a registration changes (as ``EPOLL_CTL_MOD`` does).
Capacity is bounded (:data:`LINK_CAPACITY` bytes in flight per direction), like a socket buffer.

*Cut-through*: the connection that reads an end may give it a ``receiver``, a function that
writes bytes straight into its guest's rx buffers and returns how many it took (0: not now).
While nothing waits unread in that end, :meth:`LinkEnd.send` offers the bytes to the receiver
first and queues only what it did not take, so a 64-byte message goes from guest A's tx buffer
to guest B's rx buffer in one copy, within guest A's pass, instead of through the inbox and
guest B's own pass (docs/device.md, "Where the floor is": a third less device CPU per round
trip with the test driver as both guests). Bytes queued earlier are read first, so the
stream's order holds.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vsockrpc.vhost.reactor import ERR, IN, OUT

if TYPE_CHECKING:
    from vsockrpc.vhost.reactor import Reactor

__all__ = ["LINK_CAPACITY", "LinkEnd", "Stream", "link_pair"]

#: Bytes one direction of a link holds unread: about a Unix socket's default buffer.
LINK_CAPACITY = 256 * 1024


class LinkEnd:
    """One end of an in-process stream (see the module docstring)."""

    __slots__ = (
        "_closed",
        "_eof_in",
        "_inbox",
        "_peer",
        "_reactor",
        "_shut_wr",
        "capacity",
        "fd",
        "receiver",
    )

    def __init__(self, reactor: Reactor, capacity: int) -> None:
        self._reactor = reactor
        self.capacity = capacity
        self._inbox = bytearray()  # what the other end sent and we have not read
        self._peer: LinkEnd | None = None
        self._eof_in = False  # the other end will send no more (shutdown or close)
        self._shut_wr = False
        self._closed = False
        # Takes bytes for this end's reader directly (the module docstring, "Cut-through").
        self.receiver: Callable[[memoryview], int] | None = None
        self.fd = reactor.add_virtual(self)

    def fileno(self) -> int:
        return self.fd

    def ready_mask(self) -> int:
        """What a level check would report now: IN (data or EOF), OUT (room), ERR (peer gone)."""
        mask = 0
        if self._inbox or self._eof_in:
            mask |= IN
        peer = self._peer
        if peer is None:
            mask |= ERR
        elif len(peer._inbox) < peer.capacity and not self._shut_wr:
            mask |= OUT
        return mask

    # ------------------------------------------------------------------ writing
    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "link end closed")
        peer = self._peer
        if peer is None or self._shut_wr:
            raise BrokenPipeError(errno.EPIPE, "the other end is closed")
        taken = 0
        if peer.receiver is not None and not peer._inbox:
            view = memoryview(data)
            taken = peer.receiver(view)
            if self._peer is not peer:  # the receiving side dropped the stream meanwhile
                raise BrokenPipeError(errno.EPIPE, "the other end is closed")
            if taken >= len(view):
                return taken
            if taken:
                data = view[taken:]
        room = peer.capacity - len(peer._inbox)
        if room <= 0:
            if taken:
                return taken
            raise BlockingIOError(errno.EAGAIN, "link full")
        n = len(data)
        if n > room:
            data, n = data[:room], room
        was_empty = not peer._inbox
        peer._inbox += data
        if was_empty:  # an edge: the reader drains fully before it waits for the next one
            self._reactor.post(peer.fd, IN)
        return taken + n

    def shutdown(self, how: int) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "link end closed")
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._shut_wr:
            self._shut_wr = True
            peer = self._peer
            if peer is not None:
                peer._eof_in = True
                self._reactor.post(peer.fd, IN | ERR)

    # ------------------------------------------------------------------ reading
    def recv_into(self, buf: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        inbox = self._take_check()
        if inbox is None:
            return 0
        n = min(len(buf), len(inbox)) if nbytes <= 0 else min(nbytes, len(buf), len(inbox))
        buf[:n] = inbox[:n]
        self._consumed(n)
        return n

    def recvmsg_into(
        self, buffers: Sequence[memoryview], ancbufsize: int = 0, flags: int = 0
    ) -> tuple[int, list[tuple[int, int, bytes]], int, None]:
        inbox = self._take_check()
        if inbox is None:
            return 0, [], 0, None
        total = 0
        for buf in buffers:
            n = min(len(buf), len(inbox) - total)
            if n <= 0:
                break
            buf[:n] = inbox[total : total + n]
            total += n
        self._consumed(total)
        return total, [], 0, None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        inbox = self._take_check()
        if inbox is None:
            return b""
        data = bytes(inbox[:bufsize])
        self._consumed(len(data))
        return data

    def _take_check(self) -> bytearray | None:
        """The inbox to read from; None at end-of-stream; BlockingIOError when empty."""
        if self._closed:
            raise OSError(errno.EBADF, "link end closed")
        if self._inbox:
            return self._inbox
        if self._eof_in:
            return None
        raise BlockingIOError(errno.EAGAIN, "nothing to read")

    def _consumed(self, n: int) -> None:
        inbox = self._inbox
        was_full = len(inbox) >= self.capacity
        del inbox[:n]  # CPython moves the start of a bytearray, it does not copy the rest
        peer = self._peer
        if peer is not None and n and (was_full or not inbox):
            self._reactor.post(peer.fd, OUT)  # room again: the writer may flush what it holds

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Idempotent. The other end reads what is left, then end-of-stream; its writes fail."""
        if self._closed:
            return
        self._closed = True
        self._inbox = bytearray()
        self.receiver = None
        peer, self._peer = self._peer, None
        self._reactor.remove_virtual(self.fd)
        if peer is not None:
            peer._peer = None
            peer._eof_in = True
            self._reactor.post(peer.fd, IN | ERR)


#: What a connection's far side is: a host client's (or another device's) socket, or a link.
Stream = socket.socket | LinkEnd


def link_pair(reactor: Reactor, capacity: int = LINK_CAPACITY) -> tuple[LinkEnd, LinkEnd]:
    """Two connected ends on ``reactor``."""
    a, b = LinkEnd(reactor, capacity), LinkEnd(reactor, capacity)
    a._peer, b._peer = b, a
    return a, b
