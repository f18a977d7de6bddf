"""kill -9 of QEMU (mid-boot, mid-upload) and of the device (mid-download), on real guests.

After each: the call fails with one :class:`AgentError` in bounded time, the VM's other
process goes away by itself, ``vm list`` says ``dead`` before anyone cleans up, stopping
removes everything, this process's fds and threads are back where they were, and the
bystander guest still answers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from typing import IO

import pytest

from tests.chaos.conftest import (
    Runtime,
    Usage,
    alive,
    assert_bystander_fine,
    gone,
    settles_to,
)
from vsockrpc.errors import AgentError
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm, launch

pytestmark = pytest.mark.timeout(600)

MIB = 1 << 20


class Pacer:
    """A source (``read``) or sink (``write``) that sets :attr:`started` once 1 MiB passed."""

    def __init__(self, limit: int = 512 * MIB) -> None:
        self.started = threading.Event()
        self.moved = 0
        self.limit = limit

    def _count(self, n: int) -> None:
        self.moved += n
        if self.moved >= MIB:
            self.started.set()

    def read(self, n: int = -1) -> bytes:
        n = min(MIB if n < 0 else n, MIB, self.limit - self.moved)
        self._count(n)
        return b"\xa5" * n

    def write(self, data: bytes) -> int:
        self._count(len(data))
        return len(data)


def _in_thread(call: object) -> tuple[threading.Thread, list[BaseException | None]]:
    outcome: list[BaseException | None] = []

    def body() -> None:
        try:
            call()  # type: ignore[operator]
            outcome.append(None)
        except BaseException as err:  # handed to the test thread
            outcome.append(err)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def _boot(runtime: Runtime, name: str) -> Vm:
    vm = launch(runtime.image, name=name, ready_timeout=300)
    assert runtime.listed().get(name) == "running"
    return vm


def _cut_transfer(vm: Vm, start: object, victim: int, pacer: Pacer) -> BaseException | None:
    thread, outcome = _in_thread(start)
    assert pacer.started.wait(120), "the transfer never got going"
    os.kill(victim, signal.SIGKILL)
    thread.join(90)
    assert not thread.is_alive(), "the cut transfer did not end within 90 s"
    return outcome[0]


def test_qemu_killed_mid_boot(runtime: Runtime, bystander: Vm) -> None:
    name = "killboot"
    proc = runtime.start("vm", "run", "--quiet", "--image", str(runtime.image.path), "--name", name)
    try:
        state = runtime.run_dir(name) / "state.json"
        deadline = time.monotonic() + 120
        while not state.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "QEMU never started"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 2.0))  # somewhere in firmware, kernel or init
        assert runtime.vm_processes(name), "no process of the booting VM"
        recorded = json.loads(state.read_text())
        os.kill(int(recorded["qemu_pid"]), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln and not ln.startswith("hint:")]
    assert len(lines) == 1 and lines[0].startswith("vsockrpc: error: "), err
    assert "QEMU exit" in lines[0] or "QEMU exited" in lines[0], lines[0]
    runtime.assert_vm_gone(name)
    assert_bystander_fine(runtime, bystander)


def test_qemu_killed_mid_upload(runtime: Runtime, bystander: Vm) -> None:
    before = Usage.now()
    vm = _boot(runtime, "killup")
    device = vm.device.pid if vm.device else None
    try:
        with Guest(vm.address(), wait=60, call_timeout=60) as g:
            pacer = Pacer()
            err = _cut_transfer(
                vm,
                lambda: g.upload(pacer, "/tmp/cut-upload", size=512 * MIB),  # type: ignore[arg-type]
                vm.qemu.pid,
                pacer,
            )
        assert isinstance(err, AgentError), repr(err)
        assert "Traceback" not in str(err)
        if device is not None:
            assert gone(device, 15.0), "the device outlived its QEMU"
        assert runtime.listed().get("killup") == "dead"
        assert vm.stop() == -signal.SIGKILL
    finally:
        vm.stop()
    runtime.assert_vm_gone("killup")
    after = settles_to(before)
    assert after.fds <= before.fds and after.threads <= before.threads, (before, after)
    assert_bystander_fine(runtime, bystander)


def test_device_killed_mid_download(runtime: Runtime, bystander: Vm) -> None:
    before = Usage.now()
    vm = _boot(runtime, "killdev")
    assert vm.device is not None, "this test needs the userspace device (no vhost-vsock)"
    try:
        with Guest(vm.address(), wait=60, call_timeout=60) as g:
            made = g.run(["dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=64"], timeout=120)
            assert made.exit_code == 0, made.stderr
            pacer = Pacer()
            sink: IO[bytes] = pacer  # type: ignore[assignment]
            err = _cut_transfer(vm, lambda: g.download("/tmp/big", sink), vm.device.pid, pacer)
        assert isinstance(err, AgentError), repr(err)
        assert alive(vm.qemu.pid)
        assert runtime.listed().get("killdev") == "dead (device exited)"
        vm.stop()
    finally:
        vm.stop()
    runtime.assert_vm_gone("killdev")
    after = settles_to(before)
    assert after.fds <= before.fds and after.threads <= before.threads, (before, after)
    assert_bystander_fine(runtime, bystander)


def test_a_grouped_vms_launcher_killed_leaves_the_group_host_serving_the_others(
    runtime: Runtime, bystander: Vm
) -> None:
    """kill -9 of the launcher of one VM of a group: its QEMU dies, its device leaves the
    group's host (membership files gone), the host serves the other member on; when that one
    stops, the host exits by itself and nothing under the runtime dir is left running."""
    group = "chaosg"
    before = Usage.now()
    stays = launch(runtime.image, name="gstay", groups=(group,), ready_timeout=300)
    assert stays.device is not None
    host = stays.device.pid
    members = runtime.root / "groups" / group
    proc = runtime.start(
        "vm",
        "run",
        "--quiet",
        "--image",
        str(runtime.image.path),
        "--name",
        "gkill",
        "--group",
        group,
    )
    try:
        deadline = time.monotonic() + 300
        while runtime.listed().get("gkill") != "running":
            assert time.monotonic() < deadline and proc.poll() is None, "gkill never ran"
            time.sleep(0.2)
        recorded = json.loads((runtime.run_dir("gkill") / "state.json").read_text())
        assert recorded["device_pid"] == host and recorded["device_host"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert gone(int(recorded["qemu_pid"]), 15.0), "QEMU outlived its killed launcher"
        cid = int(recorded["cid"])
        deadline = time.monotonic() + 15
        while list(members.glob(f"{cid}.*")):
            assert time.monotonic() < deadline, "the killed VM's device stayed in the group"
            time.sleep(0.05)
        assert alive(host), "the group host went down with one member"
        with Guest(stays.address(), wait=60, call_timeout=60) as g:
            assert g.run(["true"], timeout=60).exit_code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        runtime.cli("vm", "stop", "gkill")
        stays.stop()
    runtime.assert_vm_gone("gkill")
    runtime.assert_vm_gone("gstay")
    assert gone(host, 15.0), "the group host outlived its last VM"
    assert [p.name for p in members.iterdir()] == ["host.log"]
    after = settles_to(before)  # the launcher's connection to the host is closed too
    assert after.fds <= before.fds and after.threads <= before.threads, (before, after)
    assert_bystander_fine(runtime, bystander)
