"""Which local users may call the agent over a Unix socket: the uid half of :class:`PeerPolicy`.

A Unix-socket caller's uid comes from ``SO_PEERCRED``, set by the kernel at ``connect()``; the
server conveys it when it relays its Unix addresses (``rpc.serve(..., peer_credentials=True)``,
as ``vsockrpc serve --agent`` and the guest agent do), and whoever starts the server injects a
:data:`UidResolver` reading it (:func:`vsockrpc.services.served` builds one from the
:func:`vsockrpc.rpc.peer_credentials` it is given). By default the agent admits root and the
user it runs as: whoever else can open the socket file still gets ``PERMISSION_DENIED``. When
the uid is unknown (grpcio's own Unix listener, which tells Python nothing about the peer), only
the socket file's mode protects the agent, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc

__all__ = ["UidResolver", "default_allowed_uids", "uid_admitted"]

UidResolver = Callable[[grpc.ServicerContext], int | None]
"""The uid of a call's Unix-socket peer; None when unknown (or not a Unix peer)."""


def default_allowed_uids() -> frozenset[int]:
    """Root and the user the agent runs as."""
    return frozenset({0, os.geteuid()})


def uid_admitted(allowed: frozenset[int] | None, uid: int | None) -> bool:
    """``allowed=None`` admits every uid; an unknown uid is left to the socket's file mode."""
    return allowed is None or uid is None or uid in allowed
