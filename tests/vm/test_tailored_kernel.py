"""An image with the tailored kernel (``--kernel tailored``, image/tailored.py) on a real TCG
guest: it boots without a loader through every phase, runs commands and a PTY, moves files,
powers off cleanly on Ctrl-Alt-Del, and snapshots and restores (the vsock device is unplugged
and re-plugged: PCIe hot-plug). The first run builds the kernel (minutes, then cached)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import process_alive
from vsockrpc.agent.markers import POWERING_OFF
from vsockrpc.image import ImageInfo, build_image
from vsockrpc.image.agent import HANDOVER_PATH
from vsockrpc.image.initramfs import HANDOVER
from vsockrpc.payload import load_spec
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm, launch, restore, snapshot_vm

pytestmark = pytest.mark.timeout(1200)  # the first run compiles the kernel


@pytest.fixture(scope="module")
def tailored_image(guest_image: ImageInfo) -> ImageInfo:
    info = build_image(kernel="tailored")
    assert info.path != guest_image.path
    assert info.manifest["kernel"]["kind"] == "tailored"
    assert info.initrd.stat().st_size < 512  # an empty archive: no loader, no modules
    return info


@pytest.fixture(scope="module")
def tailored_vm(tailored_image: ImageInfo) -> Iterator[Vm]:
    machine = launch(tailored_image, name="tailored", ready_timeout=180)
    try:
        yield machine
    finally:
        machine.stop()


def test_it_boots_through_every_phase_and_serves_the_agent(
    tailored_vm: Vm, tailored_image: ImageInfo, tmp_path: Path
) -> None:
    assert list(tailored_vm.timings.phases()) == [
        "qemu start",
        "firmware+kernel",
        "init",
        "agent start",
        "first rpc",
    ]
    console = tailored_vm.console_text()
    assert f"{HANDOVER}/usr/local/bin/vsockrpc-init" in console
    with Guest(tailored_vm.address(), call_timeout=60) as g:
        release = g.run(["uname", "-r"], check=True).stdout.decode().strip()
        assert release == tailored_image.manifest["kernel"]["version"]
        cmdline = g.read_bytes("/proc/cmdline").decode()
        assert f"init={HANDOVER_PATH}" in cmdline
        mounts = g.read_bytes("/proc/mounts").decode()
        assert (
            "/dev/root / ext4 ro," in mounts and "devpts /dev/pts" in mounts
        )  # the kernel mounted it
        tty = g.run(["sh", "-c", "python3 -c 'import os; print(os.ttyname(os.openpty()[1]))'"])
        assert tty.stdout.startswith(b"/dev/pts/"), tty.stderr
        data = bytes(range(256)) * 4096
        (tmp_path / "up.bin").write_bytes(data)
        g.put(tmp_path / "up.bin", "/tmp/up.bin")
        g.get("/tmp/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == data


def test_a_snapshot_restores_with_the_device_replugged(tailored_vm: Vm, tmp_path: Path) -> None:
    with Guest(tailored_vm.address(), call_timeout=60) as g:
        g.write_bytes("/dev/shm/marker", b"before the snapshot")
    snapshot_vm(tailored_vm.name, tmp_path / "snap")
    with restore(tmp_path / "snap") as clone:
        assert "device re-plug" in clone.restore_phases()
        with Guest(clone.address(), call_timeout=60) as g:
            assert g.read_bytes("/dev/shm/marker") == b"before the snapshot"
        pids = [clone.qemu.pid, clone.device.pid if clone.device else 0]
        code = clone.stop()
    assert code == 0  # Ctrl-Alt-Del → PID 1 → ACPI power-off
    assert not any(process_alive(p) for p in pids)
    with Guest(tailored_vm.address(), call_timeout=60) as g:  # the source resumed
        assert g.read_bytes("/dev/shm/marker") == b"before the snapshot"


def test_ctrl_alt_del_powers_it_off(tailored_image: ImageInfo) -> None:
    machine = launch(tailored_image, ready_timeout=180)
    pids = [machine.qemu.pid, machine.device.pid if machine.device else 0]
    assert machine.stop() == 0
    assert POWERING_OFF in machine.console_text()  # PID 1 got the keys, not QMP's quit
    assert not any(process_alive(p) for p in pids)
    assert not machine.run_dir.exists()


def test_an_image_spec_asks_for_it_and_the_option_overrides_the_spec(
    tailored_image: ImageInfo, tmp_path: Path
) -> None:
    (tmp_path / "vsockrpc.toml").write_text('name = "tailored-spec"\nkernel = "tailored"\n')
    spec = load_spec(tmp_path / "vsockrpc.toml")
    info = build_image(spec=spec)
    assert info.manifest["kernel"]["kind"] == "tailored"
    assert info.kernel.read_bytes() == tailored_image.kernel.read_bytes()
    debian = build_image(spec=spec, kernel="debian")
    assert "kind" not in debian.manifest["kernel"]
    assert debian.initrd.stat().st_size > 1 << 20  # the loader, with its modules
