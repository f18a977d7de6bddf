"""TCP (IPv4/IPv6). Connected sockets get TCP_NODELAY: gRPC frames are small and latency-bound."""

from __future__ import annotations

import socket
from collections.abc import Callable

from vsockrpc.addresses import Address, TcpAddress
from vsockrpc.errors import TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

__all__ = ["TRANSPORT", "TcpTransport", "connect", "listen"]


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


class TcpTransport:
    """``tcp:HOST:PORT``: grpcio dials and binds it itself."""

    scheme = "tcp"

    def connect(self, address: TcpAddress, *, timeout: float | None = None) -> socket.socket:
        return connect(address, timeout=timeout)

    def listen(self, address: TcpAddress, *, backlog: int = 128) -> socket.socket:
        return listen(address, backlog=backlog)

    def listening_address(self, address: TcpAddress, listener: socket.socket) -> TcpAddress:
        return TcpAddress(address.host, int(listener.getsockname()[1]))

    def grpc_target(self, address: TcpAddress) -> str | None:
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{host}:{address.port}"

    def prepare_grpc_listen(self, address: TcpAddress) -> str | None:
        return self.grpc_target(address)

    def bound_address(self, address: TcpAddress, port: int) -> TcpAddress:
        return TcpAddress(address.host, port)

    def accepted_peer(self, conn: socket.socket, peer: object) -> Address | None:
        if isinstance(peer, tuple) and len(peer) >= 2:
            return TcpAddress(str(peer[0]), int(peer[1]))
        return None

    def sibling(self, address: TcpAddress, *, port: int = 0, path: str = "") -> Address | None:
        return TcpAddress(address.host, port) if port else None

    def callback_address(self, peer: TcpAddress, socket_path: Callable[[], str]) -> Address | None:
        return None  # anything that reaches a port would get in: no call-back over TCP


TRANSPORT = TcpTransport()
