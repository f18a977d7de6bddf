"""What the agent process serves, composed as its starters compose it (the guest's server,
``vsockrpc serve --agent``): :func:`vsockrpc.services.served` with rpc's peer lookups and
transport's sockets."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from vsockrpc import rpc, transport
from vsockrpc.services import served


def agent_registrars() -> list[Callable[[grpc.Server], None]]:
    return served(
        peer_address=rpc.peer_address, peer_credentials=rpc.peer_credentials, sockets=transport
    )
