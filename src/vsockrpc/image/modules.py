"""Picking kernel modules and their dependencies without depmod/modprobe.

A Debian kernel package ships ``modules.order`` but not ``modules.dep`` (its postinst runs
depmod). Rather than require kmod on the host, each module's ``depends=`` entry is read from its
ELF ``.modinfo`` section (NUL-separated ``key=value`` strings; see ``modinfo(8)``), which is
what depmod itself consults for symbol-free dependency lists. Debian's 6.1 kernel ships plain
``.ko`` files, 6.12 ``.ko.xz``: :func:`module_bytes` gives the ELF either way, since busybox's
``insmod`` (the loader's) reads only plain modules.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

from vsockrpc.errors import ImageError

__all__ = ["GUEST_MODULES", "installed_path", "load_order", "modinfo", "module_bytes"]

_COMPRESSED = (".xz", ".gz", ".zst")

# What a guest needs (GUEST-BOOT.md): virtio over PCI and MMIO, the root disk, the vsock
# transport over virtio, and vsock loopback (CID 1: in-guest clients, e.g. the agent's tests).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "vsock_loopback",
)


def module_bytes(ko: Path) -> bytes:
    """The module's ELF: ``ko`` as is, or decompressed (``.ko.xz``, ``.ko.gz``, ``.ko.zst``)."""
    try:
        if ko.suffix == ".xz":
            return lzma.decompress(ko.read_bytes())
        if ko.suffix == ".gz":
            return gzip.decompress(ko.read_bytes())
        if ko.suffix == ".zst":  # no zstd in the standard library before 3.14
            if shutil.which("zstd") is None:
                raise ImageError(f"{ko.name}: a zstd-compressed module needs the zstd tool")
            return subprocess.run(
                ["zstd", "-dcq", str(ko)], check=True, capture_output=True, timeout=60
            ).stdout
        return ko.read_bytes()
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, subprocess.CalledProcessError) as err:
        raise ImageError(f"{ko.name}: cannot decompress: {err}") from err


def installed_path(ko: Path, modules_dir: Path) -> str:
    """Where ``ko`` goes below ``lib/modules/<version>`` in a guest: decompressed, so ``.ko``."""
    rel = ko.relative_to(modules_dir).as_posix()
    for suffix in _COMPRESSED:
        rel = rel.removesuffix(suffix)
    return rel


def modinfo(ko: Path) -> dict[str, str]:
    """The ``.modinfo`` strings of an ELF64 little-endian module (compressed or not)."""
    data = module_bytes(ko)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError(f"{ko.name}: not an ELF64 little-endian kernel module")
    # ELF64 header: e_shoff at 0x28, e_shentsize/e_shnum/e_shstrndx at 0x3A..0x3F.
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        # Elf64_Shdr: sh_name(4) sh_type(4) sh_flags(8) sh_addr(8) sh_offset(8) sh_size(8)
        base = e_shoff + index * e_shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, offset, size

    _, str_off, _ = section(e_shstrndx)
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise ImageError(f"{ko.name}: no .modinfo section")


def _name(line: str) -> str:
    """The module name of a ``modules.order``/``modules.builtin`` line (``kernel/…/x-y.ko``)."""
    return Path(line).name.removesuffix(".ko").replace("-", "_")


def _file(modules_dir: Path, line: str) -> Path | None:
    """The file of a ``modules.order`` line: ``x.ko``, or compressed (``x.ko.xz``…), if any."""
    for path in (modules_dir / line, *(modules_dir / (line + c) for c in _COMPRESSED)):
        if path.is_file():
            return path
    return None


def load_order(modules_dir: Path, names: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """``names`` plus their dependencies, dependencies first (an ``insmod`` order).

    Names missing from the tree are an error unless the kernel has them built in
    (``modules.builtin``). Only the modules visited are looked up on disk: the tree has ~1100,
    and this runs on every image lookup (each ``vm run``).
    """
    lines = {_name(line): line for line in (modules_dir / "modules.order").read_text().split()}
    builtin_file = modules_dir / "modules.builtin"
    builtin = {
        _name(line) for line in (builtin_file.read_text().split() if builtin_file.is_file() else [])
    }
    order: list[Path] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        line = lines.get(name)
        path = _file(modules_dir, line) if line is not None else None
        if path is None:
            if name in builtin:
                return
            raise ImageError(f"kernel module {name} is neither in {modules_dir} nor built in")
        if path in order or name in visiting:
            return
        visiting.add(name)
        for dep in filter(None, modinfo(path).get("depends", "").split(",")):
            visit(dep)
        order.append(path)

    for name in names:
        visit(name)
    return order
