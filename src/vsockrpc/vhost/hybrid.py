"""The host side of hybrid vsock (Firecracker ``docs/vsock.md``, rust-vmm vhost-device-vsock):
host clients on the device's Unix socket and the ``CONNECT <port>\\n`` handshake, plus the
``<uds_path>_<port>`` sockets that guest-initiated connections reach.

A client is *pending* from ``accept`` until its command line is complete. What it sends is
consumed into a per-client buffer as it arrives: the listener fd is level-triggered, so bytes
that were only peeked at would be reported again and again (a client that sent ``C`` and waited
kept the loop at 100 % of a core). Only the bytes up to and including ``\\n`` are taken; payload
sent right behind the command stays queued in the socket for the data path.

*Passed streams* (our extension, for :mod:`vsockrpc.forward` and the gRPC relay): a client
that already holds the stream the guest should reach (a forwarder's accepted TCP connection)
sends it with its ``CONNECT <port>\\n`` as ``SCM_RIGHTS``, and we answer ``OK <n> PASSED\\n``:
from then the bytes flow between that socket and the guest with no relay process in between.
The client's own connection stays open as the stream's *lifeline*: it carries nothing more, and
when either side closes it the other ends the stream (a forwarder stopping breaks its streams;
a device exiting closes them). A device that does not know the extension (Firecracker, Cloud
Hypervisor, vhost-device-vsock) reads the line without ancillary data, so the kernel discards
the fd, and answers plain ``OK <n>``: the client then relays as before.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vsockrpc.vhost.paths import close_fds
from vsockrpc.vhost.reactor import IN, Reactor


def read_line_step(
    sock: socket.socket, line: bytearray, limit: int, fds: list[int] | None = None
) -> bool | None:
    """One read of a newline-terminated handshake line from a non-blocking ``sock`` into
    ``line``, never consuming a byte past the newline (what follows is the stream's own data):
    True once the line is complete, False while more may come, None when the peer closed or
    failed first or the line passed ``limit`` bytes. Shared by ``CONNECT <port>`` (here) and the
    devices' ``SIBLING`` line (:mod:`.sibling`). ``fds``: file descriptors passed with the line
    are appended there (at most :data:`MAX_PASSED`; None once more came); without it the kernel
    discards any."""
    try:
        peek = sock.recv(limit - len(line), socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        peek = b""
    if not peek:  # EOF or an error before a full line
        return None
    nl = peek.find(b"\n")
    size = len(peek) if nl < 0 else nl + 1  # no newline yet: every peeked byte is the line's
    try:
        if fds is None:
            line += sock.recv(size)
        else:
            data, passed, msg_flags, _ = socket.recv_fds(
                sock, size, MAX_PASSED, socket.MSG_CMSG_CLOEXEC
            )
            fds += passed
            line += data
            if msg_flags & socket.MSG_CTRUNC or len(fds) > MAX_PASSED:
                return None  # the kernel closed what did not fit; the caller closes the rest
    except OSError:
        return None
    if nl >= 0:
        return True
    return None if len(line) >= limit else False


__all__ = [
    "CONNECT_TIMEOUT",
    "PASSED_REPLY",
    "HybridHost",
    "PendingClient",
    "parse_connect",
    "passed_stream",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # seconds a client has to send its command line (and the guest to answer)
MAX_COMMAND = 64  # "CONNECT 4294967295\n" is 19 bytes
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_U32 = 0xFFFFFFFF
MAX_PASSED = 1  # file descriptors a client may pass with its CONNECT line: its stream
PASSED_REPLY = "OK {port} PASSED\n"  # the answer to a CONNECT that passed its stream
_PASSABLE_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)

#: Called with the stream of a client whose command line named guest ``port`` and, when the
#: client passed that stream, the client's own connection (the lifeline); takes ownership of
#: both.
OnConnect = Callable[[socket.socket, int, socket.socket | None], None]


@dataclass(slots=True)
class PendingClient:
    """A client connection until its first line is complete (here a ``CONNECT``; the group
    host's joins too), with the fds passed so far, which are ours to close."""

    sock: socket.socket
    deadline: float  # monotonic: rejected (closed) if the line is not complete by then
    line: bytearray = field(default_factory=bytearray)  # the command line received so far
    fds: list[int] = field(default_factory=list)  # passed with the line (the client's stream)

    def close(self) -> None:
        self.sock.close()
        close_fds(self.fds)
        self.fds = []


def passed_stream(fds: list[int]) -> socket.socket | None:
    """The stream a client passed (non-blocking, ours to close), or None, every fd closed,
    unless ``fds`` is exactly one connected stream socket of a family we relay (Unix, TCP): a
    pipe, a datagram, listening or unconnected socket passed as a stream is refused like a bad
    line."""
    sock = None
    if len(fds) == 1:
        try:
            sock = socket.socket(fileno=fds[0])  # ENOTSOCK for anything but a socket
        except OSError:
            sock = None
    if sock is None:
        close_fds(fds)
        return None
    try:
        ok = (
            sock.family in _PASSABLE_FAMILIES
            and sock.type == socket.SOCK_STREAM
            and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
        if ok:
            sock.getpeername()  # ENOTCONN for a socket that was never connected
            sock.setblocking(False)
            return sock
    except OSError:
        pass
    sock.close()
    return None


class HybridHost:
    """Accepts host clients on the hybrid socket and reads their ``CONNECT`` lines."""

    def __init__(self, reactor: Reactor, uds_path: str, on_connect: OnConnect) -> None:
        self.reactor = reactor
        self.uds_path = uds_path
        self._on_connect = on_connect
        self._clients: dict[int, PendingClient] = {}  # fd → client awaiting its command line

    # ------------------------------------------------------------------ host-initiated
    def on_listener(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep serving the rest
                log.warning("hybrid accept failed: %s", str(err))
                return
            sock.setblocking(False)
            fd = sock.fileno()
            self._clients[fd] = PendingClient(sock, time.monotonic() + CONNECT_TIMEOUT)
            self.reactor.register(fd, IN, functools.partial(self._on_client_event, fd))

    def _on_client_event(self, fd: int, mask: int) -> None:
        self._on_client(fd)

    def _on_client(self, fd: int) -> None:
        """Consume what arrived of ``CONNECT <port>\\n``, never a byte past the newline."""
        client = self._clients[fd]
        sock = client.sock
        done = read_line_step(sock, client.line, MAX_COMMAND, client.fds)
        if done is None:
            self._reject(fd)
            return
        if not done:
            return
        del self._clients[fd]
        self.reactor.unregister(fd)
        port = parse_connect(bytes(client.line))
        if port is None:
            client.close()  # garbage: EOF without a message
            return
        if not client.fds:
            self._on_connect(sock, port, None)
            return
        stream = passed_stream(client.fds)
        client.fds = []
        if stream is None:
            log.info("hybrid client passed something other than a stream socket: refused")
            sock.close()
            return
        self._on_connect(stream, port, sock)

    def _reject(self, fd: int) -> None:
        client = self._clients.pop(fd)
        self.reactor.unregister(fd)
        client.close()

    # ------------------------------------------------------------------ timers
    def has_timers(self) -> bool:
        return bool(self._clients)

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._clients.values()), default=None)

    def expire(self, now: float) -> None:
        for fd in [fd for fd, c in self._clients.items() if c.deadline <= now]:
            self._reject(fd)

    def close(self) -> None:
        for fd in list(self._clients):
            self._reject(fd)

    # ------------------------------------------------------------------ guest-initiated
    def open_port(self, port: int) -> socket.socket | None:
        """Connect to ``<uds_path>_<port>`` (non-blocking), or None if nothing listens there."""
        path = f"{self.uds_path}_{port}"
        if len(path.encode()) > SUN_PATH_MAX:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as err:
            # ENOENT/ECONNREFUSED: nobody listens. EAGAIN: backlog full. The caller answers RST
            # at once, so the guest's connect() fails instead of hanging (unlike
            # vhost-device-vsock, which forgets the RST).
            log.debug("guest connect to %s failed: %s", path, errno.errorcode.get(err.errno or 0))
            sock.close()
            return None
        return sock


def parse_connect(line: bytes) -> int | None:
    """``CONNECT <port>\\n`` (or ``connect``) → port, else None."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0].upper() != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= _U32 else None
