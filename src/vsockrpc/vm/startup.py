"""Steps shared by every way a VM comes up (a cold :func:`~.launcher.launch`, a
:func:`~.restore.restore`): waiting for QEMU's QMP socket, the ``state.json`` record of a
running VM, reaping QEMU when a start is undone, and a pause a stop request cuts short.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from vsockrpc.errors import VmError
from vsockrpc.vm import signals
from vsockrpc.vm.procs import exit_status

if TYPE_CHECKING:
    from vsockrpc.vm.launcher import Vm

__all__ = ["pause", "reap", "state_record", "wait_qemu_up"]

QEMU_UP_TIMEOUT = 10.0


def pause(cancel: threading.Event | None, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``cancel`` is set meanwhile."""
    if cancel is not None:
        cancel.wait(seconds)
    else:
        time.sleep(seconds)


def state_record(vm: Vm, detached: bool) -> dict[str, object]:
    """What ``state.json`` in the VM's run directory records (read by :mod:`.registry`)."""
    return {
        "name": vm.name,
        "cid": vm.cid,
        "port": vm.port,
        "image": str(vm.image.path),
        "qemu_pid": vm.qemu.pid,
        "device_pid": vm.device.pid if vm.device else None,
        "hybrid_socket": str(vm.hybrid_socket) if vm.hybrid_socket else None,
        "address": str(vm.address()),
        "accel": vm.accel.name,
        "groups": list(vm.groups),
        "launcher_pid": os.getpid(),
        "detached": detached,
        "started": time.time(),
    }


def wait_qemu_up(vm: Vm, cancel: threading.Event | None, timeout: float = QEMU_UP_TIMEOUT) -> None:
    """Until QEMU has created its QMP socket; VmError when it exits first or takes too long."""
    deadline = time.monotonic() + timeout
    while not vm.qmp_socket.exists():
        signals.check(cancel)
        if vm.qemu.poll() is not None:
            raise VmError(
                f"QEMU exited at once ({exit_status(vm.qemu.returncode)}): "
                f"{vm.qemu_log_tail() or 'no message'}"
            )
        if time.monotonic() > deadline:
            raise VmError(f"QEMU did not open its QMP socket in {timeout:g} s")
        pause(cancel, 0.01)


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, and wait for it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
