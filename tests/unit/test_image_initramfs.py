"""The newc writer: an archive cpio(1) reads back exactly, byte-identical for equal inputs."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vsockrpc.image.initramfs import LOADER_INIT, CpioEntry, build_loader, write_newc


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


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_reads_it_back(tmp_path: Path) -> None:
    archive = write_newc(sample(), mtime=1_700_000_000)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = [
        line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()
    ]
    assert names == ["bin", "bin/sh", "dev", "dev/console", "init", "odd"]
    assert "5,   1" in listing or "5, 1" in listing  # the console's device numbers
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"abc"
    assert (out / "bin" / "sh").readlink() == Path("busybox")


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
