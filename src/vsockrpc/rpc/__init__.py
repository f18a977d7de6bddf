"""grpcio glue: serve on and dial any :mod:`vsockrpc.addresses` address.

- :func:`serve` — a started server on one or more addresses (a context manager).
- :func:`channel` — a grpcio channel to an address (a context manager).
- :func:`native_vsock_supported` — whether grpcio speaks ``vsock:`` itself; when it does not
  (PyPI wheels), vsock and hybrid-vsock traffic goes through a relay (:mod:`vsockrpc.rpc._relay`).
- :func:`peer_address` — the original peer of a call, also through the relay.
- :func:`wait_until_ready` / :func:`channel_ready` — wait with backoff for a server to come up.
- :func:`vsockrpc.rpc.aio.channel` — the same channel for ``grpc.aio``.
"""

from __future__ import annotations

import grpc

from vsockrpc.addresses import Address
from vsockrpc.rpc._native import native_vsock_supported
from vsockrpc.rpc._peers import parse_peer
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
    "RelayChannel",
    "Server",
    "channel",
    "channel_ready",
    "native_vsock_supported",
    "peer_address",
    "serve",
    "wait_until_ready",
]


def peer_address(context: grpc.ServicerContext) -> Address | None:
    """The original peer of the call: e.g. ``VsockAddress(cid=2, port=...)`` for a host client
    that came through the relay, ``TcpAddress`` for TCP; None when unknown."""
    return parse_peer(context.peer())
