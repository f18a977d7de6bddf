"""The failure tier: real guests killed, signalled and attacked; afterwards nothing is left.

Every VM here lives under a private runtime directory (``VSOCKRPC_RUNTIME_DIR``, a fresh
``/tmp/vc-*`` removed at the end), never the user's. One *bystander* guest is booted first
and lives through the whole tier; every test ends by checking it still answers and still
shows as ``running``, that ``vm list`` shows exactly what the test expects, and that no
process, run directory, fd or thread the test did not expect is left.

Fixtures never skip: a chaos test must not pass without a real guest, so a missing
prerequisite (root, mmdebstrap, QEMU) is an error naming it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsockrpc.image import ImageInfo, build_image
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm, launch
from vsockrpc.vm.procs import alive

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def processes_with(marker: str) -> list[int]:
    """Live PIDs whose command line contains ``marker`` (a VM's run directory)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@dataclass
class Usage:
    fds: int
    threads: int
    os_threads: int

    @staticmethod
    def now() -> Usage:
        gc.collect()
        return Usage(fd_count(), threading.active_count(), os_thread_count())


def settles_to(baseline: Usage, timeout: float = 20.0) -> Usage:
    """This process's fds and threads once back at ``baseline`` (or what they are after
    ``timeout``: the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        now = Usage.now()
        ok = (
            now.fds <= baseline.fds
            and now.threads <= baseline.threads
            and now.os_threads <= baseline.os_threads
        )
        if ok or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


class Runtime:
    """A private runtime directory and the CLI pointed at it."""

    def __init__(self, root: Path, image: ImageInfo) -> None:
        self.root = root
        self.image = image
        self.env = {**os.environ, "VSOCKRPC_RUNTIME_DIR": str(root)}

    def run_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def listed(self) -> dict[str, str]:
        """``vm list`` as {name: state}."""
        proc = self.cli("vm", "list", "--json", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return {str(row["name"]): str(row["state"]) for row in json.loads(proc.stdout)}

    def vm_processes(self, name: str) -> list[int]:
        return processes_with(str(self.run_dir(name)) + "/")

    def assert_vm_gone(self, name: str, timeout: float = 15.0) -> None:
        """No process of VM ``name``, no run directory, not in ``vm list``."""
        deadline = time.monotonic() + timeout
        while self.vm_processes(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.vm_processes(name), f"processes of VM {name} left behind"
        assert not os.path.lexists(self.run_dir(name)), f"run directory of {name} left behind"
        assert name not in self.listed()

    def reap(self, name: str) -> list[int]:
        """Kill what VM ``name`` left (processes carrying its run dir, under our private
        runtime: provably ours) so the next try starts clean; returns what was left."""
        left = self.vm_processes(name)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for pid in left:
            gone(pid, 5.0)
        return left


@pytest.fixture(scope="session")
def guest_image() -> ImageInfo:
    return build_image()


@pytest.fixture(scope="session")
def runtime(guest_image: ImageInfo) -> Iterator[Runtime]:
    # Short: Unix socket paths inside the run dirs must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VSOCKRPC_RUNTIME_DIR", str(root))
        rt = Runtime(root, guest_image)
        try:
            yield rt
        finally:
            left = processes_with(str(root) + "/")
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(root, ignore_errors=True)
            assert not left, f"processes left under the runtime dir: {left}"


@pytest.fixture(scope="session")
def bystander(runtime: Runtime) -> Iterator[Vm]:
    """Another VM, booted first, that nothing a test does may disturb."""
    vm = launch(runtime.image, name="bystander", ready_timeout=300)
    pids = [vm.qemu.pid] + ([vm.device.pid] if vm.device else [])
    try:
        yield vm
    finally:
        vm.stop()
        assert not [p for p in pids if alive(p)], "the bystander's processes outlived it"
        assert not vm.run_dir.exists()


def assert_bystander_fine(runtime: Runtime, vm: Vm) -> None:
    assert vm.running(), "the bystander VM's QEMU died"
    assert vm.device is None or vm.device.process.poll() is None, "its device died"
    with Guest(vm.address(), wait=60, call_timeout=60) as g:
        assert g.run(["true"], timeout=60).exit_code == 0
    assert runtime.listed().get("bystander") == "running"
