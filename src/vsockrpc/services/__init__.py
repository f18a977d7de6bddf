"""gRPC services. :func:`default_services` lists what the guest agent serves."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from vsockrpc.services import addition

__all__ = ["default_services"]


def default_services() -> list[Callable[[grpc.Server], None]]:
    """Service registrars for :func:`vsockrpc.rpc.serve`: everything the guest agent serves."""
    return [
        addition.register,
    ]
