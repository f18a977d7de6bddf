"""The guest's vsock device: kernel vhost-vsock when usable, else our userspace back-end.

A VM in a group (``vm run --group``) always gets the userspace device: the kernel's vhost-vsock
only routes between a guest and the host, ours also between guests of one group (each device
listens in ``<runtime>/groups/<group>/``; see docs/device.md).

Capability check up front (like mkosi's ``QemuDeviceNode.available()``): ``/dev/vhost-vsock``
must open read-write. Otherwise the userspace device runs as a child process through its own
entry point (``python -m vsockrpc.vhost``, :mod:`vsockrpc.vhost.command`). Both of its sockets
are bound and listening here, before QEMU starts (QEMU's chardev is the client, GUEST-BOOT.md
pitfall 3), and handed over as inherited fds rather than started by path and polled for; so
this side owns both socket files and removes them only if they are still the ones it bound.

The device never outlives its VM: it exits when QEMU disconnects from it
(``--exit-on-disconnect``: QEMU dying closes the vhost-user socket) and, for a VM that lives
only as long as this process (not detached), when this process exits (``--exit-with-pid``,
a pidfd watch that also covers SIGKILL of the launcher).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vsockrpc.errors import DeviceError, VmError
from vsockrpc.vhost.paths import BoundPath, listen_unix

__all__ = [
    "UserspaceDevice",
    "device_argv",
    "device_in_run_dir",
    "kernel_vhost_vsock_usable",
    "wants_userspace",
]

log = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0


def kernel_vhost_vsock_usable() -> bool:
    try:
        fd = os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def wants_userspace(groups: Sequence[str]) -> bool:
    """Whether a VM needs our userspace device: no usable kernel vhost-vsock, or groups (the
    kernel device cannot route between guests; then this says so, once)."""
    if not kernel_vhost_vsock_usable():
        return True
    if groups:
        log.warning(
            "using vsockrpc's userspace vsock device, not the kernel's vhost-vsock: "
            "only it routes between VMs of a group (%s)",
            ", ".join(groups),
        )
        return True
    return False


def device_argv(
    *,
    vhost_fd: int,
    hybrid_socket: Path,
    hybrid_fd: int,
    guest_cid: int,
    exit_with_pid: int | None,
    groups: Sequence[str] = (),
    groups_dir: Path | None = None,
) -> list[str]:
    """The device's command line: inherited sockets, exit when QEMU (and ``exit_with_pid``)
    goes away; with ``groups``, membership under ``groups_dir``."""
    argv = [
        sys.executable,
        "-m",
        "vsockrpc.vhost",
        "--socket-fd",
        str(vhost_fd),
        "--uds",
        str(hybrid_socket),
        "--uds-fd",
        str(hybrid_fd),
        "--cid",
        str(guest_cid),
        "--exit-on-disconnect",
    ]
    if exit_with_pid is not None:
        argv += ["--exit-with-pid", str(exit_with_pid)]
    if groups:
        if groups_dir is None:
            raise ValueError("groups need a groups_dir")
        argv += ["--groups-dir", str(groups_dir)]
        for group in groups:
            argv += ["--group", group]
    return argv


class UserspaceDevice:
    """The device as a child process; a context manager that stops it.

    ``detach``: the device runs in its own session and outlives this process (it still exits
    when QEMU disconnects); otherwise it also exits when this process does."""

    def __init__(
        self,
        *,
        vhost_socket: Path,
        hybrid_socket: Path,
        guest_cid: int,
        log_file: Path,
        detach: bool = False,
        extra_fds: tuple[int, ...] = (),
        groups: Sequence[str] = (),
        groups_dir: Path | None = None,
    ) -> None:
        self.vhost_socket = vhost_socket
        self.hybrid_socket = hybrid_socket
        self._bound: list[BoundPath] = []
        try:
            vhost, bound = listen_unix(str(vhost_socket), backlog=1)
            self._bound.append(bound)
            with vhost:
                hybrid, bound = listen_unix(str(hybrid_socket))
                self._bound.append(bound)
                with hybrid, log_file.open("ab") as out:
                    self.process = subprocess.Popen(
                        device_argv(
                            vhost_fd=vhost.fileno(),
                            hybrid_socket=hybrid_socket,
                            hybrid_fd=hybrid.fileno(),
                            guest_cid=guest_cid,
                            exit_with_pid=None if detach else os.getpid(),
                            groups=groups,
                            groups_dir=groups_dir,
                        ),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        pass_fds=(vhost.fileno(), hybrid.fileno(), *extra_fds),
                        # own process group (see procs.detached_or_own_group)
                        **({"start_new_session": True} if detach else {"process_group": 0}),
                    )
            # The child holds its own copies of both listening sockets from here on.
        except (OSError, DeviceError) as err:
            self._unlink()
            raise VmError(f"cannot start the userspace vsock device: {err}") from err

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
        self._unlink()

    def _unlink(self) -> None:
        """Remove the socket files, unless another device has bound the same paths since."""
        for bound in self._bound:
            bound.unlink()
        self._bound = []

    def __enter__(self) -> UserspaceDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def device_in_run_dir(
    run_dir: Path,
    guest_cid: int,
    *,
    detach: bool,
    held: tuple[int, ...],
    groups: Sequence[str] = (),
    groups_dir: Path | None = None,
) -> UserspaceDevice:
    """A VM's device with its sockets and log in the VM's run directory (``vhost-user.sock``,
    ``vsock.sock``, ``device.log``); ``held``: the VM's lock fds, which it keeps open."""
    return UserspaceDevice(
        vhost_socket=run_dir / "vhost-user.sock",
        hybrid_socket=run_dir / "vsock.sock",
        guest_cid=guest_cid,
        log_file=run_dir / "device.log",
        detach=detach,
        extra_fds=held,
        groups=groups,
        groups_dir=groups_dir,
    )
