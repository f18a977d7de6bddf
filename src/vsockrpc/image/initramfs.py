"""The loader initramfs: busybox, the virtio/vsock modules, and a ``/init`` that mounts the
ext4 root from virtio-blk and ``switch_root``s into the ``init=`` the kernel was given.

GUEST-BOOT.md measured this layout (ext4 on virtio-blk + ~1 MB busybox loader, q35,
``-cpu max``) as the fastest under TCG: the kernel unpacks a small uncompressed archive and
the root filesystem is paged in on demand instead of being unpacked whole.

The archive is written here in the ``newc`` format (``cpio(5)``, the format the kernel's
initramfs unpacker reads, Documentation/driver-api/early-userspace/buffer-format.rst) rather
than with cpio(1): entries are sorted, inode numbers sequential and times fixed, so the same
inputs give the same bytes.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.image.modules import installed_path, module_bytes

__all__ = ["HANDOVER", "LOADER_INIT", "CpioEntry", "build_loader", "write_newc"]

# Runs as PID 1 from the initramfs. Loads the modules listed in /modules.load (dependency
# order), waits for the root disk, mounts it read-only and hands over to init= from the
# kernel command line. /dev (devtmpfs) is moved into the new root: DEVTMPFS_MOUNT is off in
# Debian's cloud kernel, so nobody else would mount it.
LOADER_INIT = """#!/bin/sh
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
root=/dev/vda
init=/sbin/init
rootfstype=ext4
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    init=*) init="${arg#init=}" ;;
    rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
  esac
done
for m in $(cat /modules.load); do
  insmod "/$m" || echo "loader: insmod $m failed"
done
n=0
while [ ! -b "$root" ] && [ $n -lt 500 ]; do usleep 10000; n=$((n+1)); done
if ! mount -t "$rootfstype" -o ro "$root" /newroot; then
  echo "loader: cannot mount $root; powering off"
  poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc
echo "loader: switching to $init"
exec switch_root /newroot "$init"
"""

# The console line that ends the kernel's part of a boot: what the launcher times it by.
HANDOVER = "loader: switching to "

_APPLETS = ("sh", "mkdir", "mount", "umount", "cat", "insmod", "usleep", "switch_root", "poweroff")


@dataclass(frozen=True, slots=True)
class CpioEntry:
    name: str  # relative, no leading slash
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: list[CpioEntry], *, mtime: int) -> bytes:
    """A ``newc`` archive of ``entries`` (sorted by name), owned by root, all at ``mtime``."""
    out = io.BytesIO()

    def record(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        # c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor c_devminor
        # c_rdevmajor c_rdevminor c_namesize c_check
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded + _pad4(len(header) + len(encoded)))
        out.write(data + _pad4(len(data)))

    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        record(ino, entry.name, entry.mode, entry.data, entry.rdev)
    record(0, "TRAILER!!!", 0, b"", (0, 0))
    return out.getvalue()


def build_loader(busybox: Path, modules: list[Path], modules_dir: Path, *, mtime: int) -> bytes:
    """The loader archive: ``busybox`` with applet links, ``modules`` (load order), /init."""
    dirs = {"bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"}
    entries = [CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())]
    entries += [CpioEntry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in _APPLETS]
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, LOADER_INIT.encode()))
    load = []
    for ko in modules:
        rel = f"lib/modules/{installed_path(ko, modules_dir)}"
        parts = rel.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        entries.append(CpioEntry(rel, stat.S_IFREG | 0o644, module_bytes(ko)))
        load.append(rel)
    entries.append(CpioEntry("modules.load", stat.S_IFREG | 0o644, "\n".join(load).encode()))
    entries += [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    # /dev/console must exist before /init runs, or init has no stdout (init/main.c).
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    return write_newc(entries, mtime=mtime)
