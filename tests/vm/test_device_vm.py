"""The userspace vsock device with a real QEMU 7.2 guest (TCG): a Debian cloud kernel, its
virtio-vsock driver, and ``guest_probe`` (tests/vm/guest_probe.c) inside a minimal initramfs.

The host side only ever uses Unix sockets (the hybrid UDS); AF_VSOCK connects happen in the guest.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import _device_guest as dg
from vsockrpc.addresses import HybridAddress
from vsockrpc.transport import hybrid
from vsockrpc.vhost import SessionState, VsockDevice
from vsockrpc.vhost.testing import serving

GUEST_CID = 42
MiB = 1 << 20


class Guest:
    def __init__(self, device: VsockDevice, vm: dg.GuestVm, workdir: Path) -> None:
        self.device = device
        self.vm = vm
        self.workdir = workdir

    def connect(self, port: int = dg.PROBE_PORT) -> socket.socket:
        """Host → guest through the hybrid UDS (never AF_VSOCK on the host)."""
        s = hybrid.connect(HybridAddress(self.device.uds_path, port), timeout=30)
        s.settimeout(30)
        return s


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    # Never skip: a vm-tier test that passes without a guest hides regressions (conftest.py).
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 not installed: the vm tier needs it to boot a guest")
    workdir = Path(tempfile.mkdtemp(prefix="vdvm", dir="/tmp"))  # short: sun_path
    try:
        vmlinuz, initramfs = dg.build_initramfs(workdir)
        vhost = str(workdir / "vhost.sock")
        with (
            VsockDevice(
                vhost_socket=vhost, uds_path=str(workdir / "vm.vsock"), guest_cid=GUEST_CID
            ) as device,
            serving(device),
            dg.launch(vmlinuz, initramfs, vhost, workdir) as vm,
        ):
            vm.wait_console("PROBE-LISTEN vsock", 120)
            yield Guest(device, vm, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.mark.timeout(300)
def test_guest_sees_configured_cid(guest: Guest) -> None:
    text = guest.vm.console_text()
    assert "PROBE-INSMOD-FAIL" not in text
    assert f"PROBE-CID {GUEST_CID}\n" in text.replace("\r", "")
    assert guest.device.state is SessionState.RUNNING


@pytest.mark.timeout(300)
def test_hybrid_connect_checksummed_both_ways(guest: Guest) -> None:
    size = 4 * MiB
    data = os.urandom(size)
    with guest.connect() as s:  # host → guest: the guest checksums what arrives
        s.sendall(b"S" + struct.pack("<Q", size) + data)
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
        assert crc == zlib.crc32(data)
    with guest.connect() as s:  # guest → host: the guest sends data and its checksum
        s.sendall(b"G" + struct.pack("<QI", size, 1234))
        got = recv_exact(s, size)
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
        assert crc == zlib.crc32(got)
        assert len(set(got[:4096])) > 64  # real data, not a constant fill
    with guest.connect() as s:  # echo
        s.sendall(b"E" + b"ping" * 16)
        assert recv_exact(s, 64) == b"ping" * 16


@pytest.mark.timeout(300)
def test_guest_connects_to_cid2_unix_listener(guest: Guest) -> None:
    port = 6000
    path = f"{guest.device.uds_path}_{port}"
    heard: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen()
        srv.settimeout(30)

        def answer() -> None:
            peer, _ = srv.accept()
            with peer:
                peer.settimeout(30)
                line = b""
                while not line.endswith(b"\n"):
                    chunk = peer.recv(1)
                    if not chunk:
                        break
                    line += chunk
                heard.append(line)
                peer.sendall(b"hi guest, this is the host\n")

        t = threading.Thread(target=answer)
        t.start()
        with guest.connect() as ctl:
            ctl.sendall(b"C" + struct.pack("<I", port))
            reply = ctl.recv(200)
        t.join(30)
    os.unlink(path)
    assert heard == [b"hello from guest\n"]
    assert reply == b"C-OK hi guest, this is the host\n"


@pytest.mark.timeout(300)
def test_guest_connect_to_cid2_without_listener_fails_fast(guest: Guest) -> None:
    with guest.connect() as ctl:
        t0 = time.monotonic()
        ctl.sendall(b"C" + struct.pack("<I", 6001))
        reply = ctl.recv(200)
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"C-ERR "), reply  # the device answered RST
    assert elapsed < 1.5  # not the 2 s connect timeout


@pytest.fixture(scope="module")
def images() -> Iterator[tuple[Path, Path, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="vdvr", dir="/tmp"))
    try:
        vmlinuz, initramfs = dg.build_initramfs(workdir)
        yield vmlinuz, initramfs, workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _echo(device: VsockDevice, payload: bytes) -> bytes:
    with Guest(device, None, Path()).connect() as s:  # type: ignore[arg-type]
        s.sendall(b"E" + payload)
        return recv_exact(s, len(payload))


@pytest.mark.timeout(600)
def test_device_survives_guest_reboot_and_qemu_restart(images: tuple[Path, Path, Path]) -> None:
    vmlinuz, initramfs, workdir = images
    vhost = str(workdir / "vhost.sock")
    with (
        VsockDevice(vhost_socket=vhost, uds_path=str(workdir / "vm.vsock"), guest_cid=43) as dev,
        serving(dev),
    ):
        with dg.launch(vmlinuz, initramfs, vhost, workdir, allow_reboot=True) as vm:
            vm.wait_console("PROBE-LISTEN vsock", 120)
            assert _echo(dev, b"before reboot") == b"before reboot"
            # Guest reset: the driver goes away (rings stopped, GET_VRING_BASE) and comes back.
            with Guest(dev, vm, workdir).connect() as s:
                s.sendall(b"R")
                assert recv_exact(s, 5) == b"R-OK\n"
            deadline = time.monotonic() + 120
            while vm.console_text().count("PROBE-LISTEN vsock") < 2:
                assert time.monotonic() < deadline, vm.console_text()[-2000:]
                assert vm.proc.poll() is None
                time.sleep(0.1)
            assert _echo(dev, b"after reboot") == b"after reboot"
            assert dev.sessions == 1  # same QEMU, same vhost-user session
            vm.proc.kill()  # abrupt: QEMU vanishes without stopping the rings
            vm.proc.wait()
        deadline = time.monotonic() + 10
        while dev.state is not SessionState.WAITING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not dev.memory.regions and not dev.muxer.conns
        with dg.launch(vmlinuz, initramfs, vhost, workdir) as vm2:
            vm2.wait_console("PROBE-LISTEN vsock", 120)
            assert _echo(dev, b"second qemu") == b"second qemu"
            assert dev.sessions == 2
