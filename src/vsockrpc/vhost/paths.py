"""Unix socket files the device creates, and removing only those; closing the file
descriptors a device received or opened.

A path is removed at exit only if it still names the very socket file we bound (same device
and inode): after ``kill -9`` of a VM, a new device may have bound the same path, and the old
device's exit must not delete the new one's socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from vsockrpc.errors import DeviceError

__all__ = ["DEFAULT_MODE", "BoundPath", "close_fds", "listen_unix", "unix_stream_from_fd"]

DEFAULT_MODE = 0o600  # owner only, whatever the umask


@dataclass(frozen=True, slots=True)
class BoundPath:
    """A socket file we created: its path and the identity it had when we bound it."""

    path: str
    st_dev: int
    st_ino: int

    def is_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.st_dev, self.st_ino)

    def unlink(self) -> bool:
        """Remove the path if it is still our socket; True if removed."""
        if not self.is_ours():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True


def listen_unix(
    path: str, *, mode: int = DEFAULT_MODE, backlog: int = 1024
) -> tuple[socket.socket, BoundPath]:
    """Bind and listen on ``path`` with permissions ``mode``. A socket file left at ``path``
    (a stale one from an earlier run) is replaced; any other kind of file is an error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            sock.bind(path)
            st = os.lstat(path)
            bound = BoundPath(path, st.st_dev, st.st_ino)
            # Before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(path, mode)
        except OSError as err:
            raise DeviceError(f"cannot listen on {path}: {err.strerror or err}") from err
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, bound


def unix_stream_from_fd(fd: int, name: str, *, listening: bool, owned: bool) -> socket.socket:
    """``fd`` as a Unix stream socket object (``listening``: it must be listening), or
    DeviceError naming ``name``. ``owned``: the fd is ours, closed on failure (one received from
    a launcher); otherwise it stays open (one inherited from our caller)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise DeviceError(f"{name} is not a socket")
        sock = socket.socket(fileno=fd)
    except (OSError, DeviceError) as err:
        if owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        if isinstance(err, DeviceError):
            raise
        raise DeviceError(f"{name}: {err.strerror or err}") from err
    kind = "listening Unix stream socket" if listening else "Unix stream socket"
    ok = sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    if ok and listening:
        ok = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    if not ok:
        if owned:
            sock.close()
        else:
            sock.detach()
        raise DeviceError(f"{name} is not a {kind}")
    return sock


def close_fds(fds: Iterable[int]) -> None:
    """Close each of ``fds``, ignoring errors: what was received (SCM_RIGHTS) or replaced is
    ours to close, and one already gone must not keep the others open."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
