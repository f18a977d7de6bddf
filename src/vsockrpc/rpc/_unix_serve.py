"""grpcio's own Unix listener with an explicit socket file mode, independent of the umask.

grpcio binds and listens in ``add_insecure_port`` with a socket we never see, so the fd-level
``fchmod`` that :mod:`vsockrpc.transport.unix` uses before ``bind`` is out of reach, and a
``chmod`` after the fact leaves a window in which the socket is listening with the umask's mode
(e.g. ``0777`` under ``umask 000``). Instead grpcio binds in a fresh ``0700`` directory next to
the target (nobody else can reach the socket there), the file gets its mode, and a hard link
puts it at the target path at once (``link(2)`` never replaces an existing file, unlike
``rename(2)``); then the private name and directory go away. The kernel still knows the
socket by its first name, which nobody sees: clients connect by path.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from vsockrpc.errors import TransportError
from vsockrpc.transport.unix import grpc_target_for_path

__all__ = ["SUN_PATH_MAX", "OwnedSocketFile", "bind_unix_with_mode"]

SUN_PATH_MAX = 107  # bytes of sun_path usable for a path (unix(7)), NUL excluded


@dataclass(frozen=True)
class OwnedSocketFile:
    """A socket file this server created: removed at stop only if it is still that file."""

    path: str
    device: int
    inode: int

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.device, self.inode):
                os.unlink(self.path)


def bind_unix_with_mode(
    add_port: Callable[[str, str], object], path: str, mode: int, what: str
) -> OwnedSocketFile | None:
    """Have ``add_port("unix:<private>", what)`` bind, then publish that socket at ``path``.

    Returns None (nothing done) when the private name would not fit in ``sun_path``; the
    caller then serves ``path`` another way.
    """
    parent = os.path.dirname(os.path.abspath(path))
    # os.urandom is what secrets.token_hex reads; secrets would import hmac and hashlib, whose
    # OpenSSL load is start-up time in a TCG guest's agent.
    private = os.path.join(parent, f".vsockrpc-{os.urandom(4).hex()}")
    inner = os.path.join(private, "s")
    if len(os.fsencode(inner)) > SUN_PATH_MAX:
        return None
    try:
        os.mkdir(private, 0o700)
    except OSError as err:
        raise TransportError(f"cannot listen on {what}: {err.strerror or err}") from err
    try:
        add_port(grpc_target_for_path(inner), what)
        try:
            os.chmod(inner, mode)
            os.link(inner, path)
        except FileExistsError as err:
            raise TransportError(
                f"cannot listen on {what}: {path} appeared while binding",
                hint="is another server starting there?",
            ) from err
        except OSError as err:
            raise TransportError(f"cannot listen on {what}: {err.strerror or err}") from err
        st = os.lstat(path)
        return OwnedSocketFile(path, st.st_dev, st.st_ino)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inner)
        with contextlib.suppress(OSError):
            os.rmdir(private)
