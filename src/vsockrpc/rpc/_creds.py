"""Credentials of Unix-socket peers (``SO_PEERCRED``), carried through the server-side relay.

grpcio's own Unix listener tells a servicer nothing about the peer's user (``context.peer()`` is
just ``unix:``), so a server that must know it (the agent on a Unix socket) has the relay accept
the connection instead: the relay reads ``SO_PEERCRED`` from the accepted socket (unix(7): the
credentials of the peer process at ``connect()`` time, set by the kernel, unforgeable) and
conveys them the same way it conveys vsock peers: in the name of its inner client socket,
``c17-unix-<uid>-<gid>-<pid>``, bound in the server's private ``0700`` directory (see
:mod:`vsockrpc.rpc._peers`). :func:`peer_credentials` decodes them for a call.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass

__all__ = ["PeerCredentials", "credentials_name", "parse_credentials_name", "read_peer_credentials"]

_UCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} (socket(7))
_NAME = re.compile(r"c\d+-unix-(\d+)-(\d+)-(\d+)")


@dataclass(frozen=True)
class PeerCredentials:
    """The user, group and process of a Unix-socket peer, as the kernel recorded them."""

    uid: int
    gid: int
    pid: int


def read_peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a connected Unix socket; None for other families."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(uid=uid, gid=gid, pid=pid)


def credentials_name(serial: int, creds: PeerCredentials) -> str:
    """The inner client socket's file name that conveys ``creds``."""
    return f"c{serial}-unix-{creds.uid}-{creds.gid}-{creds.pid}"


def parse_credentials_name(name: str) -> PeerCredentials | None:
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return PeerCredentials(uid=int(match[1]), gid=int(match[2]), pid=int(match[3]))
