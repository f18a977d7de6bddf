"""Sockets for every address form, and what each address kind does: one module per kind.

Every kind (:mod:`~vsockrpc.transport.vsock`, :mod:`~vsockrpc.transport.hybrid`,
:mod:`~vsockrpc.transport.unix`, :mod:`~vsockrpc.transport.tcp`) implements :class:`Transport`;
:func:`transport_for` picks it for an address, and the functions below dispatch to it, so no
caller branches on the kind of an address:

- :func:`connect` / :func:`listen` — a connected, blocking socket / a bound, listening one;
- :func:`grpc_target` / :func:`prepare_grpc_listen` — how grpcio reaches or binds an address
  itself (None: it can't, relay instead) — and :func:`bound_address` /
  :func:`listening_address`, the address once bound (a port 0 filled in);
- :func:`accepted_peer` — the address of a peer accepted on a listener;
- :func:`sibling` — the same peer on another port (or socket path);
- :func:`callback_address` — where to listen so that a caller can connect back to us.

Dialing is injectable: code that opens connections takes a :class:`Dialer` (an object with
``connect(address, *, timeout)``), :data:`DEFAULT_DIALER` by default.

``connect``'s ``timeout`` bounds the connect and, for hybrid vsock, the ``CONNECT``/``OK``
handshake. Errors are mapped to :mod:`vsockrpc.errors`:
:class:`~vsockrpc.errors.NotReadyError` (refused, no socket file, EOF before ``OK``: retry),
:class:`~vsockrpc.errors.TransportTimeout`, :class:`~vsockrpc.errors.ConnectError`,
:class:`~vsockrpc.errors.TransportError`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from vsockrpc.addresses import Address, HybridAddress, parse_address
from vsockrpc.transport import hybrid, tcp, unix, vsock
from vsockrpc.transport._base import Dialer, Transport

__all__ = [
    "DEFAULT_DIALER",
    "Dialer",
    "SocketDialer",
    "Transport",
    "accepted_peer",
    "bound_address",
    "callback_address",
    "connect",
    "dial_for",
    "grpc_target",
    "hybrid",
    "listen",
    "listening_address",
    "prepare_grpc_listen",
    "sibling",
    "tcp",
    "transport_for",
    "unix",
    "vsock",
]

_TRANSPORTS: dict[str, Transport[Any]] = {
    kind.scheme: kind for kind in (vsock.TRANSPORT, hybrid.TRANSPORT, unix.TRANSPORT, tcp.TRANSPORT)
}


def transport_for(address: Address) -> Transport[Any]:
    """The :class:`Transport` of ``address``'s kind."""
    return _TRANSPORTS[address.scheme]


def connect(address: Address | str, *, timeout: float | None = None) -> socket.socket:
    """A connected socket to ``address`` (see the module docstring for errors)."""
    parsed = parse_address(address)
    return transport_for(parsed).connect(parsed, timeout=timeout)


def listen(address: Address | str, *, backlog: int = 128) -> socket.socket:
    """A bound, listening socket on ``address``."""
    parsed = parse_address(address)
    return transport_for(parsed).listen(parsed, backlog=backlog)


def listening_address(address: Address, listener: socket.socket) -> Address:
    """``address`` as ``listener`` (from :func:`listen`) is reached: a port 0 filled in."""
    bound: Address = transport_for(address).listening_address(address, listener)
    return bound


def grpc_target(address: Address) -> str | None:
    """grpcio's target for dialing ``address``, None when only a relay can (hybrid vsock).
    Whether the installed grpcio supports the target's scheme is for the caller to check."""
    return transport_for(address).grpc_target(address)


def prepare_grpc_listen(address: Address) -> str | None:
    """The target for grpcio's ``add_insecure_port`` (a stale socket file removed first), None
    when grpcio can't bind ``address`` (then :func:`listen` and relay)."""
    return transport_for(address).prepare_grpc_listen(address)


def bound_address(address: Address, port: int) -> Address:
    """``address`` after grpcio bound it and returned ``port``."""
    bound: Address = transport_for(address).bound_address(address, port)
    return bound


def accepted_peer(listening: Address, conn: socket.socket, peer: object) -> Address | None:
    """The peer of ``conn``, which a listener on ``listening`` accepted (``conn, peer =
    listener.accept()``); None when that kind of listener can't know it."""
    return transport_for(listening).accepted_peer(conn, peer)


def sibling(address: Address, *, port: int = 0, path: str = "") -> Address | None:
    """The same peer as ``address`` on another ``port`` (vsock, hybrid, TCP) or at another
    socket ``path`` (Unix); None when what is given does not apply to ``address``'s kind."""
    return transport_for(address).sibling(address, port=port, path=path)


def callback_address(peer: Address, socket_path: Callable[[], str]) -> Address | None:
    """Where to listen so that ``peer`` can open another connection to us (vsock: any CID,
    a kernel-picked port; Unix: ``socket_path()``); None for kinds that can't call back."""
    return transport_for(peer).callback_address(peer, socket_path)


class SocketDialer:
    """The default :class:`Dialer`: a real socket from the address kind's transport."""

    def connect(self, address: Address, *, timeout: float | None = None) -> socket.socket:
        return transport_for(address).connect(address, timeout=timeout)

    def __repr__(self) -> str:
        return "SocketDialer()"


DEFAULT_DIALER: Dialer = SocketDialer()


def dial_for(
    dialer: Dialer, address: Address, stream: socket.socket, *, timeout: float | None = None
) -> tuple[socket.socket, bool]:
    """Open ``address`` for ``stream``, an accepted connection a relay would pump to it:
    ``(sock, False)`` to relay between them, or ``(lifeline, True)`` when the far end took
    ``stream`` itself (a hybrid device that knows passed streams, as ours does:
    :func:`hybrid.connect_passing`). Only real sockets can be passed, so a custom ``dialer``
    always gets the first form."""
    if isinstance(dialer, SocketDialer) and isinstance(address, HybridAddress):
        return hybrid.connect_passing(address, stream, timeout=timeout)
    return dialer.connect(address, timeout=timeout), False
