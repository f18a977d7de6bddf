"""Hybrid vsock: a guest port reached through the host-side Unix socket of a VMM's vsock device.

Firecracker, Cloud Hypervisor and vhost-user-vsock devices (ours included) speak the same text
handshake on their Unix socket: the client writes ``CONNECT <port>\\n`` and the device answers
``OK <n>\\n`` once the guest accepted, then forwards raw bytes. ``<n>`` is the host-side port the
device picked (Firecracker: from 2**30 up) or the guest port (vhost-device-vsock), so any
``OK <n>`` is accepted. The device closes the socket without a reply (or, in some versions,
writes an error line) when nothing listens on the guest port: that is :class:`NotReadyError`,
the caller retries with backoff (the guest may still be booting).

``listen`` implements the other direction: a guest connecting to CID 2 port ``P`` reaches the
host through ``<path>_<P>`` (Firecracker's convention), so we listen there.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from vsockrpc.addresses import SUN_PATH_MAX, Address, HybridAddress
from vsockrpc.errors import AddressError, NotReadyError, TransportTimeout
from vsockrpc.transport import unix
from vsockrpc.transport._errors import mapping_connect_errors

__all__ = [
    "MAX_REPLY",
    "TRANSPORT",
    "HybridTransport",
    "connect",
    "connect_passing",
    "listen",
    "listen_path_for",
    "parse_reply",
]

# "OK 4294967295\n" is 14 bytes; anything much longer is not a handshake reply.
MAX_REPLY = 64
PASSED = b"PASSED"  # "OK <n> PASSED": the device took the stream passed with CONNECT


def parse_reply(line: bytes) -> int | None:
    """The port in an ``OK <n>`` reply line (without ``\\n``), or None for anything else."""
    text = line.removesuffix(b"\r")
    if not text.startswith(b"OK "):
        return None
    digits = text[3:]
    if not digits or not digits.isdigit() or len(digits) > 10:
        return None
    return int(digits)


def _read_reply(sock: socket.socket, deadline: float | None, what: str) -> bytes:
    # Byte by byte: the device forwards guest bytes right after the "\n", and a larger recv()
    # would swallow them (this is what Firecracker's own clients do).
    line = bytearray()
    while True:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"timed out waiting for OK from {what}")
            sock.settimeout(remaining)
        try:
            byte = sock.recv(1)
        except TimeoutError as err:
            raise TransportTimeout(f"timed out waiting for OK from {what}") from err
        if not byte:
            reason = f"after {bytes(line)!r}" if line else "before OK"
            raise NotReadyError(
                f"{what}: device closed the connection {reason} (guest port not listening yet?)"
            )
        if byte == b"\n":
            return bytes(line)
        line += byte
        if len(line) > MAX_REPLY:
            raise NotReadyError(f"{what}: handshake reply too long: {bytes(line[:32])!r}...")


def _handshake(
    address: HybridAddress, timeout: float | None, passing: socket.socket | None
) -> tuple[socket.socket, bytes]:
    """Connect, send ``CONNECT <port>`` (with ``passing`` as SCM_RIGHTS) and read the reply line;
    the socket and the line (without its newline)."""
    what = str(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = unix.connect_path(address.path, timeout=timeout, what=what)
    try:
        with mapping_connect_errors(what):
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            command = f"CONNECT {address.port}\n".encode()
            if passing is None:
                sock.sendall(command)
            else:  # one sendmsg: a fresh Unix socket takes 20 bytes whole
                socket.send_fds(sock, [command], [passing.fileno()])
            line = _read_reply(sock, deadline, what)
            sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, line


def _not_ok(sock: socket.socket, address: HybridAddress, line: bytes) -> NotReadyError:
    sock.close()
    return NotReadyError(f"{address}: device answered {line[:MAX_REPLY]!r} instead of OK")


def connect(address: HybridAddress, *, timeout: float | None = None) -> socket.socket:
    """Connect to the guest port behind ``address``; ``timeout`` bounds the whole handshake."""
    sock, line = _handshake(address, timeout, None)
    if parse_reply(line) is None:
        raise _not_ok(sock, address, line)
    return sock


def connect_passing(
    address: HybridAddress, stream: socket.socket, *, timeout: float | None = None
) -> tuple[socket.socket, bool]:
    """Connect to the guest port behind ``address`` for ``stream``, a connected socket whose
    peer should reach it, offering the device ``stream`` itself (our device's extension:
    :mod:`vsockrpc.vhost.hybrid`, "Passed streams"). ``(lifeline, True)`` when the device took
    it: the bytes now flow between ``stream`` and the guest without us, and closing the lifeline
    ends that stream. ``(sock, False)`` when the device answered plain ``OK`` (it does not know
    the extension, and the kernel discarded the fd): relay between ``stream`` and ``sock``."""
    sock, line = _handshake(address, timeout, stream)
    reply, _, word = line.rpartition(b" ")
    if word == PASSED and parse_reply(reply) is not None:
        return sock, True
    if parse_reply(line) is None:
        raise _not_ok(sock, address, line)
    return sock, False


def listen_path_for(address: HybridAddress) -> str:
    """``<path>_<port>``: where the device connects when the guest dials CID 2 port ``port``."""
    path = f"{address.path}_{address.port}"
    if len(path.encode()) > SUN_PATH_MAX:
        raise AddressError(f"{path!r} (for {address}) is longer than {SUN_PATH_MAX} bytes")
    return path


def listen(address: HybridAddress, *, backlog: int = 128) -> socket.socket:
    """Listen where the device forwards guest connections to host port ``address.port``."""
    return unix.listen_path(listen_path_for(address), backlog=backlog, what=str(address))


class HybridTransport:
    """``hvsock:PATH:PORT``: no grpcio speaks the ``CONNECT`` handshake, so always relayed."""

    scheme = "hvsock"

    def connect(self, address: HybridAddress, *, timeout: float | None = None) -> socket.socket:
        return connect(address, timeout=timeout)

    def listen(self, address: HybridAddress, *, backlog: int = 128) -> socket.socket:
        return listen(address, backlog=backlog)

    def listening_address(self, address: HybridAddress, listener: socket.socket) -> HybridAddress:
        return address

    def grpc_target(self, address: HybridAddress) -> str | None:
        return None

    def prepare_grpc_listen(self, address: HybridAddress) -> str | None:
        return None

    def bound_address(self, address: HybridAddress, port: int) -> HybridAddress:
        return address

    def accepted_peer(self, conn: socket.socket, peer: object) -> Address | None:
        return None  # the device connected on the guest's behalf; its CID is not ours to know

    def sibling(self, address: HybridAddress, *, port: int = 0, path: str = "") -> Address | None:
        return HybridAddress(address.path, port) if port else None

    def callback_address(
        self, peer: HybridAddress, socket_path: Callable[[], str]
    ) -> Address | None:
        return None


TRANSPORT = HybridTransport()
