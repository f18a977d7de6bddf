"""The guest's vsock device: kernel vhost-vsock when usable, else our userspace back-end.

A VM in a group (``vm run --group``) always gets the userspace device: the kernel's vhost-vsock
only routes between a guest and the host, ours also between guests of one group. Such a VM is
served by the *device host* of its first group (:class:`HostedDevice`): one process for the
group's VMs, started by the first launcher that needs it, that exits by itself once it serves
no VM (docs/device.md, "One process per group"); its members meet in
``<runtime>/groups/<group>/``.

Capability check up front (like mkosi's ``QemuDeviceNode.available()``): ``/dev/vhost-vsock``
must open read-write. Otherwise the userspace device runs as a child process through its own
entry point (``python -m vsockrpc.vhost``, :mod:`vsockrpc.vhost.command`). Both of its sockets
are bound and listening here, before QEMU starts (QEMU's chardev is the client, GUEST-BOOT.md
pitfall 3), and handed over as inherited fds rather than started by path and polled for; so
this side owns both socket files and removes them only if they are still the ones it bound.

A VM's device never outlives its VM: it exits (or leaves the host) when QEMU disconnects from it
(``--exit-on-disconnect``: QEMU dying closes the vhost-user socket) and, for a VM that lives
only as long as this process (not detached), when this process exits (``--exit-with-pid``,
a pidfd watch that also covers SIGKILL of the launcher).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

from vsockrpc.errors import DeviceError, VmError
from vsockrpc.vhost.hostproto import HostStartError, join_host
from vsockrpc.vhost.paths import BoundPath, listen_unix

__all__ = [
    "HostedDevice",
    "UserspaceDevice",
    "VmDevice",
    "device_argv",
    "device_in_run_dir",
    "host_argv",
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
) -> list[str]:
    """The device's command line: inherited sockets, exit when QEMU (and ``exit_with_pid``)
    goes away. (A VM in groups is served by its group's host instead: :func:`host_argv`.)"""
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
    return argv


class VmDevice:
    """What a launcher holds of its VM's userspace device: the two socket files it bound (and
    removes at :meth:`stop`, if still its own), the pid serving them, a liveness check. A
    context manager that stops it."""

    def __init__(self, vhost_socket: Path, hybrid_socket: Path) -> None:
        self.vhost_socket = vhost_socket
        self.hybrid_socket = hybrid_socket
        self._bound: list[BoundPath] = []

    @contextlib.contextmanager
    def _listening(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        """Both sockets bound and listening (before QEMU starts), closed here after the block:
        by then the device's process holds its own copies."""
        vhost, bound = listen_unix(str(self.vhost_socket), backlog=1)
        self._bound.append(bound)
        with vhost:
            hybrid, bound = listen_unix(str(self.hybrid_socket))
            self._bound.append(bound)
            with hybrid:
                yield vhost, hybrid

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def check(self) -> None:
        """VmError if the device is gone."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def watch(self, qemu_pid: int) -> None:
        """QEMU has started with pid ``qemu_pid`` (a device of its own already exits when QEMU
        disconnects, or with this process)."""

    def release(self) -> None:
        """The VM is detached: this process lets go of the device without stopping it."""

    def _unlink(self) -> None:
        """Remove the socket files, unless another device has bound the same paths since."""
        for bound in self._bound:
            bound.unlink()
        self._bound = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UserspaceDevice(VmDevice):
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
    ) -> None:
        super().__init__(vhost_socket, hybrid_socket)
        try:
            with self._listening() as (vhost, hybrid), log_file.open("ab") as out:
                self.process = subprocess.Popen(
                    device_argv(
                        vhost_fd=vhost.fileno(),
                        hybrid_socket=hybrid_socket,
                        hybrid_fd=hybrid.fileno(),
                        guest_cid=guest_cid,
                        exit_with_pid=None if detach else os.getpid(),
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


class HostedDevice(VmDevice):
    """The VM's device inside the device host of its first group (one process for the group's
    VMs, so that their traffic crosses no socket; docs/device.md): its sockets are bound here,
    as for :class:`UserspaceDevice`, and handed to the host with the VM's lock fds
    (:func:`vsockrpc.vhost.hostproto.join_host`); the host is started if the group has none.

    The host serves the VM until QEMU disconnects or exits (:meth:`watch`) and, unless
    ``detach``, until this process exits; it closes :attr:`conn` when the VM's device leaves,
    which :meth:`check` reads. :meth:`stop` closes it (a VM whose QEMU was never started or
    named is dropped then); :meth:`release` too, for a detached VM the host serves on."""

    def __init__(
        self,
        *,
        vhost_socket: Path,
        hybrid_socket: Path,
        guest_cid: int,
        log_file: Path,
        groups: Sequence[str],
        groups_dir: Path,
        detach: bool = False,
        held: tuple[int, ...] = (),
    ) -> None:
        super().__init__(vhost_socket, hybrid_socket)
        self.group = groups[0]
        self.host_dir = groups_dir / self.group
        self.host_log = self.host_dir / "host.log"
        try:
            with self._listening() as (vhost, hybrid):
                self.conn, self._pid = join_host(
                    str(groups_dir),
                    groups,
                    cid=guest_cid,
                    uds=str(hybrid_socket),
                    exit_with_pid=None if detach else os.getpid(),
                    fds=(vhost.fileno(), hybrid.fileno(), *held),
                    start_host=self._start_host,
                )
            # The host holds its own copies of both listening sockets from here on.
            with log_file.open("a") as out:
                out.write(
                    f"served by the device host of group {self.group} (pid {self.pid}); "
                    f"its log: {self.host_log}\n"
                )
        except (OSError, DeviceError) as err:
            self._unlink()
            why = self._host_said() if isinstance(err, HostStartError) else ""
            raise VmError(f"cannot start the userspace vsock device: {err}{why}") from err

    def _host_said(self) -> str:
        """A host that failed to start said why as the last line of its log: ``: <that>``."""
        try:
            with self.host_log.open("rb") as f:
                f.seek(max(0, self.host_log.stat().st_size - 1024))
                last = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        prefix = "python -m vsockrpc.vhost: error: "
        return f" ({last[-1].removeprefix(prefix)})" if last and last[-1].startswith(prefix) else ""

    def _start_host(self) -> subprocess.Popen[bytes]:
        """The group's host, in its own session: it serves every member and outlives this
        process, exiting by itself once no VM is left. Its first process exits once the host
        listens (``--fork-when-ready``), so nothing is left here to reap."""
        with self.host_log.open("ab") as out:
            os.chmod(self.host_log, 0o600)
            proc = subprocess.Popen(
                host_argv(self.host_dir.parent, self.group),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def marker(self) -> str:
        """What this group's host's command line contains, and no other process's: the
        arguments naming the group and its directory, NUL-separated as in /proc/PID/cmdline."""
        return "\0".join(host_argv(self.host_dir.parent, self.group)[3:7])

    def check(self) -> None:
        if self.conn.fileno() < 0:
            return  # released (a detached VM): the host no longer reports to this process
        try:
            gone = self.conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            raise VmError(
                f"group {self.group}'s vsock device host dropped this VM's device "
                f"(its log: {self.host_log})"
            )

    def watch(self, qemu_pid: int) -> None:
        """The host stops this VM's device when QEMU exits, whether or not it ever connected;
        from then on the connection is no longer the VM's lease."""
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(5.0)
            self.conn.sendall(f"WATCH {qemu_pid}\n".encode())
        except OSError as err:
            raise VmError(f"group {self.group}'s vsock device host is gone: {err}") from err
        finally:
            self.conn.setblocking(False)

    def release(self) -> None:
        self.conn.close()  # QEMU is watched: the host serves the VM on

    def stop(self) -> None:
        self.conn.close()
        self._unlink()


def host_argv(groups_dir: Path, group: str) -> list[str]:
    """The command line of ``group``'s device host."""
    return [
        sys.executable,
        "-m",
        "vsockrpc.vhost",
        "--host",
        group,
        "--groups-dir",
        str(groups_dir),
        "--fork-when-ready",
    ]


def device_in_run_dir(
    run_dir: Path,
    guest_cid: int,
    *,
    detach: bool,
    held: tuple[int, ...],
    groups: Sequence[str] = (),
    groups_dir: Path | None = None,
) -> VmDevice:
    """A VM's device with its sockets and log in the VM's run directory (``vhost-user.sock``,
    ``vsock.sock``, ``device.log``); ``held``: the VM's lock fds, which it keeps open. A VM in
    groups joins the device host of its first group."""
    if groups:
        if groups_dir is None:
            raise ValueError("groups need a groups_dir")
        return HostedDevice(
            vhost_socket=run_dir / "vhost-user.sock",
            hybrid_socket=run_dir / "vsock.sock",
            guest_cid=guest_cid,
            log_file=run_dir / "device.log",
            groups=groups,
            groups_dir=groups_dir,
            detach=detach,
            held=held,
        )
    return UserspaceDevice(
        vhost_socket=run_dir / "vhost-user.sock",
        hybrid_socket=run_dir / "vsock.sock",
        guest_cid=guest_cid,
        log_file=run_dir / "device.log",
        detach=detach,
        extra_fds=held,
    )
