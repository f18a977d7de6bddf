"""Raw data channels: bulk file bytes outside HTTP/2 and protobuf.

gRPC in Python costs several copies and a lot of CPU per byte; in an emulated guest that caps
transfers far below what the vsock device carries. For a large transfer the client asks for a
data channel (``Files.OpenDataChannel``), connects a plain socket to the port (or path) it is
given — over the same transport it reached the agent on — and sends the single-use ticket and
a newline. The Upload/Download call then names the ticket: header and trailer (size, checksum)
stay on the gRPC stream, the bytes flow on the socket. Design after Apple's vminitd, which
copies files on a separate vsock stream.

Sockets come from the injected :class:`DataSockets` (the server's starter passes
:mod:`vsockrpc.transport`): the listener for a caller is where that caller can connect back
(``callback_address``), and an accepted connection's peer is what the transport says it is
(``accepted_peer``), the same function the server-side relay uses. Without it, transfers go
in-band.

Admission: the listener only exists for peers the policy admitted (OpenDataChannel is a guarded
RPC), a vsock connection must come from an admitted CID too, and the ticket (128 random bits,
one use, 60 s) ties it to the call that asked for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from vsockrpc.addresses import Address
from vsockrpc.agent.datachannel import TICKET_LINE_MAX, TICKET_TTL, new_ticket, parse_ticket_line
from vsockrpc.errors import VsockRpcError
from vsockrpc.services.agent._status import Code, Status

log = logging.getLogger("vsockrpc.agent.data")

IDLE_TIMEOUT = 60.0
"""Seconds a taken data connection may go without moving a byte before the transfer fails."""


class DataSockets(Protocol):
    """The socket operations data channels need (:mod:`vsockrpc.transport` provides them)."""

    def callback_address(self, peer: Address, socket_path: Callable[[], str]) -> Address | None: ...

    def listen(self, address: Address, *, backlog: int = 128) -> socket.socket: ...

    def listening_address(self, address: Address, listener: socket.socket) -> Address: ...

    def accepted_peer(
        self, listening: Address, conn: socket.socket, peer: object
    ) -> Address | None: ...


class _Listener:
    def __init__(
        self, sock: socket.socket, address: Address, sockets: DataSockets, hub: DataChannels
    ) -> None:
        self.sock = sock
        self.address = address  # as listened on, the port filled in
        self._sockets = sockets
        self._hub = hub
        self._thread = threading.Thread(target=self._accept, name="agent-data", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._hub.register,
                args=(conn, self._sockets.accepted_peer(self.address, conn, peer)),
                name="agent-data-conn",
                daemon=True,
            ).start()


def _remove_own_dir(path: str, creator: int) -> None:
    """Remove the data channels' directory, only in the process that made it (a forked child
    exiting through Python's exit handlers must not take its parent's socket away)."""
    if os.getpid() == creator:
        shutil.rmtree(path, ignore_errors=True)


class DataChannels:
    """Listeners (one per address kind, opened on first use) and pending connections."""

    def __init__(
        self, admits: Callable[[Address | None], bool], sockets: DataSockets | None = None
    ) -> None:
        self._admits = admits
        self._sockets = sockets
        self._lock = threading.Condition()
        self._listeners: dict[str, _Listener] = {}  # by scheme
        self._unix_dir: str | None = None
        self._remove_unix_dir: weakref.finalize[Any, Any] | None = None
        self._tickets: dict[str, float] = {}  # issued, not connected yet: expiry
        self._ready: dict[str, tuple[socket.socket, float]] = {}  # connected, not taken: expiry

    def open(self, peer: Address | None) -> tuple[int, str, str]:
        """(vsock_port, unix_path, ticket) of a channel for a caller at ``peer``."""
        sockets = self._sockets
        with self._lock:
            address = None
            if sockets is not None and peer is not None:
                address = sockets.callback_address(peer, self._unix_path)
            if sockets is None or address is None:
                raise Status(
                    Code.FAILED_PRECONDITION,
                    f"no data channel for peer {peer}: send the data in-band",
                )
            listener = self._listeners.get(address.scheme)
            if listener is None:
                try:
                    sock = sockets.listen(address, backlog=16)
                except VsockRpcError as err:
                    raise Status(Code.FAILED_PRECONDITION, f"data listener: {err}") from err
                bound = sockets.listening_address(address, sock)
                listener = self._listeners[address.scheme] = _Listener(sock, bound, sockets, self)
            # The reply names a port (vsock) or a socket path (Unix): whichever the kind has.
            port = getattr(listener.address, "port", 0)
            path = getattr(listener.address, "path", "")
            ticket = new_ticket()
            self._tickets[ticket] = time.monotonic() + TICKET_TTL
            self._prune()
        return port, path, ticket

    def _unix_path(self) -> str:
        if self._unix_dir is None:
            self._unix_dir = tempfile.mkdtemp(prefix="vsockrpc-data-")  # 0700: only us
            # Removed by close(), or else when this object is collected or the process exits:
            # an agent stopped by SIGTERM never closed its servicers and left the directory
            # and its socket in the temporary directory.
            self._remove_unix_dir = weakref.finalize(
                self, _remove_own_dir, self._unix_dir, os.getpid()
            )
        return os.path.join(self._unix_dir, "data.sock")

    def register(self, conn: socket.socket, peer: Address | None) -> None:
        """A new connection: check its peer, read its ticket line, park it for :meth:`take`."""
        try:
            if not self._admits(peer):
                log.warning("refused data connection from %s", peer)
                conn.close()
                return
            conn.settimeout(10)
            line = b""
            while not line.endswith(b"\n") and len(line) < TICKET_LINE_MAX:
                chunk = conn.recv(TICKET_LINE_MAX - len(line))
                if not chunk:
                    break
                line += chunk
            conn.settimeout(None)
            ticket = parse_ticket_line(line)
            with self._lock:
                expiry = self._tickets.pop(ticket, None)
                if expiry is None or expiry < time.monotonic():
                    log.warning("data connection with an unknown or expired ticket")
                    conn.close()
                    return
                self._ready[ticket] = (conn, time.monotonic() + TICKET_TTL)
                self._lock.notify_all()
        except OSError as err:
            log.info("data connection failed: %s", err)
            conn.close()

    def take(self, ticket: str, timeout: float = 30.0) -> socket.socket:
        """The connection that presented ``ticket`` (waits for it); single use."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while ticket not in self._ready:
                if ticket not in self._tickets:
                    raise Status(Code.NOT_FOUND, "unknown or used data channel ticket")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._tickets.pop(ticket, None)
                    raise Status(Code.DEADLINE_EXCEEDED, "the data channel was never connected")
                self._lock.wait(remaining)
            conn, _expiry = self._ready.pop(ticket)
        # A peer that stops sending or reading must not hold the server's worker for good.
        conn.settimeout(IDLE_TIMEOUT)
        return conn

    def discard(self, ticket: str) -> None:
        """Forget ``ticket`` and close its connection if it was never taken (the call failed
        first, e.g. a download of a missing file); nothing if it was taken."""
        with self._lock:
            self._tickets.pop(ticket, None)
            parked = self._ready.pop(ticket, None)
        if parked is not None:
            parked[0].close()

    def _prune(self) -> None:
        """Drop expired tickets, and close connections parked past their expiry (their call
        never came to take them)."""
        now = time.monotonic()
        for ticket in [t for t, expiry in self._tickets.items() if expiry < now]:
            del self._tickets[ticket]
        for ticket in [t for t, (_, expiry) in self._ready.items() if expiry < now]:
            self._ready.pop(ticket)[0].close()

    def close(self) -> None:
        with self._lock:
            for listener in self._listeners.values():
                with contextlib.suppress(OSError):
                    listener.sock.shutdown(socket.SHUT_RDWR)
                listener.sock.close()
            for conn, _expiry in self._ready.values():
                conn.close()
            self._ready.clear()
            self._listeners.clear()
            if self._remove_unix_dir is not None:
                self._remove_unix_dir()
                self._remove_unix_dir = self._unix_dir = None
