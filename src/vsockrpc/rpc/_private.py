"""Private ``0700`` directories for the relays' Unix sockets.

Servers create one :class:`PrivateDir` each. Client channels share one per process
(:func:`acquire_shared_dir`): created on first use, removed when the last channel using it is
closed or collected, at interpreter exit, and, when the process has no handler of its own for
them, on SIGTERM/SIGHUP (the handler removes the directory, then lets the signal do what it
would have done). A forked child never removes its parent's directory.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import tempfile
import threading
from types import FrameType, TracebackType

__all__ = ["PrivateDir", "acquire_shared_dir", "release_shared_dir"]

# Leave room for socket names inside the directory: sun_path holds 107 bytes (unix(7)).
_MAX_BASE = 48


def _base() -> str:
    base = tempfile.gettempdir()
    return base if len(base) <= _MAX_BASE else "/tmp"


class PrivateDir:
    """A fresh directory only this user can enter; removed (with its sockets) on close."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="vsockrpc-", dir=_base())  # mode 0700
        self._serial = itertools.count(1)

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def fresh(self, prefix: str) -> str:
        """A path in the directory no earlier call returned (``<prefix>-<n>``)."""
        return self.join(f"{prefix}-{next(self._serial)}")

    def close(self) -> None:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
        with contextlib.suppress(FileNotFoundError):
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


_lock = threading.Lock()
_shared: PrivateDir | None = None
_shared_pid = 0
_shared_users = 0
_exit_hook_pid = 0
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def acquire_shared_dir() -> PrivateDir:
    """This process's directory for client-side relay sockets, created on first use; give it
    back with :func:`release_shared_dir` (the last release removes it)."""
    global _shared, _shared_pid, _shared_users, _exit_hook_pid
    with _lock:
        if _shared is None or _shared_pid != os.getpid():  # a forked child gets its own
            _shared, _shared_pid, _shared_users = PrivateDir(), os.getpid(), 0
            if _exit_hook_pid != os.getpid():
                _exit_hook_pid = os.getpid()
                atexit.register(_remove_shared)
                _install_signal_cleanup()
        _shared_users += 1
        return _shared


def release_shared_dir(directory: PrivateDir) -> None:
    """Give back what :func:`acquire_shared_dir` returned."""
    global _shared, _shared_users
    with _lock:
        if directory is not _shared or _shared_pid != os.getpid():
            return  # not ours (e.g. inherited over fork): never removed here
        _shared_users -= 1
        if _shared_users <= 0:
            _shared.close()
            _shared = None


def _remove_shared() -> None:
    global _shared
    with _lock:
        if _shared is not None and _shared_pid == os.getpid():
            _shared.close()
            _shared = None


def _install_signal_cleanup() -> None:
    # Only where Python can install handlers, and never over a handler someone else installed.
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _CLEANUP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _on_fatal_signal)


def _on_fatal_signal(signum: int, _frame: FrameType | None) -> None:
    # Not under _lock: the main thread may hold it when the signal arrives.
    shared = _shared
    if shared is not None and _shared_pid == os.getpid():
        shared.close()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal, as without us
