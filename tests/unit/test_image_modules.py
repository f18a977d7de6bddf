"""Picking guest modules from a kernel package: dependencies first, built-ins skipped, and
compressed modules (6.12's ``.ko.xz``) read and installed as the plain ELF busybox loads."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image.initramfs import build_loader
from vsockrpc.image.modules import installed_path, load_order, modinfo, module_bytes


def fake_module(name: str, depends: str = "") -> bytes:
    """A minimal ELF64 LE object: a null section, ``.modinfo`` and ``.shstrtab``."""
    info = f"license=GPL\0name={name}\0depends={depends}\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    sh_off = shstr_off + len(shstr)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)

    def shdr(name_off: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset, size, 0, 0, 1, 0)

    return (
        bytes(header)
        + info
        + shstr
        + bytes(64)
        + shdr(1, info_off, len(info))
        + shdr(10, shstr_off, len(shstr))
    )


def kernel_tree(tmp_path: Path) -> Path:
    """vsock ← transport_common ← transport (xz), virtio_blk (gz), virtio_pci built in."""
    mods = tmp_path / "lib" / "modules" / "6.12.0-cloud"
    (mods / "kernel" / "net").mkdir(parents=True)
    (mods / "kernel" / "block").mkdir(parents=True)
    (mods / "kernel/net/vsock.ko.xz").write_bytes(lzma.compress(fake_module("vsock")))
    (mods / "kernel/net/vmw_vsock_virtio_transport_common.ko.xz").write_bytes(
        lzma.compress(fake_module("vmw_vsock_virtio_transport_common", "vsock"))
    )
    (mods / "kernel/net/vmw_vsock_virtio_transport.ko").write_bytes(
        fake_module("vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common,vsock")
    )
    (mods / "kernel/block/virtio_blk.ko.gz").write_bytes(gzip.compress(fake_module("virtio_blk")))
    (mods / "modules.order").write_text(
        "kernel/net/vsock.ko\nkernel/net/vmw_vsock_virtio_transport_common.ko\n"
        "kernel/net/vmw_vsock_virtio_transport.ko\nkernel/block/virtio_blk.ko\n"
        "kernel/net/not_shipped.ko\n"
    )
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return mods


def test_compressed_and_plain_modules_in_dependency_order(tmp_path: Path) -> None:
    mods = kernel_tree(tmp_path)
    order = load_order(mods, ("virtio_pci", "virtio_blk", "vmw_vsock_virtio_transport"))
    assert [installed_path(ko, mods) for ko in order] == [
        "kernel/block/virtio_blk.ko",
        "kernel/net/vsock.ko",
        "kernel/net/vmw_vsock_virtio_transport_common.ko",
        "kernel/net/vmw_vsock_virtio_transport.ko",
    ]  # virtio_pci is built in: nothing to load
    assert [ko.suffix for ko in order] == [".gz", ".xz", ".xz", ".ko"]
    for ko in order:
        assert module_bytes(ko).startswith(b"\x7fELF")
    assert modinfo(order[2])["depends"] == "vsock"


def test_the_loader_carries_decompressed_modules_under_plain_names(tmp_path: Path) -> None:
    mods = kernel_tree(tmp_path)
    order = load_order(mods, ("vmw_vsock_virtio_transport",))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELFbusybox")
    archive = build_loader(busybox, order, mods, mtime=0)
    assert b"lib/modules/kernel/net/vsock.ko\n" in archive
    assert b".ko.xz" not in archive
    assert fake_module("vsock") in archive  # the ELF itself, not its xz stream
    assert lzma.compress(fake_module("vsock")) not in archive


def test_a_module_neither_shipped_nor_built_in_is_named(tmp_path: Path) -> None:
    mods = kernel_tree(tmp_path)
    with pytest.raises(ImageError, match="not_shipped is neither in"):
        load_order(mods, ("not_shipped",))


def test_a_corrupt_module_is_an_image_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ko.xz"
    bad.write_bytes(lzma.compress(b"not an elf"))
    with pytest.raises(ImageError, match=r"bad\.ko\.xz: not an ELF64"):
        modinfo(bad)


def test_a_truncated_compressed_module_is_an_image_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.ko.xz"
    cut.write_bytes(lzma.compress(fake_module("cut"))[:40])
    with pytest.raises(ImageError, match=r"cut\.ko\.xz: cannot decompress"):
        module_bytes(cut)
