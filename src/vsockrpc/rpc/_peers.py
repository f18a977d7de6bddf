"""Conveying the original peer of a relayed connection to servicers.

The server-side relay connects to grpcio's private Unix socket from a client socket bound to a
path in the same private ``0700`` directory; the file name encodes the peer the relay accepted
(``c17-vsock-3-1034`` for CID 3 port 1034) and is unlinked right after ``connect()`` (the kernel
keeps the bound name, so grpcio's ``context.peer()`` still reports ``unix:<dir>/c17-vsock-3-1034``).
Only names in directories this process created are trusted: nobody else can bind there.
Unix-socket peers the relay accepted are named after their ``SO_PEERCRED`` the same way
(``c18-unix-1000-1000-4242``, see :mod:`vsockrpc.rpc._creds`).
"""

from __future__ import annotations

import itertools
import os
import re
import threading

from vsockrpc.addresses import Address, TcpAddress, UnixAddress, VsockAddress
from vsockrpc.rpc._creds import PeerCredentials, credentials_name, parse_credentials_name

__all__ = [
    "client_name",
    "parse_peer",
    "parse_peer_credentials",
    "trust_directory",
    "untrust_directory",
]

_trusted: set[str] = set()
_lock = threading.Lock()
_counter = itertools.count(1)
_VSOCK_NAME = re.compile(r"c\d+-vsock-(\d+)-(\d+)")


def trust_directory(path: str) -> None:
    with _lock:
        _trusted.add(path)


def untrust_directory(path: str) -> None:
    with _lock:
        _trusted.discard(path)


def client_name(
    directory: str, peer: Address | None, credentials: PeerCredentials | None = None
) -> str:
    """A fresh path in ``directory`` to bind the relay's inner client socket to."""
    serial = next(_counter)
    if credentials is not None:
        return os.path.join(directory, credentials_name(serial, credentials))
    if peer is not None and peer.scheme == "vsock":  # the only identity worth conveying
        return os.path.join(directory, f"c{serial}-vsock-{peer.cid}-{peer.port}")
    return os.path.join(directory, f"c{serial}")


def _unquote(text: str) -> str:
    """grpcio %-escapes peer strings; urllib.parse (≈0.15 s of a TCG guest's agent start) is
    imported only when an escape is there."""
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text)


def _parse_host_port(text: str) -> TcpAddress | None:
    host, sep, port = _unquote(text).rpartition(":")
    if not sep or not port.isdigit():
        return None
    return TcpAddress(host.removeprefix("[").removesuffix("]"), int(port))


def parse_peer(peer: str) -> Address | None:
    """The original peer behind grpcio's ``context.peer()`` string, None when unknown."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return _parse_host_port(rest)
    if scheme == "vsock":  # grpcio built with vsock: "vsock:CID:PORT"
        cid, _, port = rest.partition(":")
        return VsockAddress(int(cid), int(port)) if cid.isdigit() and port.isdigit() else None
    if scheme == "unix":
        path = _unquote(rest)
        directory, name = os.path.split(path)
        with _lock:
            trusted = directory in _trusted
        if trusted:
            match = _VSOCK_NAME.fullmatch(name)
            if match:
                return VsockAddress(int(match[1]), int(match[2]))
            # A Unix-socket client the relay accepted: unnamed, like a direct one.
            return UnixAddress("") if parse_credentials_name(name) else None
        return UnixAddress(path) if path else None
    return None


def parse_peer_credentials(peer: str) -> PeerCredentials | None:
    """The ``SO_PEERCRED`` the relay conveyed for ``context.peer()``; None when unknown."""
    scheme, _, rest = peer.partition(":")
    if scheme != "unix":
        return None
    directory, name = os.path.split(_unquote(rest))
    with _lock:
        if directory not in _trusted:
            return None
    return parse_credentials_name(name)
