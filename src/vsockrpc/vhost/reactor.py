"""The device's single-threaded event loop: epoll plus per-fd callbacks and a wakeup eventfd.

Besides real fds it carries *virtual* ones (negative numbers): the in-process links between
guests of one device process (:mod:`~vsockrpc.vhost.link`) post their readiness here instead of
through epoll (:meth:`Reactor.post`), and a registration reports a virtual fd's current
readiness at once, as ``EPOLL_CTL_MOD`` does for a real one.

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
from typing import Protocol

__all__ = ["ERR", "ET", "IN", "OUT", "Reactor"]

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ET = select.EPOLLET
ERR = select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP

Callback = Callable[[int], None]  # receives the epoll event mask


class Virtual(Protocol):
    """What a virtual fd's owner tells the reactor: its readiness now (an epoll mask)."""

    def ready_mask(self) -> int: ...


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._virtual: dict[int, Virtual] = {}  # virtual fd → its owner
        self._masks: dict[int, int] = {}  # registered mask of each registered virtual fd
        self._posted: list[tuple[int, int]] = []  # virtual events not delivered yet
        self._soon: list[Callable[[], None]] = []  # call_soon callbacks not run yet
        self._next_virtual = -2  # -1 is no fd anywhere
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, IN)

    def register(self, fd: int, mask: int, callback: Callback) -> None:
        if fd < 0:
            self._callbacks[fd] = callback
            self._masks[fd] = mask
            owner = self._virtual.get(fd)
            if owner is not None:
                self.post(fd, owner.ready_mask())
            return
        if fd in self._callbacks:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        if fd < 0:
            self._callbacks.pop(fd, None)
            self._masks.pop(fd, None)
            return
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    # ------------------------------------------------------------------ virtual fds
    def add_virtual(self, owner: Virtual) -> int:
        """A new virtual fd for ``owner`` (not registered yet)."""
        fd = self._next_virtual
        self._next_virtual -= 1
        self._virtual[fd] = owner
        return fd

    def remove_virtual(self, fd: int) -> None:
        self._virtual.pop(fd, None)

    def post(self, fd: int, mask: int) -> None:
        """An event on a virtual fd, delivered by the next :meth:`poll` if it is registered for
        it then (errors and hang-ups always are, as with epoll)."""
        want = self._masks.get(fd)
        if want is not None and mask & (want | ERR):
            self._posted.append((fd, mask))

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` with the posted virtual events (after the current pass, before the
        next wait): a guest's rx signal owed for bytes another guest's pass put there."""
        self._soon.append(callback)

    @property
    def has_posted(self) -> bool:
        return bool(self._posted or self._soon)

    def wake(self) -> None:
        """Interrupt :meth:`poll` from any thread."""
        if self._wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds (-1: forever) and run the callbacks of ready fds;
        with virtual events posted, do not wait, and run theirs after the real ones."""
        events = self._epoll.poll(0.0 if self._posted or self._soon else timeout, 256)
        callbacks = self._callbacks
        for fd, mask in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            callback = callbacks.get(fd)
            if callback is not None:
                callback(mask)
        self.deliver_posted()

    def deliver_posted(self) -> None:
        """Run the callbacks of the virtual events posted so far (no system call), then those
        given to :meth:`call_soon`."""
        posted = self._posted
        if posted:
            self._posted = []
            callbacks, masks = self._callbacks, self._masks
            for fd, mask in posted:
                want = masks.get(fd)  # still registered, for this event?
                if want is not None and mask & (want | ERR):
                    callbacks[fd](mask & (want | ERR))
        soon = self._soon
        if soon:
            self._soon = []
            for callback in soon:
                callback()

    def close(self) -> None:
        """Idempotent: a second call must not close an fd number reused by someone else."""
        if self._wake_fd < 0:
            return
        self._callbacks.clear()
        self._virtual.clear()
        self._masks.clear()
        self._posted.clear()
        self._soon.clear()
        self._epoll.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
