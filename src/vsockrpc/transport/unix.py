"""Unix stream sockets. ``listen`` replaces a stale socket file but never a live one or a file.

Every socket file ``listen`` creates gets an explicit ``mode`` (default ``0600``), whatever the
process umask: Linux creates the file of a bound AF_UNIX socket with the mode of the socket's
own inode, masked by the umask (``unix_bind_bsd`` in net/unix/af_unix.c), so ``fchmod`` on the
fd before ``bind`` sets it without touching the process-wide umask; if the umask still removed
bits, the file is ``chmod``-ed before ``listen`` (nobody can connect before ``listen``).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable

from vsockrpc.addresses import Address, UnixAddress
from vsockrpc.errors import TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

__all__ = [
    "DEFAULT_MODE",
    "TRANSPORT",
    "UnixTransport",
    "check_mode",
    "connect",
    "connect_path",
    "listen",
    "listen_path",
    "remove_stale_socket",
]

DEFAULT_MODE = 0o600
"""Mode of the socket files vsockrpc creates: only the owner (and root) may connect."""


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


def check_mode(mode: int) -> int:
    """``mode`` if it is a permission mode; ValueError otherwise."""
    if not 0 <= mode <= 0o777:
        raise ValueError(f"socket mode {mode:#o} is not a permission mode (0 to 0o777)")
    return mode


def listen_path(
    path: str, *, backlog: int = 128, what: str | None = None, mode: int = DEFAULT_MODE
) -> socket.socket:
    """Bind and listen on ``path`` (socket file mode ``mode``, independent of the umask) after
    removing a stale socket file left by a dead server."""
    what = what or f"unix:{path}"
    check_mode(mode)
    remove_stale_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with mapping_listen_errors(what):
            os.fchmod(sock.fileno(), mode)  # bind() creates the file with this mode & ~umask
            sock.bind(path)
            if stat.S_IMODE(os.lstat(path).st_mode) != mode:  # the umask removed bits
                os.chmod(path, mode)
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(address: UnixAddress, *, backlog: int = 128, mode: int = DEFAULT_MODE) -> socket.socket:
    return listen_path(address.path, backlog=backlog, mode=mode)


def grpc_target_for_path(path: str) -> str:
    """grpcio's target for a Unix socket at ``path`` (``unix://`` + path when it starts with
    ``//``, which grpcio would otherwise read as an authority)."""
    return f"unix://{path}" if path.startswith("//") else f"unix:{path}"


class UnixTransport:
    """``unix:PATH``: grpcio dials and binds it itself."""

    scheme = "unix"

    def connect(self, address: UnixAddress, *, timeout: float | None = None) -> socket.socket:
        return connect(address, timeout=timeout)

    def listen(self, address: UnixAddress, *, backlog: int = 128) -> socket.socket:
        return listen(address, backlog=backlog)

    def listening_address(self, address: UnixAddress, listener: socket.socket) -> UnixAddress:
        return address

    def grpc_target(self, address: UnixAddress) -> str | None:
        return grpc_target_for_path(address.path)

    def prepare_grpc_listen(self, address: UnixAddress) -> str | None:
        remove_stale_socket(address.path, str(address))
        return grpc_target_for_path(address.path)

    def bound_address(self, address: UnixAddress, port: int) -> UnixAddress:
        return address

    def accepted_peer(self, conn: socket.socket, peer: object) -> Address | None:
        # An unnamed client (the usual case) is UnixAddress(""): access was decided by the
        # socket file's mode.
        return UnixAddress(peer if isinstance(peer, str) else "")

    def sibling(self, address: UnixAddress, *, port: int = 0, path: str = "") -> Address | None:
        return UnixAddress(path) if path else None

    def callback_address(self, peer: UnixAddress, socket_path: Callable[[], str]) -> Address | None:
        return UnixAddress(socket_path())


TRANSPORT = UnixTransport()
