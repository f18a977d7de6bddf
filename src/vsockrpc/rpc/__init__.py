"""grpcio glue: serve on and dial any :mod:`vsockrpc.addresses` address.

- :func:`serve` — a started server on one or more addresses (a context manager).
- :func:`channel` — a grpcio channel to an address (a context manager).
- :func:`native_vsock_supported` — whether grpcio speaks ``vsock:`` itself; when it does not
  (PyPI wheels), vsock and hybrid-vsock traffic goes through a relay (:mod:`vsockrpc.rpc._relay`).
- :func:`peer_address` — the original peer of a call, also through the relay.
- :func:`peer_credentials` — the uid/gid/pid of a Unix-socket caller (``SO_PEERCRED``), when the
  server relays its Unix addresses (``serve(..., peer_credentials=True)``).
- :class:`ConnectionLimits` — what a server-side relay admits (caps per peer and in all, idle
  time before the first byte, a reserve for the host).
- :func:`wait_until_ready` / :func:`channel_ready` — wait with backoff for a server to come up.
- :func:`vsockrpc.rpc.aio.channel` — the same channel for ``grpc.aio``.
"""

from __future__ import annotations

import grpc

from vsockrpc.addresses import Address
from vsockrpc.rpc._creds import PeerCredentials
from vsockrpc.rpc._limits import ConnectionLimits
from vsockrpc.rpc._native import native_vsock_supported
from vsockrpc.rpc._peers import parse_peer, parse_peer_credentials
from vsockrpc.rpc.channel import (
    RETRY_OPTIONS,
    RelayChannel,
    channel,
    channel_ready,
    wait_until_ready,
)
from vsockrpc.rpc.server import Server, serve

__all__ = [
    "RETRY_OPTIONS",
    "ConnectionLimits",
    "PeerCredentials",
    "RelayChannel",
    "Server",
    "channel",
    "channel_ready",
    "native_vsock_supported",
    "peer_address",
    "peer_credentials",
    "serve",
    "wait_until_ready",
]


def peer_address(context: grpc.ServicerContext) -> Address | None:
    """The original peer of the call: e.g. ``VsockAddress(cid=2, port=...)`` for a host client
    that came through the relay, ``TcpAddress`` for TCP; None when unknown."""
    return parse_peer(context.peer())


def peer_credentials(context: grpc.ServicerContext) -> PeerCredentials | None:
    """``SO_PEERCRED`` (uid, gid, pid) of a Unix-socket caller that came through the relay of a
    ``serve(..., peer_credentials=True)`` server; None for other callers."""
    return parse_peer_credentials(context.peer())
