"""gRPC services. :func:`default_services` lists what the guest agent serves."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from vsockrpc.services import addition

__all__ = ["default_services"]


def default_services() -> list[Callable[[grpc.Server], None]]:
    """Service registrars for :func:`vsockrpc.rpc.serve`: everything the guest agent serves."""
    from vsockrpc import transport  # the agent's data-channel sockets are injected, here
    from vsockrpc.rpc import peer_address  # and so is its peer lookup
    from vsockrpc.services.agent import (
        AGENT_SERVICE_NAMES,
        agent_services,
        health_and_reflection,
    )

    return [
        addition.register,
        # Exec, Files, System; peers checked (VSOCKRPC_AGENT_ALLOWED_CIDS)
        *agent_services(peer_resolver=peer_address, sockets=transport),
        health_and_reflection(["popovicu_vsock.VsockService", *AGENT_SERVICE_NAMES]),
    ]
