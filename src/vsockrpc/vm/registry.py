"""Detached VMs: find them by name or CID (``vm list``) and stop them (``vm stop``).

A detached VM is only its processes and its run directory (``state.json``); stopping follows
the launcher's order: Ctrl-Alt-Del over QMP, QMP ``quit``, SIGKILL, then the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsockrpc.errors import VmError
from vsockrpc.vm.qmp import CTRL_ALT_DEL, qmp_command
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
    def running(self) -> bool:
        return _alive(self.qemu_pid)


@dataclass(frozen=True, slots=True)
class Stopped:
    record: VmRecord
    console: str  # the whole guest console, read after QEMU exited
    graceful: bool  # the guest powered itself off (no QMP quit, no SIGKILL)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def list_vms() -> list[VmRecord]:
    """Every VM with a run directory (running or left over), by CID."""
    out = []
    for state_file in sorted((runtime_dir() / "vms").glob("*/state.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(VmRecord(state_file.parent, json.loads(state_file.read_text())))
    return sorted(out, key=lambda r: r.cid)


def _find(which: str) -> VmRecord:
    for record in list_vms():
        if which in (record.name, str(record.cid)):
            return record
    raise VmError(f"no VM named or with CID {which!r}", hint="see: vsockrpc vm list")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_vm(which: str, *, timeout: float = 20.0) -> Stopped:
    record = _find(which)
    qmp = record.run_dir / "qmp.sock"
    pid = record.qemu_pid
    graceful = True
    if _alive(pid):
        with contextlib.suppress(VmError):
            qmp_command(qmp, "send-key", CTRL_ALT_DEL)
        if not _wait_gone(pid, timeout):
            graceful = False
            with contextlib.suppress(VmError):
                qmp_command(qmp, "quit")
            if not _wait_gone(pid, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)
    device = record.state.get("device_pid")
    if device and _alive(int(device)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(device), signal.SIGTERM)
        if not _wait_gone(int(device), 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(device), signal.SIGKILL)
    try:
        console = (record.run_dir / "console.log").read_text(errors="replace")
    except OSError:
        console = ""
    shutil.rmtree(record.run_dir, ignore_errors=True)
    return Stopped(record, console.replace("\r", ""), graceful)
