"""``GuestDriver``: the test driver as one object (QEMU's front-end + the guest's rings and
vsock stack), and :func:`serving` to run a device in a thread (:func:`serving_together`:
several devices of one process, on one reactor, in one thread)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

from vsockrpc.vhost.testing.frontend import VhostFrontend
from vsockrpc.vhost.testing.rings import RxLayout
from vsockrpc.vhost.testing.stack import GuestListener, GuestStream, GuestVsock, Packet

__all__ = ["GuestDriver", "pump_all", "serving", "serving_together", "wait_all"]


@contextlib.contextmanager
def serving(device: Any) -> Iterator[threading.Thread]:
    """Run ``device.serve_forever()`` in a thread for the duration of the block."""
    with _in_thread(device.serve_forever, device.stop) as thread:
        yield thread


@contextlib.contextmanager
def serving_together(devices: Sequence[Any]) -> Iterator[threading.Thread]:
    """Serve ``devices`` (made with one shared ``reactor``, as one device process serving
    several VMs) with a :class:`~vsockrpc.vhost.device.DeviceLoop` in one thread."""
    from vsockrpc.vhost.device import DeviceLoop

    loop = DeviceLoop(devices[0].reactor)
    for device in devices:
        loop.add(device)
    with _in_thread(loop.run, loop.stop) as thread:
        yield thread


@contextlib.contextmanager
def _in_thread(run: Callable[[], None], stop: Callable[[], None]) -> Iterator[threading.Thread]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as err:  # surfaced when the block exits
            errors.append(err)

    thread = threading.Thread(target=target, name="vsock-device", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop()
        thread.join(10)
        if errors:
            raise errors[0]


class GuestDriver(GuestVsock, VhostFrontend):
    """Plays the vhost-user front-end (QEMU) and a guest virtio-vsock driver."""

    def __init__(
        self,
        vhost_path: str,
        *,
        guest_cid: int = 3,
        mem_size: int = 64 << 20,
        queue_size: int = 128,
        rx_buf_size: int = 3776,
        rx_layout: RxLayout = RxLayout.SINGLE,
        buf_alloc: int = 256 * 1024,
        connect_timeout: float = 5.0,
    ) -> None:
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self._init_memory(mem_size, queue_size, rx_buf_size, rx_layout)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(vhost_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock.settimeout(10)
        self.config_cid: int | None = None
        self.packets: deque[Packet] = deque()  # packets no stream or listener took
        self.listeners: dict[int, GuestListener] = {}
        self.streams: dict[tuple[int, int, int], GuestStream] = {}
        self._next_port = 50000
        self._ctl: deque[bytes] = deque()  # control headers to send

    def reset(self) -> None:
        """A guest reboot: rings stopped, streams gone, a fresh start with clean rings and
        quiet notifiers (what the device signalled about the old rings is read and dropped)."""
        self.stop_rings()
        for fd in (*self.call, *self.err):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        self.streams.clear()
        self.listeners.clear()
        self.packets.clear()
        self._ctl.clear()
        self._reset_rings()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._close_memory()

    def __enter__(self) -> GuestDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pump_all(drivers: Sequence[GuestDriver], timeout: float = 0.0) -> int:
    """One pass of every driver (several guests driven by one thread, e.g. two guests of a
    group); waits up to ``timeout`` for any of their call notifications when nothing moved."""
    got = sum(d.pump() for d in drivers)
    if got or timeout <= 0:
        return got
    poller = select.poll()
    for driver in drivers:
        for fd in driver.call:
            poller.register(fd, select.POLLIN)
    for fd, _ in poller.poll(timeout * 1000):
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
    return sum(d.pump() for d in drivers)


def wait_all(
    drivers: Sequence[GuestDriver], predicate: Callable[[], bool], timeout: float, what: str = ""
) -> None:
    """Pump every driver until ``predicate()``; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"guest drivers: timed out waiting for {what or predicate}")
        pump_all(drivers, min(remaining, 0.02))
