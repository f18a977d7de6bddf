"""The device's single-threaded event loop: epoll plus per-fd callbacks and a wakeup eventfd.

Hand-rolled rather than ``selectors``/``asyncio`` because the data path needs edge-triggered
registration (host sockets stay registered for IN|ET as credit or rx buffers come and go; OUT
is added only while output waits), and a callback per ready fd without asyncio's per-event
object churn.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable

__all__ = ["ERR", "ET", "IN", "OUT", "Reactor"]

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ET = select.EPOLLET
ERR = select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP

Callback = Callable[[int], None]  # receives the epoll event mask


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, IN)

    def register(self, fd: int, mask: int, callback: Callback) -> None:
        if fd in self._callbacks:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def wake(self) -> None:
        """Interrupt :meth:`poll` from any thread."""
        if self._wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds (-1: forever) and run the callbacks of ready fds."""
        events = self._epoll.poll(timeout, 256)
        callbacks = self._callbacks
        for fd, mask in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            callback = callbacks.get(fd)
            if callback is not None:
                callback(mask)

    def close(self) -> None:
        """Idempotent: a second call must not close an fd number reused by someone else."""
        if self._wake_fd < 0:
            return
        self._callbacks.clear()
        self._epoll.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
