"""Raw data channels: bulk file bytes outside HTTP/2 and protobuf.

gRPC in Python costs several copies and a lot of CPU per byte; in an emulated guest that caps
transfers far below what the vsock device carries. For a large transfer the client asks for a
data channel (``Files.OpenDataChannel``), connects a plain socket to the port (or path) it is
given — over the same transport it reached the agent on — and sends the single-use ticket and
a newline. The Upload/Download call then names the ticket: header and trailer (size, checksum)
stay on the gRPC stream, the bytes flow on the socket. Design after Apple's vminitd, which
copies files on a separate vsock stream.

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
from collections.abc import Callable

from vsockrpc.addresses import Address, UnixAddress, VsockAddress
from vsockrpc.agent.datachannel import TICKET_LINE_MAX, TICKET_TTL, new_ticket, parse_ticket_line
from vsockrpc.services.agent._status import Code, Status

log = logging.getLogger("vsockrpc.agent.data")

_VMADDR_CID_ANY = 0xFFFFFFFF
_VMADDR_PORT_ANY = 0xFFFFFFFF


class _Listener:
    def __init__(self, sock: socket.socket, hub: DataChannels) -> None:
        self.sock = sock
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
                target=self._hub.register, args=(conn, peer), name="agent-data-conn", daemon=True
            ).start()


class DataChannels:
    """Listeners (one per transport family, opened on first use) and pending connections."""

    def __init__(self, admits: Callable[[Address | None], bool]) -> None:
        self._admits = admits
        self._lock = threading.Condition()
        self._vsock: _Listener | None = None
        self._unix: _Listener | None = None
        self._unix_dir: str | None = None
        self._tickets: dict[str, float] = {}  # issued, not connected yet: expiry
        self._ready: dict[str, socket.socket] = {}  # connected, not taken yet

    def open(self, peer: Address | None) -> tuple[int, str, str]:
        """(vsock_port, unix_path, ticket) of a channel for a caller at ``peer``."""
        with self._lock:
            if isinstance(peer, VsockAddress):
                if self._vsock is None:
                    self._vsock = _Listener(self._listen_vsock(), self)
                port, path = int(self._vsock.sock.getsockname()[1]), ""
            elif isinstance(peer, UnixAddress):
                if self._unix is None:
                    self._unix = _Listener(self._listen_unix(), self)
                port, path = 0, str(self._unix.sock.getsockname())
            else:
                raise Status(
                    Code.FAILED_PRECONDITION,
                    f"no data channel for peer {peer}: send the data in-band",
                )
            ticket = new_ticket()
            self._tickets[ticket] = time.monotonic() + TICKET_TTL
            self._prune()
        return port, path, ticket

    @staticmethod
    def _listen_vsock() -> socket.socket:
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as err:
            raise Status(Code.FAILED_PRECONDITION, f"no AF_VSOCK: {err}") from err
        try:
            sock.bind((_VMADDR_CID_ANY, _VMADDR_PORT_ANY))  # the kernel picks a free port
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise Status(Code.FAILED_PRECONDITION, f"data listener: {err}") from err
        return sock

    def _listen_unix(self) -> socket.socket:
        self._unix_dir = tempfile.mkdtemp(prefix="vsockrpc-data-")  # 0700: only us
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.path.join(self._unix_dir, "data.sock"))
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise Status(Code.FAILED_PRECONDITION, f"data listener: {err}") from err
        return sock

    def register(self, conn: socket.socket, peer: object) -> None:
        """A new connection: check its peer, read its ticket line, park it for :meth:`take`."""
        try:
            if conn.family == socket.AF_VSOCK and isinstance(peer, tuple):
                address: Address | None = VsockAddress(int(peer[0]), int(peer[1]))
                if not self._admits(address):
                    log.warning("refused data connection from %s", address)
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
                self._ready[ticket] = conn
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
            return self._ready.pop(ticket)

    def _prune(self) -> None:
        now = time.monotonic()
        for ticket in [t for t, expiry in self._tickets.items() if expiry < now]:
            del self._tickets[ticket]

    def close(self) -> None:
        with self._lock:
            for listener in (self._vsock, self._unix):
                if listener is not None:
                    with contextlib.suppress(OSError):
                        listener.sock.shutdown(socket.SHUT_RDWR)
                    listener.sock.close()
            for conn in self._ready.values():
                conn.close()
            self._ready.clear()
            self._vsock = self._unix = None
            if self._unix_dir is not None:
                shutil.rmtree(self._unix_dir, ignore_errors=True)
                self._unix_dir = None
