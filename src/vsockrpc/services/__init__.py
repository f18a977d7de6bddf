"""gRPC services. :func:`served` lists what the agent process serves (vsockrpc's agent, an
image spec's user services, or both), given the peer lookups and sockets of whoever starts the
server; :func:`addition_services` what ``vsockrpc serve`` serves without ``--agent``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc

from vsockrpc.services import addition

if TYPE_CHECKING:
    from vsockrpc.services.agent.datachannel import DataSockets
    from vsockrpc.services.agent.peers import PeerPolicy, PeerResolver

__all__ = ["ADDITION_SERVICE_NAME", "CredentialsLookup", "addition_services", "served"]

Registrar = Callable[[grpc.Server], None]

ADDITION_SERVICE_NAME = "popovicu_vsock.VsockService"


class _HasUid(Protocol):
    @property
    def uid(self) -> int: ...


CredentialsLookup = Callable[[grpc.ServicerContext], _HasUid | None]
"""The ``SO_PEERCRED`` of a call's Unix-socket peer, None when unknown (e.g.
:func:`vsockrpc.rpc.peer_credentials`)."""


def addition_services(*, access_log: bool = False) -> list[Registrar]:
    """Addition plus health and reflection: nothing that reads, writes or runs anything."""
    from vsockrpc.services.agent import health_and_reflection

    return [
        addition.registrar(access_log=access_log),
        health_and_reflection([ADDITION_SERVICE_NAME]),
    ]


def served(
    *,
    peer_address: PeerResolver,
    peer_credentials: CredentialsLookup,
    sockets: DataSockets,
    agent: bool = True,
    extra: Sequence[Registrar] = (),
    extra_names: Sequence[str] = (),
    access_log: bool = False,
    policy: PeerPolicy | None = None,
) -> list[Registrar]:
    """Registrars for :func:`vsockrpc.rpc.serve`: what the agent process serves.

    With ``agent`` (the default): Addition and the agent (Exec, Files, System), each agent call
    admitted by ``policy`` (default :meth:`PeerPolicy.from_env
    <vsockrpc.services.agent.PeerPolicy.from_env>`) by the caller ``peer_address`` finds and,
    for a Unix caller, the uid ``peer_credentials`` finds; ``sockets`` opens the agent's raw
    data channels. Whoever starts the server injects those three (the guest's server and
    ``vsockrpc serve --agent`` pass :func:`vsockrpc.rpc.peer_address`,
    :func:`vsockrpc.rpc.peer_credentials` and :mod:`vsockrpc.transport`). ``access_log`` logs
    one line per Addition call.

    Then the ``extra`` registrars (e.g. an image spec's user services), and last health and
    reflection naming every service served: ours and ``extra_names``, which is read only when
    the server registers, after the ``extra`` registrars ran (so they may add the names of the
    services they register to it).
    """
    from vsockrpc.services.agent import (
        AGENT_SERVICE_NAMES,
        agent_services,
        health_and_reflection,
    )

    own: list[Registrar] = []
    own_names: list[str] = []
    if agent:

        def peer_uid(context: grpc.ServicerContext) -> int | None:
            credentials = peer_credentials(context)
            return None if credentials is None else credentials.uid

        own = [
            addition.registrar(access_log=access_log, peer=peer_address),
            *agent_services(
                peer_resolver=peer_address, uid_resolver=peer_uid, sockets=sockets, policy=policy
            ),
        ]
        own_names = [ADDITION_SERVICE_NAME, *AGENT_SERVICE_NAMES]

    def health(server: grpc.Server) -> None:
        health_and_reflection([*own_names, *extra_names])(server)

    return [*own, *extra, health]
