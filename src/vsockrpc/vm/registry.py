"""VMs by name or CID (``vm list``) and stopping them (``vm stop``).

A VM is its processes (QEMU and, with the userspace device, the device) and its run directory
(``state.json``). It is ``running`` only while QEMU *and* its device are alive — checked by PID
and by the run directory in their command lines (PIDs are recycled) — else ``dead``. Stopping
follows the launcher's order: Ctrl-Alt-Del over QMP, QMP ``quit``, SIGKILL, then the device;
the run directory is removed only when vsockrpc provably created it (:mod:`.rundir`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsockrpc.errors import VmError
from vsockrpc.vm.options import check_which
from vsockrpc.vm.procs import is_vm_process, kill_vm_process
from vsockrpc.vm.qmp import CTRL_ALT_DEL, qmp_command
from vsockrpc.vm.rundir import owned_run_dir, remove_run_dir
from vsockrpc.vm.runtime import runtime_dir

__all__ = ["Stopped", "VmRecord", "list_vms", "stop_vm"]


@dataclass(frozen=True, slots=True)
class VmRecord:
    run_dir: Path
    state: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.state["name"])

    @property
    def cid(self) -> int:
        return int(self.state["cid"])

    @property
    def qemu_pid(self) -> int:
        return int(self.state["qemu_pid"])

    @property
    def groups(self) -> tuple[str, ...]:
        """The VM↔VM groups it joined (none: isolated)."""
        return tuple(str(g) for g in self.state.get("groups") or ())

    @property
    def device_pid(self) -> int | None:
        pid = self.state.get("device_pid")
        return int(pid) if pid else None

    @property
    def marker(self) -> str:
        """What the command lines of this VM's processes contain (socket paths)."""
        return str(self.run_dir)

    @property
    def device_host(self) -> str | None:
        """The marker of the group device host serving this VM (None: a device of its own,
        or kernel vhost-vsock). That process serves other VMs too: never stopped for this one."""
        host = self.state.get("device_host")
        return str(host) if host else None

    @property
    def qemu_alive(self) -> bool:
        return is_vm_process(self.qemu_pid, self.marker)

    @property
    def device_alive(self) -> bool | None:
        """None with kernel vhost-vsock (no device process)."""
        pid = self.device_pid
        return None if pid is None else is_vm_process(pid, self.device_host or self.marker)

    @property
    def status(self) -> str:
        """``running``, or ``dead`` with what is gone (``dead (QEMU exited)``...)."""
        qemu, device = self.qemu_alive, self.device_alive
        if qemu and device is not False:
            return "running"
        if qemu:
            return "dead (device exited)"
        if device:
            return "dead (QEMU exited)"
        return "dead"

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True, slots=True)
class Stopped:
    record: VmRecord
    console: str  # the whole guest console, read after QEMU exited
    graceful: bool  # the guest powered itself off (no QMP quit, no SIGKILL)
    was_running: bool = True  # False: QEMU had already exited before the stop


def list_vms() -> list[VmRecord]:
    """Every VM with a run directory vsockrpc created (running or left over), by CID."""
    runtime = runtime_dir()
    out = []
    for state_file in sorted((runtime / "vms").glob("*/state.json")):
        if owned_run_dir(runtime, state_file.parent.name) is None:
            continue  # not a directory vsockrpc made: not a VM of ours
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = VmRecord(state_file.parent, json.loads(state_file.read_text()))
            if record.name == state_file.parent.name:
                out.append(record)
    return sorted(out, key=lambda r: r.cid)


def _find(which: str) -> VmRecord:
    check_which(which)
    for record in list_vms():
        if which in (record.name, str(record.cid)):
            return record
    raise VmError(f"no VM named or with CID {which!r}", hint="see: vsockrpc vm list")


def _wait_gone(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_vm_process(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_vm(which: str, *, timeout: float = 20.0) -> Stopped:
    """Power off the VM named ``which`` (or with that CID) and remove its run directory.

    A VM whose QEMU had already exited is cleaned up (its device stopped, the directory
    removed) and reported with ``was_running=False``."""
    record = _find(which)
    qmp = record.run_dir / "qmp.sock"
    pid, marker = record.qemu_pid, record.marker
    was_running = record.qemu_alive
    graceful = was_running
    if was_running:
        with contextlib.suppress(VmError):
            qmp_command(qmp, "send-key", CTRL_ALT_DEL)
        if not _wait_gone(pid, marker, timeout):
            graceful = False
            with contextlib.suppress(VmError):
                qmp_command(qmp, "quit")
            if not _wait_gone(pid, marker, 5.0):
                kill_vm_process(pid, marker)
                _wait_gone(pid, marker, 5.0)
    # A device of its own is stopped with the VM; one in a group's host left it when QEMU
    # disconnected (the host serves the other members, and exits after the last).
    device = None if record.device_host else record.device_pid
    sent = device is not None and kill_vm_process(device, marker, signal.SIGTERM)
    if device is not None and sent and not _wait_gone(device, marker, 5.0):
        kill_vm_process(device, marker)
        _wait_gone(device, marker, 5.0)
    try:
        console = (record.run_dir / "console.log").read_text(errors="replace")
    except OSError:
        console = ""
    remove_run_dir(record.run_dir.parent.parent, record.name)
    return Stopped(record, console.replace("\r", ""), graceful, was_running)
