"""TCP (IPv4/IPv6). Connected sockets get TCP_NODELAY: gRPC frames are small and latency-bound."""

from __future__ import annotations

import socket

from vsockrpc.addresses import TcpAddress
from vsockrpc.errors import TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

__all__ = ["connect", "listen"]


def connect(address: TcpAddress, *, timeout: float | None = None) -> socket.socket:
    with mapping_connect_errors(str(address)):
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listen(address: TcpAddress, *, backlog: int = 128) -> socket.socket:
    what = str(address)
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as err:
        raise TransportError(f"cannot resolve {address.host!r} for {what}: {err}") from err
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        with mapping_listen_errors(what):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
