"""The newc writer: byte-identical archives for equal inputs, the loader's module order (cpio(1)
reading them back is in tests/integration/test_image_initramfs_cpio.py)."""

from __future__ import annotations

import stat
from pathlib import Path

from vsockrpc.image.initramfs import HANDOVER, LOADER_INIT, CpioEntry, build_loader, write_newc


def sample() -> list[CpioEntry]:
    return [
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("odd", stat.S_IFREG | 0o644, b"abc"),  # data needing padding
    ]


def test_same_entries_same_bytes_in_any_order() -> None:
    a = write_newc(sample(), mtime=1_700_000_000)
    b = write_newc(list(reversed(sample())), mtime=1_700_000_000)
    assert a == b
    assert a.startswith(b"070701")
    assert len(a) % 4 == 0
    assert b"TRAILER!!!" in a


def test_loader_lists_modules_in_the_order_given(tmp_path: Path) -> None:
    mods = tmp_path / "lib" / "modules" / "6.1"
    (mods / "kernel" / "a").mkdir(parents=True)
    first, second = mods / "kernel" / "a" / "one.ko", mods / "kernel" / "a" / "two.ko"
    first.write_bytes(b"\x7fELF1")
    second.write_bytes(b"\x7fELF2")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELFbusybox")
    archive = build_loader(busybox, [second, first], mods, mtime=0)
    assert b"lib/modules/kernel/a/two.ko\nlib/modules/kernel/a/one.ko" in archive
    assert LOADER_INIT.encode() in archive
    assert b"switch_root" in archive


def test_the_loader_prints_the_hand_over_line_the_launcher_times() -> None:
    assert f'echo "{HANDOVER}$init"' in LOADER_INIT
