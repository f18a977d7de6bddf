"""Private ``0700`` directories for the relay's Unix sockets."""

from __future__ import annotations

import contextlib
import os
import tempfile
from types import TracebackType

__all__ = ["PrivateDir"]

# Leave room for socket names inside the directory: sun_path holds 107 bytes (unix(7)).
_MAX_BASE = 48


def _base() -> str:
    base = tempfile.gettempdir()
    return base if len(base) <= _MAX_BASE else "/tmp"


class PrivateDir:
    """A fresh directory only this user can enter; removed (with its sockets) on close."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="vsockrpc-", dir=_base())  # mode 0700

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self) -> None:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
        os.rmdir(self.path)

    def __enter__(self) -> PrivateDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
