"""The QEMU command line for a vsockrpc guest (a pure function of :class:`QemuConfig`).

Layout (GUEST-BOOT.md): q35, kernel + loader initramfs, ext4 root on a read-only virtio-blk
disk, console on the first serial port written to a file, QMP on a Unix socket. For our
userspace vhost-user device the guest RAM must be shareable with the device process
(``memory-backend-memfd,share=on`` used as the machine's RAM): without it QEMU cannot hand the
memory table over and the data path is dead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import VmError

__all__ = [
    "VSOCK_CHARDEV",
    "VSOCK_DEVICE",
    "VSOCK_PORT",
    "QemuConfig",
    "accel_option",
    "find_qemu",
    "qemu_argv",
    "vhost_user_vsock_device",
]

VSOCK_PORT = "vsock-port"  # the pcie-root-port the vsock device sits on
VSOCK_DEVICE = "vsock"  # the vsock device's id (device_del / device_add)
VSOCK_CHARDEV = "vhost-vsock"  # the vhost-user chardev's id

_BINARIES = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}


def find_qemu(arch: str) -> str:
    name = _BINARIES.get(arch)
    if name is None:
        raise VmError(f"no QEMU system emulator known for architecture {arch}")
    path = shutil.which(name)
    if path is None:
        raise VmError(
            f"QEMU is not installed ({name} not found)",
            hint="apt-get install qemu-system-x86 (scripts/setup does it as root)",
        )
    return path


@dataclass(frozen=True, slots=True)
class QemuConfig:
    qemu: str
    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    console_log: Path
    qmp_socket: Path
    accel: str = "tcg"
    cpu: str = "max"
    memory_mib: int = 512
    cpus: int = 1
    guest_cid: int = 3
    vhost_user_socket: Path | None = None  # None: kernel vhost-vsock
    name: str = "vsockrpc"
    incoming: str | None = None  # a migration URI to load from (the guest starts paused)
    ram_file: Path | None = None  # guest RAM from this file (shared), not a new memfd


def accel_option(accel: str, cpus: int) -> str:
    """``-accel``'s value for ``accel`` (``tcg`` or ``kvm``) with ``cpus`` vCPUs.

    TCG with more than one vCPU runs them all on one host thread (``thread=single``): QEMU 7.2's
    multi-threaded TCG (Debian bookworm's) gets x86 cross-modifying code wrong. Linux patches a
    static key site through a temporary int3 while the other CPUs run (``text_poke_bp``: int3,
    IPI, the tail, IPI, the first byte, IPI), and a vCPU could still run the int3 after the
    patch was done: ``Oops: int3`` and a panic. Flipping one static key in a loaded 2-vCPU guest
    killed each of 4 guests, 3 of them within 100 flips; single-threaded, 4 guests survived
    5000 flips between them (docs/device.md). Boots hit it too: 2 of 22 two-vCPU boots.
    """
    if accel == "tcg" and cpus > 1:
        return "tcg,thread=single"
    return accel


def vhost_user_vsock_device() -> str:
    """The ``-device``/``device_add`` value of the userspace vsock device on its root port."""
    return f"vhost-user-vsock-pci,chardev={VSOCK_CHARDEV},id={VSOCK_DEVICE},bus={VSOCK_PORT}"


def qemu_argv(c: QemuConfig) -> list[str]:
    machine = "q35"
    argv = [
        c.qemu,
        "-name",
        c.name,
        "-accel",
        accel_option(c.accel, c.cpus),
        "-cpu",
        c.cpu,
        "-m",
        f"{c.memory_mib}M",
        "-smp",
        str(c.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(c.kernel),
        "-initrd",
        str(c.initrd),
        "-append",
        c.cmdline,
        "-drive",
        f"file={c.rootfs},format=raw,if=none,id=root,readonly=on",
        "-device",
        "virtio-blk-pci,drive=root",
        "-chardev",
        f"file,id=console,path={c.console_log}",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{c.qmp_socket},server=on,wait=off",
    ]
    argv += ["-device", f"pcie-root-port,id={VSOCK_PORT},bus=pcie.0,chassis=1"]
    if c.vhost_user_socket is None:
        # Kernel vhost-vsock migrates as is (a transport reset event on load): always present.
        argv += [
            "-device",
            f"vhost-vsock-pci,guest-cid={c.guest_cid},id={VSOCK_DEVICE},bus={VSOCK_PORT}",
        ]
    else:
        machine += ",memory-backend=mem"
        if c.ram_file is None:
            ram = f"memory-backend-memfd,id=mem,size={c.memory_mib}M,share=on"
        else:
            ram = f"memory-backend-file,id=mem,size={c.memory_mib}M,mem-path={c.ram_file},share=on"
        argv += ["-object", ram]
        if c.incoming is None:  # restored guests get theirs over QMP after the load
            argv += [
                "-chardev",
                f"socket,id={VSOCK_CHARDEV},path={c.vhost_user_socket}",
                "-device",
                vhost_user_vsock_device(),
            ]
    if c.incoming is not None:
        argv += ["-incoming", c.incoming]
    return [*argv, "-machine", machine]
