"""The guest's vsock device: kernel vhost-vsock when usable, else our userspace back-end.

Capability check up front (like mkosi's ``QemuDeviceNode.available()``): ``/dev/vhost-vsock``
must open read-write. Otherwise the userspace device runs as a child process
(``vsockrpc device --socket-fd N``): the vhost-user socket is bound and listening here, before
QEMU starts (QEMU's chardev is the client, GUEST-BOOT.md pitfall 3), and handed over as an
inherited fd rather than started by path and polled for.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from vsockrpc.errors import VmError

__all__ = ["UserspaceDevice", "kernel_vhost_vsock_usable"]

log = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0


def kernel_vhost_vsock_usable() -> bool:
    try:
        fd = os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class UserspaceDevice:
    """``vsockrpc device`` as a child process; a context manager that stops it."""

    def __init__(
        self,
        *,
        vhost_socket: Path,
        hybrid_socket: Path,
        guest_cid: int,
        log_file: Path,
        detach: bool = False,
        extra_fds: tuple[int, ...] = (),
    ) -> None:
        self.vhost_socket = vhost_socket
        self.hybrid_socket = hybrid_socket
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            vhost_socket.unlink(missing_ok=True)
            listener.bind(str(vhost_socket))
            listener.listen(1)
            with log_file.open("ab") as out:
                self.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "vsockrpc.cli.main",
                        "device",
                        "--socket-fd",
                        str(listener.fileno()),
                        "--uds",
                        str(hybrid_socket),
                        "--cid",
                        str(guest_cid),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(listener.fileno(), *extra_fds),
                    # own process group (see launcher._detached_or_own_group)
                    **({"start_new_session": True} if detach else {"process_group": 0}),
                )
        except OSError as err:
            raise VmError(f"cannot start the userspace vsock device: {err}") from err
        finally:
            listener.close()  # the child holds its own copy

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise VmError(f"the userspace vsock device exited with status {code}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("vsock device did not stop in %.0f s: killing it", STOP_TIMEOUT)
                self.process.kill()
                self.process.wait()
        self.vhost_socket.unlink(missing_ok=True)
        self.hybrid_socket.unlink(missing_ok=True)

    def __enter__(self) -> UserspaceDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
