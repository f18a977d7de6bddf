"""Steps shared by every way a VM comes up (a cold :func:`~.launcher.launch`, a
:func:`~.restoring.restore`): waiting for QEMU's QMP socket, the ``state.json`` record of a
running VM, reaping QEMU when a start is undone, and a pause a stop request cuts short.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vsockrpc.errors import VmError
from vsockrpc.vm import cid as cid_mod
from vsockrpc.vm import signals
from vsockrpc.vm.procs import exit_status
from vsockrpc.vm.rundir import NameClaim, claim_name
from vsockrpc.vm.runtime import groups_dir, runtime_dir
from vsockrpc.vm.vsockdev import HostedDevice, VmDevice, device_in_run_dir

if TYPE_CHECKING:
    from vsockrpc.vm.launcher import Vm

__all__ = ["Slot", "pause", "reap", "state_record", "take_slot", "wait_qemu_up"]

QEMU_UP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Slot:
    """A VM's CID lease and name claim, both taken; undone by the stack they were taken on."""

    runtime: Path
    lease: cid_mod.CidLease
    claim: NameClaim

    @property
    def held(self) -> tuple[int, int]:
        """The lock fds every process of the VM inherits: the CID and the name stay taken while
        any of them lives, and become free by themselves once all are gone."""
        return (self.lease.fileno(), self.claim.fileno())

    def device(self, *, detach: bool, groups: tuple[str, ...]) -> VmDevice:
        """The VM's userspace device: its sockets and log in the run directory, a member of
        ``groups``, holding the slot's locks."""
        return device_in_run_dir(
            self.claim.run_dir,
            self.lease.cid,
            detach=detach,
            held=self.held,
            groups=groups,
            groups_dir=groups_dir(self.runtime) if groups else None,
        )


def take_slot(stack: ExitStack, cid: int | None, name: str | None) -> Slot:
    """Lease ``cid`` (None: the lowest free one) and claim ``name`` (None: ``vm<CID>``) in the
    runtime directory; ``stack`` gives the name back (and removes its run directory) on unwind."""
    runtime = runtime_dir()
    lease = stack.enter_context(cid_mod.lease(runtime, cid))
    claim = claim_name(runtime, name or f"vm{lease.cid}")
    stack.callback(claim.close)
    stack.callback(claim.remove)  # runs before close: the name is still ours
    return Slot(runtime, lease, claim)


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
        # A grouped VM's device lives in its group's host: the marker of that shared process.
        "device_host": vm.device.marker if isinstance(vm.device, HostedDevice) else None,
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
