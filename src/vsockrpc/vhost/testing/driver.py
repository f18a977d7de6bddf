"""``GuestDriver``: the test driver as one object (QEMU's front-end + the guest's rings and
vsock stack), and :func:`serving` to run a device in a thread."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from vsockrpc.vhost.testing.frontend import VhostFrontend
from vsockrpc.vhost.testing.rings import RxLayout
from vsockrpc.vhost.testing.stack import GuestListener, GuestStream, GuestVsock, Packet

__all__ = ["GuestDriver", "serving"]


@contextlib.contextmanager
def serving(device: Any) -> Iterator[threading.Thread]:
    """Run ``device.serve_forever()`` in a thread for the duration of the block."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            device.serve_forever()
        except BaseException as err:  # surfaced when the block exits
            errors.append(err)

    thread = threading.Thread(target=run, name="vsock-device", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        device.stop()
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
        self.streams: dict[tuple[int, int], GuestStream] = {}
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
