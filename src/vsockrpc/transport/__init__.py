"""Sockets for every address form: each module exposes ``connect`` and ``listen``.

``connect(address, timeout=...)`` returns a connected, blocking socket (``timeout`` bounds the
connect and, for hybrid vsock, the ``CONNECT``/``OK`` handshake). ``listen(address)`` returns a
bound, listening socket. Errors are mapped to :mod:`vsockrpc.errors`:
:class:`~vsockrpc.errors.NotReadyError` (refused, no socket file, EOF before ``OK``: retry),
:class:`~vsockrpc.errors.TransportTimeout`, :class:`~vsockrpc.errors.ConnectError`,
:class:`~vsockrpc.errors.TransportError`.
"""

from __future__ import annotations

import socket

from vsockrpc.addresses import (
    Address,
    HybridAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from vsockrpc.transport import hybrid, tcp, unix, vsock

__all__ = ["connect", "hybrid", "listen", "tcp", "unix", "vsock"]


def connect(address: Address | str, *, timeout: float | None = None) -> socket.socket:
    """A connected socket to ``address`` (see the module docstring for errors)."""
    parsed = parse_address(address)
    match parsed:
        case VsockAddress():
            return vsock.connect(parsed, timeout=timeout)
        case HybridAddress():
            return hybrid.connect(parsed, timeout=timeout)
        case UnixAddress():
            return unix.connect(parsed, timeout=timeout)
        case TcpAddress():
            return tcp.connect(parsed, timeout=timeout)


def listen(address: Address | str, *, backlog: int = 128) -> socket.socket:
    """A bound, listening socket on ``address``."""
    parsed = parse_address(address)
    match parsed:
        case VsockAddress():
            return vsock.listen(parsed, backlog=backlog)
        case HybridAddress():
            return hybrid.listen(parsed, backlog=backlog)
        case UnixAddress():
            return unix.listen(parsed, backlog=backlog)
        case TcpAddress():
            return tcp.listen(parsed, backlog=backlog)
