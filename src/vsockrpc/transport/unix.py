"""Unix stream sockets. ``listen`` replaces a stale socket file but never a live one or a file."""

from __future__ import annotations

import errno
import os
import socket
import stat

from vsockrpc.addresses import UnixAddress
from vsockrpc.errors import TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

__all__ = ["connect", "connect_path", "listen", "listen_path", "remove_stale_socket"]


def connect_path(
    path: str, *, timeout: float | None = None, what: str | None = None
) -> socket.socket:
    """Connect a Unix stream socket to ``path``; the socket returned blocks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with mapping_connect_errors(what or f"unix:{path}"):
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(address: UnixAddress, *, timeout: float | None = None) -> socket.socket:
    return connect_path(address.path, timeout=timeout)


def remove_stale_socket(path: str, what: str) -> None:
    """Unlink ``path`` if it is a socket nobody accepts on; refuse live sockets and other files."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"cannot listen on {what}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as err:
        if err.errno != errno.ECONNREFUSED:
            raise TransportError(f"cannot listen on {what}: {err.strerror or err}") from err
        os.unlink(path)  # nobody accepts there: a leftover of a dead server
        return
    finally:
        probe.close()
    raise TransportError(
        f"cannot listen on {what}: a server is already listening there",
        hint="stop it or pick another path",
    )


def listen_path(path: str, *, backlog: int = 128, what: str | None = None) -> socket.socket:
    """Bind and listen on ``path`` after removing a stale socket file left by a dead server."""
    what = what or f"unix:{path}"
    remove_stale_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with mapping_listen_errors(what):
            sock.bind(path)
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(address: UnixAddress, *, backlog: int = 128) -> socket.socket:
    return listen_path(address.path, backlog=backlog)
