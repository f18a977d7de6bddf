"""gRPC services. :func:`default_services` lists what the guest agent serves;
:func:`addition_services` what ``vsockrpc serve`` serves without ``--agent``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from vsockrpc.services import addition

if TYPE_CHECKING:
    from vsockrpc.services.agent import PeerPolicy

__all__ = ["ADDITION_SERVICE_NAME", "addition_services", "default_services", "peer_uid"]

Registrar = Callable[[grpc.Server], None]

ADDITION_SERVICE_NAME = "popovicu_vsock.VsockService"


def addition_services(*, access_log: bool = False) -> list[Registrar]:
    """Addition plus health and reflection: nothing that reads, writes or runs anything."""
    from vsockrpc.services.agent import health_and_reflection

    return [
        addition.registrar(access_log=access_log),
        health_and_reflection([ADDITION_SERVICE_NAME]),
    ]


def peer_uid(context: grpc.ServicerContext) -> int | None:
    """The uid of a Unix-socket caller the server's relay conveyed (``SO_PEERCRED``), else None:
    the agent's ``uid_resolver`` wherever vsockrpc starts it."""
    from vsockrpc.rpc import peer_credentials

    credentials = peer_credentials(context)
    return None if credentials is None else credentials.uid


def default_services(
    *, access_log: bool = False, policy: PeerPolicy | None = None
) -> list[Registrar]:
    """Service registrars for :func:`vsockrpc.rpc.serve`: everything the guest agent serves.

    ``access_log`` logs one line per Addition call; ``policy`` admits agent callers (default
    :meth:`PeerPolicy.from_env <vsockrpc.services.agent.PeerPolicy.from_env>`). The agent's
    peer lookups (address, and uid of a Unix caller) are injected here, from :mod:`vsockrpc.rpc`.
    """
    from vsockrpc import transport  # the agent's data-channel sockets are injected, here
    from vsockrpc.rpc import peer_address  # and so are its peer lookups
    from vsockrpc.services.agent import (
        AGENT_SERVICE_NAMES,
        agent_services,
        health_and_reflection,
    )

    return [
        addition.registrar(access_log=access_log),
        # Exec, Files, System; peers checked (VSOCKRPC_AGENT_ALLOWED_CIDS; Unix peers by uid)
        *agent_services(
            peer_resolver=peer_address, uid_resolver=peer_uid, sockets=transport, policy=policy
        ),
        health_and_reflection([ADDITION_SERVICE_NAME, *AGENT_SERVICE_NAMES]),
    ]
