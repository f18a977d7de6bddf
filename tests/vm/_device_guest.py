"""A minimal QEMU guest for the vsock device's VM tests and benchmark (GUEST-BOOT.md's recipe).

Debian's cloud kernel (``vsockrpc.image.kernel.fetch_kernel``: the image builder's, from the
host release's backports, cached), and a raw cpio
initramfs holding busybox-static, the virtio/vsock/virtio-net modules the kernel does not
have built in (loaded with insmod in dependency order, decompressed) and ``guest_probe`` (a
static C program compiled here with gcc). Boots under TCG with the launcher's CPU model on q35
with shared memfd memory (vhost-user needs it), our device on ``vhost-user-vsock-pci`` and a
user-networking virtio-net NIC for the comparison benchmark. Boots are judged by console markers.

Shared by tests/vm/test_device_vm.py and the bench's device and vmvm parts (two such guests in
one group); not part of the library.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.image.kernel import fetch_kernel
from vsockrpc.image.modules import installed_path, load_order, module_bytes
from vsockrpc.vm.accel import TCG_CPU
from vsockrpc.vm.procs import popen_dying_with_parent
from vsockrpc.vm.qemu import accel_option

HERE = Path(__file__).resolve().parent
PROBE_PORT = 5000

# What the probe needs; load_order adds dependencies and skips what the kernel has built in.
MODULES = ("virtio_pci", "vmw_vsock_virtio_transport", "virtio_net")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko || echo "PROBE-INSMOD-FAIL $m"; done
echo PROBE-MODULES-LOADED
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
/probe cid
/probe serve {port} &
while true; do sleep 3600; done
"""


class GuestBootError(RuntimeError):
    pass


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=300, **kw)  # type: ignore[call-overload, no-any-return]


def kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the Debian cloud kernel: the image builder's own fetch, cached."""
    k = fetch_kernel()
    return k.vmlinuz, k.modules_dir


def build_initramfs(workdir: Path) -> tuple[Path, Path]:
    """(vmlinuz, initramfs.cpio) for the probe guest, built in ``workdir``."""
    vmlinuz, modules = kernel()
    tree = workdir / "initramfs"
    for sub in ("bin", "proc", "sys", "dev", "lib/modules", "tmp"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise GuestBootError("busybox-static is not installed (scripts/setup installs it)")
    shutil.copy(busybox, tree / "bin" / "busybox")
    _run(["gcc", "-static", "-O2", "-o", str(tree / "probe"), str(HERE / "guest_probe.c")])
    order = load_order(modules, MODULES)  # dependencies first: the insmod order
    names = [Path(installed_path(ko, modules)).stem for ko in order]
    for ko, name in zip(order, names, strict=True):
        (tree / "lib" / "modules" / f"{name}.ko").write_bytes(module_bytes(ko))
    init = tree / "init"
    init.write_text(INIT.format(modules=" ".join(names), port=PROBE_PORT))
    init.chmod(0o755)
    cpio = workdir / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
    with cpio.open("wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=tree,
            input=files,
            stdout=out,
            check=True,
            timeout=120,
        )
    return vmlinuz, cpio


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class GuestVm:
    proc: subprocess.Popen[bytes]
    console: Path
    tcp_port: int  # host port forwarded to the guest's TCP PROBE_PORT (user networking)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            if marker in text:
                return text
            if self.proc.poll() is not None:
                raise GuestBootError(
                    f"QEMU exited ({self.proc.returncode}) before {marker!r}:\n{text[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise GuestBootError(
                    f"no {marker!r} on the console after {timeout:.0f} s:\n{text[-3000:]}"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def launch(
    vmlinuz: Path,
    initramfs: Path,
    vhost_socket: str,
    workdir: Path,
    *,
    mem_mb: int = 512,
    smp: int = 1,
    allow_reboot: bool = False,
) -> Iterator[GuestVm]:
    """Start QEMU (TCG) with our vhost-user-vsock device and a user-net NIC; kill it after."""
    console = workdir / f"console-{time.monotonic_ns()}.log"
    tcp_port = free_tcp_port()
    cmd = [
        "qemu-system-x86_64",
        "-machine",
        "q35,memory-backend=mem",
        "-accel",
        accel_option("tcg", smp),  # several vCPUs: one thread (vm/qemu.py says why)
        "-cpu",
        TCG_CPU,
        "-smp",
        str(smp),
        "-m",
        f"{mem_mb}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-nodefaults",
        "-display",
        "none",
        *([] if allow_reboot else ["-no-reboot"]),
        "-serial",
        f"file:{console}",
        "-chardev",
        f"socket,id=vsock0,path={vhost_socket}",
        "-device",
        "vhost-user-vsock-pci,chardev=vsock0",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{tcp_port}-:{PROBE_PORT}",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]
    with (workdir / "qemu.stderr").open("ab") as stderr:
        proc = popen_dying_with_parent(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        yield GuestVm(proc, console, tcp_port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
